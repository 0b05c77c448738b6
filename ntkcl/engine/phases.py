"""Where a task's wall time goes: seconds per phase, written to log.jsonl per epoch and per task.

Phases: `setup` (begin_task, prepare_task, building the task's optimizer and data), `data_wait` (waiting for
the next training batch, including the device feed's transform), `forward_backward`, `optimizer` (gradient
adjustments, clipping, the update and the step's bookkeeping), `statistics` (end_task), `evaluation`,
`checkpoint` (checkpoints, in-task snapshots, metrics files) and `compilation` (torch's own compile-time
counter, taken out of whichever phase the compilation happened in). What no phase covers is `other`.

On CUDA every phase boundary synchronises the device, so that kernels are charged to the phase that queued
them rather than to the next one that waits.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

PHASES = (
    "setup",
    "data_wait",
    "forward_backward",
    "optimizer",
    "statistics",
    "evaluation",
    "checkpoint",
    "compilation",
)
OTHER = "other"


class PhaseClock:
    """Accumulates seconds per phase; `since(mark)` gives the seconds spent after an earlier `mark()`.

    Args:
        device: synchronised at phase boundaries when it is a CUDA device.
        compile_seconds: torch's compile-time counter (None when nothing is compiled).
    """

    def __init__(self, device: torch.device, compile_seconds: Callable[[], float] | None = None):
        self.cuda = device.type == "cuda"
        self.device = device
        self.compile_seconds = compile_seconds
        self.totals = dict.fromkeys(PHASES, 0.0)

    def _synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._synchronize()
        compiled_before = self.compile_seconds() if self.compile_seconds else 0.0
        started = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            elapsed = time.perf_counter() - started
            compiled = (self.compile_seconds() - compiled_before) if self.compile_seconds else 0.0
            self.totals[name] += elapsed - compiled
            self.totals["compilation"] += compiled

    def mark(self) -> dict[str, float]:
        return dict(self.totals)

    def since(self, mark: dict[str, float], wall_seconds: float | None = None) -> dict[str, float]:
        """Seconds per phase after `mark`; with the wall time of that span, also `other` (what no phase covers)."""
        spent = {name: self.totals[name] - mark[name] for name in PHASES}
        if wall_seconds is not None:
            spent[OTHER] = max(wall_seconds - sum(spent.values()), 0.0)
        return spent


def data_wait_share(phases: dict[str, float]) -> float:
    """Data wait as a share of the training step time (data wait + forward/backward + optimizer)."""
    step = phases["data_wait"] + phases["forward_backward"] + phases["optimizer"]
    return phases["data_wait"] / step if step > 0 else 0.0
