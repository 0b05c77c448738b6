"""Ctrl+C and SIGTERM during training: finish the optimizer step, save a snapshot, then stop.

Interrupting in the middle of `optimizer.step()` could leave half-updated parameters behind, so the signal
only records the request; the training loop checks it after every step, writes a consistent snapshot and
raises KeyboardInterrupt. A second Ctrl+C interrupts at once. SIGTERM (a scheduler's pre-emption, torchrun
stopping its workers) is treated like the first Ctrl+C.

In a process group only rank 0 writes files, so only rank 0 takes the request; the other ranks ignore
both signals while they train, so that they keep stepping with rank 0 until it has written the snapshot
and left, and then stop on the broken group (or are killed by the launcher after its grace period).
Loader workers ignore Ctrl+C too, so the main process can still read the batches of the step it finishes.
"""

from __future__ import annotations

import signal
import threading


def ignore_interrupts(_worker_id: int = 0) -> None:
    """`worker_init_fn` of the training loader: Ctrl+C is the training process's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """Context manager turning SIGINT / SIGTERM into a flag (`requested`) while it is active.

    Args:
        handles: whether this process acts on the signals (rank 0, or a single process); when false, both
            are ignored while the context is active.
    """

    def __init__(self, handles: bool = True):
        self.handles = handles
        self.requested = False
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread; keep the default behaviour
        handler = self._on_signal if self.handles else signal.SIG_IGN
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
