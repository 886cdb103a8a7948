"""Everything dedup prints to the terminal. Web text (keys, captions, URLs) is made terminal-safe here."""

from __future__ import annotations

import re

import pandas as pd
from rich.console import Console
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
        # Keys and captions are web content: plain Text, never console markup, never control characters.
        table.add_row(str(row.rank), str(row.copies), str(row.distinct_captions), str(row.url_domains),
                      str(row.shards_spanned), verbatim, risk, safe_text(row.representative_key), safe_text(caption))
    console.print(table)
