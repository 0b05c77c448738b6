"""Progress reporting: rich bars on a terminal, plain lines otherwise (CI, pipes, `--json`).

Everything goes to stderr so stdout stays reserved for the command's result.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Reporter:
    """Progress of a run: tasks, epochs and batches (with images/s). Silent when `enabled` is false.

    Args:
        enabled: print anything at all.
        console: where to print (stderr by default). Off a terminal every record is one line, never wrapped.
        verbose: also print routine details (each saved snapshot).
        on_checked: called once every input check has passed (the backbone and its weights included), before
            the run folder exists; the CLI shows the warnings it held until then.
    """

    def __init__(
        self,
        enabled: bool = True,
        console: Console | None = None,
        verbose: bool = False,
        on_checked: Callable[[], None] | None = None,
    ):
        self.enabled = enabled
        self.verbose = verbose
        self.run_dir = None  # set by the engine once the run folder exists (for the interrupt message)
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.interactive = enabled and self.console.is_terminal
        self._on_checked = on_checked
        self._progress: Progress | None = None
        self._bar = None
        self._images = 0
        self._started = 0.0

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)

    def detail(self, text: str) -> None:
        """A routine line, shown with `--verbose` only."""
        if self.verbose:
            self.message(text)

    def checked(self) -> None:
        if self._on_checked is not None:
            self._on_checked()
            self._on_checked = None

    def started(self, run_dir) -> None:
        """The run folder exists: name it first, so a log read later says where the run went."""
        self.run_dir = run_dir
        self.message(f"run folder: {run_dir}")

    def start_epoch(self, description: str, batches: int) -> None:
        self._images, self._started = 0, time.perf_counter()
        if self.interactive:
            self._progress = self._new_bar()
            self._bar = self._progress.add_task(description, total=batches, rate="")
        self._description = description

    def _new_bar(self) -> Progress:
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        bar.start()
        return bar

    @contextlib.contextmanager
    def bar(self, description: str, batches: int) -> Iterator[Callable[[], None]]:
        """A transient bar on a terminal (nothing elsewhere) for work whose result has its own line
        (evaluation, end-of-task statistics); the block calls the function it gets once per batch."""
        if not self.interactive or self._progress is not None:
            yield lambda: None
            return
        bar = self._new_bar()
        task = bar.add_task(description, total=batches, rate="")
        try:
            yield lambda: bar.update(task, advance=1)
        finally:
            bar.stop()

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
