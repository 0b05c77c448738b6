"""Start a run on one process, one process per GPU of this host, N CPU processes, or inside torchrun's group.

`ntkcl train --gpus 0,1` (or `--nproc N`) spawns one process per rank with `torch.multiprocessing` and a
rendezvous on 127.0.0.1 at a free port; under `torchrun` (or any launcher that sets RANK and WORLD_SIZE)
the same command joins the group it was started in instead. The global batch size is the configured one in
every case: each of N processes takes `batch_size / N` images per step.

The launching process supervises the ranks: when one fails (an exception, or killed by a signal), the
others are terminated at once rather than left waiting in a collective, and the command fails with one
line naming the rank and its error. Finished checkpoints are written atomically by rank 0, so the last one
stays intact and `ntkcl train --resume` continues from it, with any number of processes.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ntkcl.config import DEVICE_PATTERN, RunConfig
from ntkcl.engine.distributed import launched_by_torchrun
from ntkcl.engine.progress import Reporter
from ntkcl.errors import BadInputError, RunFailedError

# Seconds a rank gets to exit on its own (after Ctrl+C, or after the group failed) before it is terminated.
GRACE_S = 5.0
POLL_S = 0.1
SETTLE_S = 1.0


@dataclass(frozen=True)
class LaunchPlan:
    """How many processes a run uses and which GPU each local rank takes (None: CPU or device as given)."""

    world_size: int
    gpus: list[int] | None
    joined: bool

    @property
    def spawns(self) -> bool:
        return not self.joined and self.world_size > 1


def visible_gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def all_gpus() -> list[int]:
    """Every GPU this process can see (`--gpus all`)."""
    count = visible_gpu_count()
    if count == 0:
        raise BadInputError("--gpus all: no GPU is visible on this host (use --nproc N for CPU processes)")
    return list(range(count))


def _require_visible_gpus(request: str, indices: dict[int, str], fallback: str) -> None:
    """The host checks `--gpus` and `--device` share, with the same one-line errors.

    Args:
        request: the option as the user gave it, for the error when CUDA is missing (`--gpus`, `--device cuda`).
        indices: each requested GPU index with how the user wrote it (`--gpus 7`, `--device cuda:7`).
        fallback: what to use instead when this host has no GPU.
    """
    count = visible_gpu_count()
    if count == 0:
        raise BadInputError(f"{request} needs CUDA, but no GPU is visible on this host ({fallback})")
    for index, written in indices.items():
        if not 0 <= index < count:
            visible = "0" if count == 1 else f"0..{count - 1}"
            raise BadInputError(f"{written}: this host has no GPU {index} (visible: {visible})")


def _check_gpus(gpus: list[int], device: str) -> None:
    if not gpus:
        raise BadInputError("--gpus needs at least one GPU index")
    if device == "cpu" or device.startswith("cuda:"):
        raise BadInputError(f"--gpus picks the device of each process; drop --device {device}")
    duplicates = sorted({index for index in gpus if gpus.count(index) > 1})
    if duplicates:
        raise BadInputError(f"--gpus lists GPU {duplicates[0]} more than once")
    _require_visible_gpus("--gpus", {index: f"--gpus {index}" for index in gpus}, "use --nproc N for CPU processes")


def check_device(device: str) -> None:
    """`--device` must be auto, cpu, cuda or cuda:N, and a GPU it names must be on this host."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise BadInputError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        indices = {int(index): f"--device {device}"} if index else {}
        _require_visible_gpus(f"--device {device}", indices, "use --device cpu")


def _uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and visible_gpu_count() > 0)


def plan_processes(config: RunConfig) -> LaunchPlan:
    """Check `runtime.gpus` / `runtime.nproc` against this host and the method; BadInputError when they do not fit."""
    runtime = config.runtime
    gpus = list(runtime.gpus) if runtime.gpus is not None else None
    if runtime.nproc < 1:
        raise BadInputError(f"--nproc must be at least 1, got {runtime.nproc}")
    if gpus is not None:
        _check_gpus(gpus, runtime.device)
    else:
        check_device(runtime.device)
    if launched_by_torchrun():
        if runtime.nproc > 1:
            raise BadInputError("under torchrun the number of processes comes from torchrun; drop --nproc")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if gpus is not None and len(gpus) < local_world:
            raise BadInputError(f"--gpus lists {len(gpus)} GPU(s) for the {local_world} processes torchrun starts here")
        plan = LaunchPlan(int(os.environ.get("WORLD_SIZE", "1")), gpus, joined=True)
    elif gpus is not None:
        if runtime.nproc not in (1, len(gpus)):
            raise BadInputError(f"--nproc {runtime.nproc} conflicts with --gpus (one process per listed GPU)")
        plan = LaunchPlan(len(gpus), gpus, joined=False)
    else:
        if runtime.nproc > 1 and _uses_cuda(runtime.device):
            if runtime.device.startswith("cuda:"):
                raise BadInputError(f"--nproc {runtime.nproc} processes cannot share --device {runtime.device}")
            if runtime.nproc > visible_gpu_count():
                raise BadInputError(
                    f"--nproc {runtime.nproc} needs one GPU per process; this host has {visible_gpu_count()} "
                    "(use --device cpu for CPU processes)"
                )
        plan = LaunchPlan(runtime.nproc, None, joined=False)
    if plan.world_size > 1:
        _check_method_and_batch(config, plan.world_size)
    return plan


def _check_method_and_batch(config: RunConfig, world_size: int) -> None:
    from ntkcl.engine.training import per_process_batch
    from ntkcl.methods.registry import get_method

    method = get_method(config.method.name)
    if not method.supports_distributed:
        raise BadInputError(
            f"method {config.method.name} does not support distributed training; run it with one process"
        )
    per_process_batch(config.optim.batch_size, world_size, config.optim.accumulation_steps)


def launch(config: RunConfig, out: Path, resume_dir: Path | None, reporter: Reporter):
    """Run training as `plan_processes` says: here, or in spawned ranks. Returns rank 0's RunResult."""
    from ntkcl.engine.distributed import DistributedContext
    from ntkcl.engine.loop import run_training
    from ntkcl.engine.preflight import prepare_run

    plan = plan_processes(config)
    if not plan.spawns:
        return run_training(config, out, resume_dir, reporter)
    # Bad input fails here, in one process, before any rank starts (each rank then builds its own parts).
    prepare_run(config, DistributedContext(), out if resume_dir is None else None)
    return _spawn(plan, config, out, resume_dir, reporter)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _RankReporter(Reporter):
    """Rank 0's reporter in a spawned process: also tells the launcher where the run folder is."""

    def __init__(self, enabled: bool, messages):
        self._messages = messages
        super().__init__(enabled=enabled)

    @property
    def run_dir(self):
        return self._run_dir

    @run_dir.setter
    def run_dir(self, value) -> None:
        self._run_dir = value
        if value is not None:
            self._messages.put(("run_dir", 0, str(value)))


def _worker(
    rank: int,
    plan: LaunchPlan,
    port: int,
    config: RunConfig,
    out: Path,
    resume_dir: Path | None,
    report: bool,
    messages,
) -> None:
    """One spawned rank: join the group through the environment, train, report the outcome to the launcher."""
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(plan.world_size),
            "LOCAL_WORLD_SIZE": str(plan.world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
    )
    # The ranks share this host's cores (what torchrun does with OMP_NUM_THREADS).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.world_size))
    from ntkcl.engine.loop import run_training

    reporter = _RankReporter(report, messages) if rank == 0 else Reporter(enabled=False)
    try:
        result = run_training(config, out, resume_dir, reporter)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as error:
        code = 2 if isinstance(error, BadInputError) else 1
        known = isinstance(error, (BadInputError, RunFailedError))
        reason = str(error) if known else f"rank {rank} failed: {type(error).__name__}: {error}"
        messages.put(("failed", rank, (code, " ".join(reason.split()))))
        sys.exit(code)
    if rank == 0:
        messages.put(("done", rank, result))


@dataclass
class _Outcome:
    """What the ranks reported: rank 0's result and run folder, and each failure in arrival order."""

    result: object = None
    run_dir: str | None = None
    failures: dict[int, tuple[int, str]] = field(default_factory=dict)  # rank -> (exit code, message)

    def take(self, message) -> None:
        kind, rank, payload = message
        if kind == "run_dir":
            self.run_dir = payload
        elif kind == "done":
            self.result = payload
        elif kind == "failed":
            self.failures.setdefault(rank, payload)


def _drain(messages, outcome: _Outcome, wait_s: float = 0.0) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            outcome.take(messages.get(timeout=max(deadline - time.monotonic(), 0.01)))
        except queue.Empty:
            return


def _stop(processes, grace_s: float = GRACE_S) -> None:
    """Wait up to `grace_s` for the ranks to exit, then terminate (and if need be kill) the rest."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _first_failure(exit_codes: list[int | None], outcome: _Outcome) -> Exception | None:
    """The root cause: a rank that died without a word (its peers then only saw a broken connection),
    else the first error a rank reported. `exit_codes` are taken before the launcher stops anyone."""
    for rank, code in enumerate(exit_codes):
        if code not in (None, 0) and rank not in outcome.failures:
            return RunFailedError(f"rank {rank} {_exit_reason(code)}; the other ranks were stopped")
    for code, message in outcome.failures.values():
        return (BadInputError if code == 2 else RunFailedError)(message)
    return None


def _spawn(plan: LaunchPlan, config: RunConfig, out: Path, resume_dir: Path | None, reporter: Reporter):
    context = mp.get_context("spawn")
    messages = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_worker,
            args=(rank, plan, port, config, out, resume_dir, reporter.enabled, messages),
            name=f"ntkcl-rank-{rank}",
        )
        for rank in range(plan.world_size)
    ]
    for process in processes:
        process.start()
    outcome = _Outcome()
    try:
        while True:
            _drain(messages, outcome, POLL_S)
            reporter.run_dir = outcome.run_dir or reporter.run_dir
            exit_codes = [process.exitcode for process in processes]
            failed = outcome.failures or any(code not in (None, 0) for code in exit_codes)
            if failed or all(code == 0 for code in exit_codes):
                break
        if failed:
            # A moment for the failing rank's own message (or exit code) to arrive before the rest are stopped.
            _drain(messages, outcome, SETTLE_S)
            exit_codes = [process.exitcode for process in processes]
    except KeyboardInterrupt:
        _stop(processes)
        _drain(messages, outcome)
        reporter.run_dir = outcome.run_dir or reporter.run_dir
        raise
    finally:
        _stop(processes, grace_s=0.0 if outcome.failures else GRACE_S)
    _drain(messages, outcome)
    messages.close()
    reporter.run_dir = outcome.run_dir or reporter.run_dir
    failure = _first_failure(exit_codes, outcome)
    if failure is not None:
        raise failure
    if outcome.result is None:
        raise RunFailedError("rank 0 finished without reporting a result")
    return outcome.result
