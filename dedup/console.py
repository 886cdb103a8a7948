"""Everything dedup prints to the terminal. Web text (keys, captions, URLs) is escaped here."""

from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dedup.engine import StageReport


def print_embed_summary(report: StageReport, console: Console) -> None:
    stats = report.stats
    failed = {k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith("status.") and k != "status.ok"}
    console.print(
        f"embed: {int(stats.get('samples', 0)):,} samples, {int(stats.get('status.ok', 0)):,} ok, "
        f"failed {sum(failed.values()):,} {dict(sorted(failed.items()))}, "
        f"{report.tasks_run} shards run, {report.tasks_skipped} already done, {report.seconds:.1f}s"
    )


def print_top(ranking: pd.DataFrame, console: Console, top: int = 15) -> None:
    if ranking.empty:
        console.print("no duplicate clusters found")
        return
    table = Table("rank", "copies", "captions", "domains", "shards", "verbatim", "risk", "representative key", "caption",
                  title="Most duplicated images")
    for row in ranking.head(top).itertuples():
        caption = row.representative_caption[:60] if isinstance(row.representative_caption, str) else ""
        verbatim = str(getattr(row, "verbatim_copies", ""))
        risk = f"{row.risk:.2f}" if hasattr(row, "risk") else ""
        # Keys and captions are web content: plain Text, never console markup.
        table.add_row(str(row.rank), str(row.copies), str(row.distinct_captions), str(row.url_domains),
                      str(row.shards_spanned), verbatim, risk, Text(str(row.representative_key)), Text(caption))
    console.print(table)
