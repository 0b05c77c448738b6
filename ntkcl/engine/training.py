"""Training one task: epochs of optimizer steps over the task's images, with resumable in-task snapshots.

A step is one global batch of `optim.batch_size` images: each of W processes takes batch_size / W of them
and, with `optim.accumulation_steps` A, runs them as A micro-batches whose gradients add up before one
optimizer step (DDP synchronises on the last), so W and A change the memory a step needs, not the maths.
A method with several training stages (CL-LoRA's distillation and cross-entropy steps) takes one optimizer
update per stage within the step; the schedule counts steps.

Every `runtime.snapshot_epochs` epochs, and when Ctrl+C or SIGTERM arrives (after the step in progress),
rank 0 writes a snapshot: the method's training state (including this task's transient modules), the
optimizer and schedule, the position (epoch, step) and the epoch's running sums. The random streams are
functions of the position (`ntkcl.engine.seeding`), so a run resumed from a snapshot trains exactly as the
uninterrupted run did.

Batches come from either feed (`ntkcl.engine.feed`) through the same sampler; the step's phases (waiting for
data, forward and backward, optimizer) are timed by the task's `PhaseClock` and logged per epoch.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ntkcl.config import RunConfig
from ntkcl.data.loaders import EpochSampler, ImageDataset, SeededImages
from ntkcl.data.stream import Stream
from ntkcl.engine import rundir
from ntkcl.engine.distributed import DistributedContext
from ntkcl.engine.evaluate import autocast_for
from ntkcl.engine.feed import DeviceFeed
from ntkcl.engine.interrupt import StopRequest, ignore_interrupts
from ntkcl.engine.optim import TaskOptimization
from ntkcl.engine.phases import PhaseClock, data_wait_share
from ntkcl.engine.progress import Reporter
from ntkcl.engine.seeding import AUGMENTATION_STREAM, STEP_STREAM, derived_seed, seed_everything
from ntkcl.engine.tracking import Tracking
from ntkcl.errors import BadInputError, RunFailedError
from ntkcl.methods.base import ContinualMethod, TaskInfo

# A method's buffers are statistics every process computes identically (all-reduced): re-broadcasting them
# before every step would move, e.g., a ridge head's Gram matrix (800 MB at RanPAC's M = 10,000). torch 2.14
# renamed the switch (and deprecated the old name); older versions only know `broadcast_buffers`.
NO_BUFFER_SYNC_PER_STEP = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def per_process_batch(batch_size: int, world_size: int, accumulation_steps: int = 1) -> int:
    """The global batch size stays the configured one: each of N processes takes batch_size / N."""
    if batch_size % world_size:
        raise BadInputError(
            f"the global batch size {batch_size} is not divisible by the {world_size} processes; "
            f"give --batch-size a multiple of {world_size}"
        )
    if batch_size % (world_size * accumulation_steps):
        raise BadInputError(
            f"the global batch size {batch_size} does not split into {accumulation_steps} micro-batches on each of "
            f"{world_size} process(es); give --batch-size a multiple of {world_size * accumulation_steps}"
        )
    return batch_size // world_size


@dataclass(frozen=True)
class MicroBatch:
    """Rows [start, stop) of a rank's batch, of which the first `real` are not sampler padding."""

    start: int
    stop: int
    real: int
    step_images: int  # real images of the whole step over all ranks
    loss_weight: float
    batch_sum_weight: float


@dataclass(frozen=True)
class ShardedBatches:
    """Which images of each step are real under DistributedSampler(shuffle, drop_last=False).

    The sampler pads the shuffled indices to a multiple of the world size by repeating the first ones, and
    rank r takes padded positions r, r + W, r + 2W, ... Batch `step` of every rank together is then exactly
    positions [step * B, (step + 1) * B) of the padded order, the single-process batch, plus the padding
    that falls in the last step. Dropping that padding and weighting each rank's mean loss by its share of
    the real images makes DDP's gradient average the single-process batch mean, for any number of processes.
    """

    size: int  # images of the task
    batch_size: int  # global
    world_size: int
    rank: int

    def real_on_rank(self, step: int) -> int:
        """Real (non-padding) images at the front of this rank's batch `step`."""
        per_process = self.batch_size // self.world_size
        owned = (self.size - self.rank + self.world_size - 1) // self.world_size
        return max(0, min((step + 1) * per_process, owned) - step * per_process)

    def real_in_step(self, step: int) -> int:
        return min(self.batch_size, self.size - step * self.batch_size)

    def loss_weight(self, step: int) -> float:
        """Factor on this rank's mean loss so that DDP's average over ranks is the mean over the step's images."""
        return self.world_size * self.real_on_rank(step) / self.real_in_step(step)

    def batch_sum_weight(self, step: int) -> float:
        """Factor on this rank's batch-summed terms so that DDP's average over ranks is the step's sum."""
        return self.world_size if self.real_on_rank(step) else 0.0

    def micro_batches(self, step: int, loaded: int, accumulation_steps: int) -> list[MicroBatch]:
        """This rank's `loaded` images of `step` as micro-batches of batch_size / (W * A) images.

        The weights generalise `loss_weight` / `batch_sum_weight` to a part of the rank's batch; a part that
        is all padding keeps one image with weight 0, so every rank runs the same forward and backward passes.
        """
        size = self.batch_size // (self.world_size * accumulation_steps)
        real, step_images = self.real_on_rank(step), self.real_in_step(step)
        parts = []
        for start in range(0, loaded, size):
            part_real = min(max(real - start, 0), min(size, loaded - start))
            parts.append(
                MicroBatch(
                    start=start,
                    stop=start + max(part_real, 1),
                    real=part_real,
                    step_images=step_images,
                    loss_weight=self.world_size * part_real / step_images,
                    batch_sum_weight=self.world_size if part_real else 0.0,
                )
            )
        return parts


def training_state(method: ContinualMethod) -> dict[str, torch.Tensor]:
    """Every tensor of the method that training may change: its state dict without the frozen backbone."""
    trainable_backbone = {f"backbone.{name}" for name, p in method.backbone.named_parameters() if p.requires_grad}
    return {
        key: value.detach().to("cpu", copy=True)
        for key, value in method.state_dict().items()
        if not key.startswith("backbone.") or key in trainable_backbone
    }


def train_step(
    model: torch.nn.Module,
    method: ContinualMethod,
    optimization: TaskOptimization,
    images: torch.Tensor,
    labels: torch.Tensor,
    parts: list[MicroBatch],
    device: torch.device,
    precision: str,
    clock: PhaseClock | None = None,
) -> dict[str, torch.Tensor]:
    """One step over this rank's batch; returns the logged terms summed over its real images (and stages).

    For each of the method's `training_stages` (one for most methods, see `ntkcl.methods.base`): each
    micro-batch is forwarded through `model` with the stage's name and back-propagated with its weights (DDP
    synchronises gradients on the last one only), the method adjusts the gradients, and `optimization.update()`
    clips and updates. The schedule then advances once for the whole batch. With a `clock`, the passes are
    timed as `forward_backward` and the rest as `optimizer`.
    """

    def timed(name: str) -> contextlib.AbstractContextManager:
        return clock.phase(name) if clock is not None else contextlib.nullcontext()

    sums: dict[str, torch.Tensor] = {}
    for stage in method.training_stages():
        with timed("optimizer"):
            optimization.optimizer.zero_grad(set_to_none=True)
        with timed("forward_backward"):
            sums = _forward_backward(model, stage, images, labels, parts, device, precision, sums)
        with timed("optimizer"):
            method.adjust_gradients(stage)
            optimization.update()
    with timed("optimizer"):
        optimization.end_step()
    return sums


def _forward_backward(model, stage, images, labels, parts: list[MicroBatch], device, precision, sums: dict) -> dict:
    """Forward and back-propagate each micro-batch of one stage; adds its logged terms to `sums`."""
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else None
        with no_sync or contextlib.nullcontext():
            part_images = images[part.start : part.stop].to(device, non_blocking=True)
            part_labels = labels[part.start : part.stop].to(device, non_blocking=True)
            with autocast_for(device, precision):
                loss, batch_sum, logs = model(part_images, part_labels, stage)
            (loss * part.loss_weight + batch_sum * part.batch_sum_weight).backward()
        # Logged per image like the mean terms: the part's sum spread over the step's real images.
        part_loss = loss.detach() + batch_sum.detach() * part.step_images / len(part_labels)
        for key, value in {"loss": part_loss, **logs}.items():
            value = value.detach().float() * part.real if part.real else torch.zeros((), device=device)
            sums[key] = sums[key] + value if key in sums else value
    return sums


@dataclass
class Progress:
    """Where training of a task stands: `step` optimizer steps done in `epoch`, sums of the epoch so far."""

    epoch: int = 0
    step: int = 0
    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch_lr: float | None = None
    history: list[dict] = field(default_factory=list)


class TaskTraining:
    """Trains the current task of a run (or continues it from a snapshot); rank 0 writes snapshots and logs."""

    def __init__(
        self,
        method: ContinualMethod,
        task: TaskInfo,
        stream: Stream,
        transform,
        config: RunConfig,
        ctx: DistributedContext,
        reporter: Reporter,
        tracking: Tracking,
        run_dir: Path,
        clock: PhaseClock,
        feed: DeviceFeed | None = None,
    ):
        self.method, self.task, self.config, self.ctx = method, task, config, ctx
        self.reporter, self.tracking, self.run_dir = reporter, tracking, run_dir
        self.clock, self.feed = clock, feed
        settings, seed = config.optim, config.runtime.seed
        self.per_process = per_process_batch(settings.batch_size, ctx.world_size, settings.accumulation_steps)
        self.indices = stream.train_indices(task)
        self.dataset = SeededImages(ImageDataset(stream.train, transform), self.indices.tolist())
        self.sampler = EpochSampler(
            self.dataset,
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            seed=derived_seed(seed, task.index),
            augmentation_seed=derived_seed(AUGMENTATION_STREAM, seed, task.index),
        )
        workers = config.runtime.num_workers
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.per_process,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=ctx.device.type == "cuda",
            persistent_workers=workers > 0 and feed is None,
            worker_init_fn=ignore_interrupts if workers > 0 else None,
            generator=torch.Generator(),  # its workers' base seed must not move the global generator
        )
        self.shards = ShardedBatches(len(self.dataset), settings.batch_size, ctx.world_size, ctx.rank)
        updates_per_epoch = math.ceil(self.sampler.num_samples / self.per_process)
        self.epochs = settings.epochs_of(task.index)
        self.optimization = TaskOptimization.build(method, settings, updates_per_epoch, self.epochs)

    def _restore(self, snapshot: Path) -> Progress:
        position, state = rundir.load_snapshot(snapshot)
        expected = set(training_state(self.method))
        if set(state["method"]) != expected:
            raise BadInputError(f"snapshot {snapshot} does not fit method {self.method.name}; remove it to retrain")
        self.method.load_state_dict(state["method"], strict=False)
        self.optimization.load_state_dict(state["optimization"])
        totals = {key: value.to(self.ctx.device) for key, value in state["totals"].items()}
        return Progress(position["epoch"], position["step"], totals, position["epoch_lr"], position["history"])

    def _save_snapshot(self, progress: Progress, interrupted: bool = False) -> None:
        if not self.ctx.is_main:
            return
        with self.clock.phase("checkpoint"):
            self._write_snapshot(progress, interrupted)

    def _write_snapshot(self, progress: Progress, interrupted: bool) -> None:
        position = {
            "task": self.task.index,
            "epoch": progress.epoch,
            "step": progress.step,
            "updates": self.optimization.updates,
            "epoch_lr": progress.epoch_lr,
            "history": progress.history,
        }
        state = {
            "method": training_state(self.method),
            "optimization": self.optimization.state_dict(),
            "totals": {key: value.detach().cpu() for key, value in progress.totals.items()},
        }
        path = rundir.save_snapshot(self.run_dir, position, state)
        # The routine per-epoch snapshot is a detail; the one a signal asked for is the news.
        (self.reporter.message if interrupted else self.reporter.detail)(f"saved snapshot {path.name}")

    def run(self, snapshot: Path | None = None) -> list[dict]:
        """Train the remaining epochs; returns one log record per epoch of the task."""
        method, ctx = self.method, self.ctx
        progress = Progress()
        if snapshot is not None:
            with self.clock.phase("checkpoint"):
                progress = self._restore(snapshot)
        model = method
        if ctx.enabled:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            model = DistributedDataParallel(
                method, device_ids=device_ids, find_unused_parameters=True, **NO_BUFFER_SYNC_PER_STEP
            )
        with StopRequest(handles=ctx.is_main) as stop:
            while progress.epoch < self.epochs:
                if progress.step == 0:  # a new epoch, not one resumed in the middle
                    progress.epoch_lr = self.optimization.learning_rate
                self._train_epoch(model, progress, stop)
                self._end_epoch(progress)
        return progress.history

    def _batches(self):
        """This epoch's batches from the sampler's position on, from the configured feed."""
        if self.feed is None:
            return iter(self.loader)
        return self.feed.training_batches(self.indices, self.sampler, self.per_process)

    def _train_epoch(self, model, progress: Progress, stop: StopRequest) -> None:
        """The steps of `progress.epoch` from `progress.step` on."""
        method, ctx, config, task, clock = self.method, self.ctx, self.config, self.task, self.clock
        method.train()
        first_step = progress.step
        self.sampler.set_position(progress.epoch, skip=first_step * self.per_process)
        label = f"task {task.index + 1}/{task.num_tasks} epoch {progress.epoch + 1}/{self.epochs}"
        self.reporter.start_epoch(label, len(self.loader))
        self._epoch_mark, self._epoch_started = clock.mark(), time.perf_counter()
        batches, step = self._batches(), first_step
        while True:
            with clock.phase("data_wait"):
                batch = next(batches, None)
            if batch is None:
                break
            images, labels = batch
            seed_everything(derived_seed(STEP_STREAM, config.runtime.seed, task.index, progress.epoch, step, ctx.rank))
            parts = self.shards.micro_batches(step, len(labels), config.optim.accumulation_steps)
            sums = train_step(
                model,
                self.method,
                self.optimization,
                images,
                labels,
                parts,
                ctx.device,
                config.runtime.precision,
                clock,
            )
            for key, value in sums.items():
                progress.totals[key] = progress.totals[key] + value if key in progress.totals else value
            progress.step = step + 1
            self.reporter.advance(self.shards.real_in_step(step))
            if stop.requested:
                self.reporter.end_epoch("interrupted")
                self._save_snapshot(progress, interrupted=True)
                raise KeyboardInterrupt
            step += 1

    def _end_epoch(self, progress: Progress) -> None:
        ctx, task, epoch = self.ctx, self.task, progress.epoch
        self.optimization.epoch_end(epoch + 1)
        # Image-weighted epoch means: the same numbers for any number of processes.
        size = len(self.dataset)
        means = {key: (ctx.all_reduce_sum(value.clone()) / size).item() for key, value in progress.totals.items()}
        if not math.isfinite(means["loss"]):
            raise RunFailedError(f"the loss became {means['loss']} in task {task.index} epoch {epoch}")
        phases = self.clock.since(self._epoch_mark, time.perf_counter() - self._epoch_started)
        summary = ", ".join(f"{key} {value:.4f}" for key, value in sorted(means.items()))
        rate = self.reporter.end_epoch(f"{summary}, data wait {data_wait_share(phases):.0%}")
        record = {"task": task.index, "epoch": epoch, "lr": progress.epoch_lr, **means, "images_per_s": rate}
        progress.history.append(record)
        if ctx.is_main:
            rundir.append_log(self.run_dir, {"event": "epoch_end", **record, "phases": phases})
            self.tracking.epoch_end(record, task.index * self.config.optim.epochs + epoch + 1)
        progress.epoch, progress.step, progress.totals = epoch + 1, 0, {}
        every = self.config.runtime.snapshot_epochs
        if every and (epoch + 1) % every == 0:
            self._save_snapshot(progress)
