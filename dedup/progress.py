"""Progress display: tasks (shards) done with an ETA, and items per second."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"-- {unit}/s", style="progress.data.speed")


class Progress:
    """Two bars: tasks with ETA, and processed items with their rate."""

    def __init__(self, stage: str, total_tasks: int, unit: str = "samples", enabled: bool = True) -> None:
        self.enabled = enabled and total_tasks > 0
        self.stage = stage
        self.unit = unit
        self.total_tasks = total_tasks
        self._rich: RichProgress | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                RateColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
            )
            self._rich.__enter__()
            self._tasks = self._rich.add_task(f"{self.stage}: tasks", total=self.total_tasks, unit="tasks")
            self._items = self._rich.add_task(f"{self.stage}: {self.unit}", total=None, unit=self.unit)
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def advance_tasks(self, n: int) -> None:
        if self._rich is not None and n:
            self._rich.advance(self._tasks, n)

    def advance_items(self, n: int) -> None:
        if self._rich is not None and n:
            self._rich.advance(self._items, n)
