"""Start a run on one process, one process per GPU of this host, N CPU processes, or inside torchrun's group.

`ntkcl train --gpus 0,1` (or `--nproc N`) starts one process per rank with torch.distributed.elastic
(`elastic_launch` with a c10d rendezvous on a port the OS assigns); under `torchrun` (or any launcher that
sets RANK and WORLD_SIZE) the same command joins the group it was started in instead. The global batch size
is the configured one in every case: each of N processes takes `batch_size / N` images per step.

When a rank fails (an exception, or killed by a signal), the elastic agent terminates the others at once
rather than leaving them waiting in a collective, and the command fails with one line naming the rank and
its error. Finished checkpoints and snapshots are written atomically by rank 0, so the last one stays
intact and `ntkcl train --resume` continues from it, with any number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ntkcl.config import DEVICE_PATTERN, RunConfig
from ntkcl.engine.distributed import launched_by_torchrun
from ntkcl.engine.progress import Reporter
from ntkcl.engine.tracking import check_trackers
from ntkcl.errors import BadInputError, RunFailedError

# How often the agent checks its ranks: a rank that dies is seen before its peers fail on the broken link.
MONITOR_S = 0.02
# Seconds the ranks get to stop on their own (rank 0 finishes its step and saves a snapshot) before SIGKILL.
SHUTDOWN_S = 30
QUEUE_WAIT_S = 0.05
# What the elastic agent handles by stopping the ranks with the same signal (restored afterwards). Not Ctrl+C:
# the terminal already sends it to every rank, and rank 0 would take a second one as "stop at once" instead
# of finishing its step and saving a snapshot; the launcher's KeyboardInterrupt stops the ranks with SIGTERM.
AGENT_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
SIGNALS_ENV = "TORCHELASTIC_SIGNALS_TO_HANDLE"


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
    check_trackers(runtime.log)
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
    reporter.checked()
    return _spawn(plan, config, out, resume_dir, reporter)


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


def _worker(config: RunConfig, out: Path, resume_dir: Path | None, report: bool, messages):
    """One rank started by the elastic agent (RANK, WORLD_SIZE, MASTER_ADDR/PORT set): train, report failures.

    Returns rank 0's RunResult (the agent hands it back to the launcher); a failure is put on `messages` as
    one line with its exit code before the rank exits with that code.
    """
    rank = int(os.environ["RANK"])
    # The ranks share this host's cores (what torchrun does with OMP_NUM_THREADS).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    from ntkcl.engine.loop import run_training

    reporter = _RankReporter(report, messages) if rank == 0 else Reporter(enabled=False)
    try:
        result = run_training(config, out, resume_dir, reporter)
    except KeyboardInterrupt:
        _exit_now(messages, 130)
    except BaseException as error:
        code = 2 if isinstance(error, BadInputError) else 1
        known = isinstance(error, (BadInputError, RunFailedError))
        reason = str(error) if known else f"rank {rank} failed: {type(error).__name__}: {error}"
        messages.put(("failed", rank, (code, " ".join(reason.split()))))
        _exit_now(messages, code)
    return result if rank == 0 else None


def _exit_now(messages, code: int) -> None:
    """Leave at once after the message is delivered: an orderly interpreter exit would first tear down the
    process group, which can wait on the peers this failure is about to stop, and the agent only sees a
    rank fail once its process has exited."""
    messages.close()
    messages.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class _Outcome:
    """What the ranks reported: the run folder and each failure in arrival order."""

    run_dir: str | None = None
    failures: dict[int, tuple[int, str]] = field(default_factory=dict)  # rank -> (exit code, message)

    def take(self, message) -> None:
        kind, rank, payload = message
        if kind == "run_dir":
            self.run_dir = payload
        elif kind == "failed":
            self.failures.setdefault(rank, payload)

    def drain(self, messages) -> None:
        while True:
            try:
                self.take(messages.get(timeout=QUEUE_WAIT_S))
            except queue.Empty:
                return


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _first_failure(exit_codes: dict[int, int], outcome: _Outcome) -> Exception:
    """The root cause: a rank that died without a word (its peers then only saw a broken connection),
    else the first error a rank reported. `exit_codes` are those of the ranks the agent saw fail."""
    for rank, code in sorted(exit_codes.items()):
        if rank not in outcome.failures:
            return RunFailedError(f"rank {rank} {_exit_reason(code)}; the other ranks were stopped")
    for code, message in outcome.failures.values():
        return (BadInputError if code == 2 else RunFailedError)(message)
    return RunFailedError("a rank failed without reporting why")


@contextlib.contextmanager
def _agent_quietly() -> Iterator[None]:
    """The elastic agent's log lines, signal handlers and signal setting stay inside the launch: failures
    are reported as one line by the launcher, and signals after the launch act as they did before."""
    names = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    loggers = [logging.getLogger(name) for name in names]
    silencer = logging.NullHandler()
    propagation = [logger.propagate for logger in loggers]
    handlers = {signum: signal.getsignal(signum) for signum in AGENT_SIGNALS}
    environment = os.environ.get(SIGNALS_ENV)
    for logger in loggers:
        logger.addHandler(silencer)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, propagate in zip(loggers, propagation):
            logger.removeHandler(silencer)
            logger.propagate = propagate
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if environment is None:
            os.environ.pop(SIGNALS_ENV, None)
        else:
            os.environ[SIGNALS_ENV] = environment


def _spawn(plan: LaunchPlan, config: RunConfig, out: Path, resume_dir: Path | None, reporter: Reporter):
    """Start one rank per process through torch.distributed.elastic and return rank 0's RunResult.

    The c10d rendezvous store listens on a port the OS assigns (127.0.0.1:0), which the agent hands to the
    ranks as MASTER_PORT, so no port is guessed. No restarts: a failed rank stops the group (the agent
    terminates the others) and the run continues with `--resume`.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    messages = mp.get_context("spawn").Queue()
    outcome = _Outcome()
    failed: ChildFailedError | None = None
    with tempfile.TemporaryDirectory(prefix="ntkcl-launch-") as logs, _agent_quietly():
        settings = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=plan.world_size,
            run_id=f"ntkcl-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",
            local_addr="127.0.0.1",
            max_restarts=0,
            monitor_interval=MONITOR_S,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=logs),
            shutdown_timeout=SHUTDOWN_S,
            signals_to_handle=",".join(signum.name for signum in AGENT_SIGNALS),
        )
        try:
            results = elastic_launch(settings, _worker)(config, out, resume_dir, reporter.enabled, messages)
        except ChildFailedError as error:
            failed = error
        except (KeyboardInterrupt, SignalException) as error:
            outcome.drain(messages)
            reporter.run_dir = outcome.run_dir or reporter.run_dir
            raise KeyboardInterrupt from error
    outcome.drain(messages)
    messages.close()
    reporter.run_dir = outcome.run_dir or reporter.run_dir
    if failed is not None:
        exit_codes = {rank: failure.exitcode for rank, failure in failed.failures.items()}
        raise _first_failure(exit_codes, outcome)
    return results[0]
