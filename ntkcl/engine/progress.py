"""Progress reporting: rich bars on a terminal, plain lines otherwise (CI, pipes, `--json`).

Everything goes to stderr so stdout stays reserved for the command's result.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Reporter:
    """Progress of a run: tasks, epochs and batches (with images/s). Silent when `enabled` is false."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.run_dir = None  # set by the engine once the run folder exists (for the interrupt message)
        self.console = console or Console(stderr=True)
        self.interactive = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._bar = None
        self._images = 0
        self._started = 0.0

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)

    def start_epoch(self, description: str, batches: int) -> None:
        self._images, self._started = 0, time.perf_counter()
        if self.interactive:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._bar = self._progress.add_task(description, total=batches, rate="")
        self._description = description

    def advance(self, images: int) -> None:
        self._images += images
        if self._progress is not None:
            rate = self._images / max(time.perf_counter() - self._started, 1e-9)
            self._progress.update(self._bar, advance=1, rate=f"{rate:,.0f} img/s")

    def end_epoch(self, summary: str) -> float:
        """Close the bar, print one line, return images/s."""
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rate = self._images / elapsed
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.message(f"{self._description}: {summary} ({rate:,.0f} img/s, {elapsed:.1f}s)")
        return rate
