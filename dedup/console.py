"""Everything dedup prints to the terminal. Web text (keys, captions, URLs) is made terminal-safe here."""

from __future__ import annotations

import math
import re

import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dedup.engine import StageReport
from dedup.run import RunDir

# C0 and C1 controls, DEL, and the bidi overrides/isolates that reorder what a terminal shows.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
FAILED_SHARDS_SHOWN = 10


def terminal_safe(value: object) -> str:
    """Untrusted text -> text that cannot drive the terminal: every control character shows as an escape.

    `rich.Text` keeps ESC, so an ANSI sequence in a caption would otherwise recolour,
    retitle or clear the user's terminal.
    """
    return _UNSAFE.sub(_escape_char, str(value))


def _escape_char(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(value: object) -> Text:
    """Untrusted text as a rich Text: no markup, no control characters."""
    return Text(terminal_safe(value))


def print_embed_summary(report: StageReport, console: Console) -> None:
    stats = report.stats
    failed = {k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith("status.") and k != "status.ok"}
    console.print(
        f"embed: {int(stats.get('samples', 0)):,} samples, {int(stats.get('status.ok', 0)):,} ok, "
        f"failed {sum(failed.values()):,} {dict(sorted(failed.items()))}, "
        f"{report.tasks_run} shards run, {report.tasks_skipped} already done, {report.seconds:.1f}s"
    )
    for line in identity_warnings(stats):
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
    if report.failures:
        console.print(f"[yellow]warning:[/] {len(report.failures)} shards were not read to their end "
                      "(their readable samples are used; listed at the end)", soft_wrap=True)


def identity_warnings(stats) -> list[str]:
    """Repeated keys and member names: each such sample keeps its own row, but the user must know."""
    lines = []
    if stats.get("keys.repeated_in_shard", 0):
        lines.append(f"{int(stats['keys.repeated_in_shard']):,} samples repeat a key seen earlier in their shard "
                     "(kept as separate samples, told apart by their order in the shard)")
    if stats.get("members.repeated", 0):
        lines.append(f"{int(stats['members.repeated']):,} member names repeat inside one sample "
                     "(each repeat starts a new sample; no image replaces another)")
    if stats.get("keys.in_several_shards", 0):
        lines.append(f"{int(stats['keys.in_several_shards']):,} keys occur in more than one shard "
                     "(samples are identified by shard and key)")
    return lines


def print_failed_shards(run: RunDir, console: Console, retry_command: str) -> int:
    """List the shards of OUT/failed_shards.parquet and the command that retries them; returns their number."""
    if not run.failed_shards.exists():
        return 0
    failed = pd.read_parquet(run.failed_shards)
    console.print(f"[bold red]{len(failed)} shards failed[/] after retries; the next run retries them "
                  f"(all in {terminal_safe(run.failed_shards)}):", soft_wrap=True, markup=True)
    for row in failed.head(FAILED_SHARDS_SHOWN).itertuples():
        message = str(row.error).strip().splitlines()[-1] if str(row.error).strip() else ""
        console.print(safe_text(f"  shard {row.shard_index} {row.url}: {row.status}: {message}"), soft_wrap=True)
    if len(failed) > FAILED_SHARDS_SHOWN:
        console.print(f"  ... and {len(failed) - FAILED_SHARDS_SHOWN} more")
    console.print(safe_text(f"retry with: {retry_command}"), soft_wrap=True)
    return len(failed)


def _clip(text: str, width: int) -> str:
    """At most `width` characters, an ellipsis marking a cut (one line a cluster in an 80-column terminal)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def print_top(ranking: pd.DataFrame, console: Console, top: int = 15) -> None:
    if ranking.empty:
        console.print("no duplicate clusters found")
        return
    table = Table("#", "copies", "capt", "doms", "shards", "verb", "risk", "key", "caption", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False, collapse_padding=True,
                  title="Most duplicated images",
                  caption="capt: distinct captions, doms: URL domains, verb: copies captioned as the representative, "
                          "risk: memorisation risk (README)")
    for row in ranking.head(top).itertuples():
        caption = _clip(row.representative_caption, 24) if isinstance(row.representative_caption, str) else ""
        verbatim = str(getattr(row, "verbatim_copies", ""))
        risk = f"{row.risk:.2f}" if hasattr(row, "risk") else ""
        # Keys and captions are web content: plain Text, never console markup, never control characters.
        table.add_row(str(row.rank), str(row.copies), str(row.distinct_captions), str(row.url_domains),
                      str(row.shards_spanned), verbatim, risk, safe_text(_clip(str(row.representative_key), 12)),
                      safe_text(caption))
    console.print(table)


def print_results(results: list, console: Console, limit: int = 20) -> None:
    """`dedup query` in the terminal: each query's exact count, then its best matches (web text made safe)."""
    for result in results:
        if result.error:
            console.print(f"[red]{escape(terminal_safe(result.query))}: {escape(terminal_safe(result.error))}[/]")
            continue
        counted = "copies above threshold" if result.min_similarity is None else f"images at similarity >= {result.min_similarity:g}"
        console.print(f"[bold]{escape(terminal_safe(result.query))}[/]: {result.copies} {counted} "
                      f"({result.descriptor}); best match's cluster has {result.cluster_size} members")
        table = Table("similarity", "key", "caption", "url")
        for row in result.matches.head(limit).itertuples():
            # Keys, captions and URLs are web content: plain Text, never console markup.
            # ... and never control characters (an ANSI escape in a caption would drive the terminal).
            table.add_row(f"{row.similarity:.3f}", safe_text(row.key), safe_text(_shown(row.caption)[:50]),
                          safe_text(_shown(row.url)[:60]))
        if len(result.matches):
            console.print(table)


def _shown(value: object) -> str:
    """Missing values (None, NaN) print as nothing, everything else as its text."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def print_metrics(metrics: dict, console: Console) -> None:
    """`dedup eval` in the terminal: the scores, recall per family, and the largest true groups."""
    table = Table("metric", "value", title="dedup eval")
    for name in ("samples", "pair_precision", "pair_recall", "pair_f1", "bcubed_f1", "hard_negative_merges",
                 "top10_mean_relative_error", "copy_count_spearman"):
        value = metrics[name]
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    for family, value in metrics["recall_by_family"].items():
        table.add_row(escape(f"recall[{family}]"), f"{value:.4f}")
    console.print(table)
    top = Table("group", "true copies", "reported", "rel. error", title="10 largest true groups")
    for row in metrics["top10"]:
        top.add_row(escape(str(row["group_id"])), str(row["true_copies"]), str(row["reported_copies"]), f"{row['relative_error']:.3f}")
    console.print(top)
