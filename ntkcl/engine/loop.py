"""The task loop.

For every task: reseed, `begin_task`, `prepare_task` on the task's images, train with a new optimizer and
cosine schedule (stepped per epoch) on the task's own data, `end_task` statistics, evaluate
(`ntkcl.engine.evaluate`: all seen classes, or each task among its own classes, every task for a zero-shot
method, which is also scored once before the first task), then write an atomic checkpoint and the metrics so
far. Seeds are derived from (run seed, task index[, rank]), so a run resumed after task k
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import timm
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

import ntkcl
from ntkcl.config import OptimConfig, RunConfig, save_config
from ntkcl.data.loaders import ImageDataset
from ntkcl.data.scenarios import CLASS_INCREMENTAL
from ntkcl.data.stream import Stream
from ntkcl.data.transforms import build_transforms
from ntkcl.engine import rundir
from ntkcl.engine.builders import StreamProvenance, build_backbone, build_method, build_stream
from ntkcl.engine.distributed import DistributedContext
from ntkcl.engine.evaluate import ScoringLoader, TaskImages, autocast_for, evaluate, evaluates_untrained_tasks
from ntkcl.engine.metrics import AccuracyMatrix
from ntkcl.engine.progress import Reporter
from ntkcl.errors import BadInputError, RunFailedError
from ntkcl.files import atomic_write_text
from ntkcl.methods.base import ContinualMethod, TaskInfo


@dataclass
class RunResult:
    """What a run hands back; only rank 0's carries the metrics (`main_process`)."""

    run_dir: Path
    matrix: AccuracyMatrix
    metrics: dict
    finished: bool
    main_process: bool = True


def derived_seed(*keys: int) -> int:
    """A 32-bit seed from a tuple of integers (run seed, task, rank...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(groups: list[dict], settings: OptimConfig) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    optimizer = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.AdamW
    return optimizer(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimConfig):
    if settings.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs, eta_min=settings.min_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def per_process_batch(batch_size: int, world_size: int) -> int:
    """The global batch size stays the configured one: each of N processes takes batch_size / N."""
    if batch_size % world_size:
        raise BadInputError(
            f"the global batch size {batch_size} is not divisible by the {world_size} processes; "
            f"give --batch-size a multiple of {world_size}"
        )
    return batch_size // world_size


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


def start_run(config: RunConfig, out: Path, ctx: DistributedContext) -> Path:
    """Rank 0 creates the run folder and writes config.json; every rank gets its path."""
    path = None
    if ctx.is_main:
        path = rundir.new_run_dir(out, config.stream.dataset, config.method.name)
        save_config(config, path / rundir.CONFIG_FILE)
    return Path(ctx.broadcast_object(str(path) if path else None))


def run_record(config: RunConfig, stream: Stream, provenance: StreamProvenance, backbone, ctx) -> dict:
    device = ctx.device
    return {
        "started_at": datetime.now(timezone.utc).isoformat(),
        "command": sys.argv,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
            "ntkcl": ntkcl.__version__,
        },
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "world_size": ctx.world_size,
        "backbone": {"name": backbone.name, "weights_sha256": backbone.weights_sha256},
        "dataset": provenance.record(),
        "scenario": stream.scenario,
        "task_datasets": stream.task_datasets,
        "class_order": stream.order,
        "class_names": stream.class_names,
        "task_sizes": stream.sizes,
        "seeds": {"training": config.runtime.seed, "class_order": config.stream.class_order_seed},
    }


class Trainer:
    """Runs (or resumes) the task loop of one run directory."""

    def __init__(self, config: RunConfig, run_dir: Path, ctx: DistributedContext, reporter: Reporter):
        self.config = config
        self.run_dir = run_dir
        self.ctx = ctx
        self.reporter = reporter if ctx.is_main else Reporter(enabled=False)
        self.stream, self.provenance = build_stream(config, ctx)
        self.backbone = build_backbone(config).to(ctx.device)
        # The method's initial weights depend on the run seed alone, not on what the process did before.
        seed_everything(derived_seed(config.runtime.seed))
        self.method: ContinualMethod = build_method(config, self.backbone).to(ctx.device)
        self.method.begin_stream(self.stream.tasks())
        if ctx.enabled and not self.method.supports_distributed:
            raise BadInputError(f"method {self.method.name} does not support distributed training; use one process")
        self.train_transform, test_transform = build_transforms(config.stream.augment, self.backbone.img_size)
        self.scoring = ScoringLoader.for_run(config, self.stream, test_transform, ctx)
        self.record = run_record(config, self.stream, self.provenance, self.backbone, ctx)
        self.zero_shot: list[tuple[int, int]] | None = None

    def _restore(self) -> list[list[tuple[int, int]]]:
        """Load the last finished checkpoint; return the accuracy rows of the finished tasks."""
        checkpoints = rundir.finished_checkpoints(self.run_dir)
        expected = [rundir.checkpoint_dir(self.run_dir, i).name for i in range(len(checkpoints))]
        if [p.name for p in checkpoints] != expected:
            raise BadInputError(f"{self.run_dir} has non-contiguous checkpoints {[p.name for p in checkpoints]}")
        if not checkpoints:
            return []
        saved = rundir.read_json(self.run_dir / rundir.RUN_FILE)
        if saved["backbone"]["weights_sha256"] != self.backbone.weights_sha256:
            raise BadInputError("the backbone weights differ from the ones this run started with (sha256 mismatch)")
        if saved["class_order"] != self.stream.order:
            raise BadInputError("the class order differs from the one this run started with")
        if saved["dataset"]["manifest_sha256"] != self.provenance.sha256:
            raise BadInputError("the data differs from the one this run started with (manifest sha256 mismatch)")
        rows = [[tuple(pair) for pair in rundir.read_json(p / rundir.TASK_FILE)["counts"]] for p in checkpoints]
        state, _ = rundir.load_checkpoint(checkpoints[-1])
        self.method.load_learned_state(state, self.stream.tasks()[: len(checkpoints)])
        self.method.to(self.ctx.device)
        return rows

    def run(self, resume: bool = False) -> RunResult:
        ctx = self.ctx
        if ctx.is_main and not resume:
            rundir.write_json(self.run_dir / rundir.RUN_FILE, self.record)
            if self.provenance.train_files is not None:
                atomic_write_text(self.run_dir / rundir.TRAIN_FILES_FILE, self.provenance.train_files_text())
        if evaluates_untrained_tasks(self.method, self.stream):
            self.zero_shot = self._zero_shot_row()  # before any saved state is loaded
        rows = self._restore() if resume else []
        started = time.perf_counter()
        if resume and rows:
            self.reporter.message(f"resuming {self.run_dir.name} after task {len(rows)}/{self.stream.num_tasks}")
        for task in self.stream.tasks()[len(rows) :]:
            rows.append(self._run_task(task))
        matrix = AccuracyMatrix.from_rows(rows, self.zero_shot) if rows else None
        metrics = {}
        if ctx.is_main and matrix is not None:
            metrics = rundir.write_metrics(
                self.run_dir,
                matrix,
                finished=True,
                extra={"wall_time_s_last_session": time.perf_counter() - started},
            )
        ctx.barrier()
        return RunResult(self.run_dir, matrix, metrics, finished=True, main_process=ctx.is_main)

    def _zero_shot_row(self) -> list[tuple[int, int]]:
        """Every task scored before the first is trained: computed once, kept in the run folder for resumes."""
        path = self.run_dir / rundir.ZERO_SHOT_FILE
        if path.is_file():
            return [tuple(pair) for pair in rundir.read_json(path)["counts"]]
        counts = evaluate(self.method, self.scoring, None)
        if self.ctx.is_main:
            rundir.write_json(path, {"counts": counts})
            scores = ", ".join(f"{100.0 * c / n:.2f}" for c, n in counts)
            self.reporter.message(f"zero-shot accuracy of each task before training: {scores}")
        self.ctx.barrier()
        return counts

    def _run_task(self, task: TaskInfo) -> list[tuple[int, int]]:
        ctx, config = self.ctx, self.config
        started = time.perf_counter()
        seed_everything(derived_seed(config.runtime.seed, task.index))
        self.method.begin_task(task)
        self.method.to(ctx.device)
        # Before the per-rank seed: a data-dependent initialisation must draw the same numbers on every rank.
        with autocast_for(ctx.device, config.runtime.precision):
            self.method.prepare_task(task, TaskImages(self.scoring, task))
        seed_everything(derived_seed(config.runtime.seed, task.index, 1 + ctx.rank))
        epochs = self._train(task)
        self.method.eval()
        with torch.no_grad(), autocast_for(ctx.device, config.runtime.precision):
            self.method.end_task(task, TaskImages(self.scoring, task))
        counts = evaluate(self.method, self.scoring, task)
        seconds = time.perf_counter() - started
        if ctx.is_main:
            record = {"task": task.index, "counts": counts, "epochs": epochs, "seconds": seconds}
            rundir.save_checkpoint(self.run_dir, task.index, self.method.learned_state(), record)
            rundir.append_log(self.run_dir, {"event": "task_end", **record})
            matrix = AccuracyMatrix.from_rows(self._rows_so_far(task, counts), self.zero_shot)
            rundir.write_metrics(self.run_dir, matrix, finished=task.is_last)
            seen = matrix.all_seen_accuracy()[-1]
            scope = (
                f"{task.total_classes} seen classes"
                if task.scenario == CLASS_INCREMENTAL
                else f"{task.index + 1} seen tasks, each among its own classes,"
            )
            self.reporter.message(
                f"task {task.index + 1}/{task.num_tasks}: accuracy on {scope} {seen:.2f}% ({seconds:.1f}s)"
            )
        ctx.barrier()
        return counts

    def _rows_so_far(self, task: TaskInfo, counts: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        rows = [
            [
                tuple(pair)
                for pair in rundir.read_json(rundir.checkpoint_dir(self.run_dir, i) / rundir.TASK_FILE)["counts"]
            ]
            for i in range(task.index)
        ]
        return [*rows, counts]

    def _train(self, task: TaskInfo) -> list[dict]:
        """Train the current task; returns one log record per epoch."""
        ctx, config, method = self.ctx, self.config, self.method
        trainable = [p for p in method.parameters() if p.requires_grad]
        if not trainable or config.optim.epochs == 0:
            return []
        dataset = Subset(
            ImageDataset(self.stream.train, self.train_transform), self.stream.train_indices(task).tolist()
        )
        sampler = DistributedSampler(
            dataset,
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=True,
            seed=derived_seed(config.runtime.seed, task.index),
        )
        loader = DataLoader(
            dataset,
            batch_size=per_process_batch(config.optim.batch_size, ctx.world_size),
            sampler=sampler,
            num_workers=config.runtime.num_workers,
            pin_memory=ctx.device.type == "cuda",
            persistent_workers=config.runtime.num_workers > 0,
            generator=torch.Generator().manual_seed(derived_seed(config.runtime.seed, task.index, 1 + ctx.rank)),
        )
        model = method
        if ctx.enabled:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            model = DistributedDataParallel(method, device_ids=device_ids, find_unused_parameters=True)
        shards = ShardedBatches(len(dataset), config.optim.batch_size, ctx.world_size, ctx.rank)
        optimizer = build_optimizer(method.parameter_groups(), config.optim)
        scheduler = build_scheduler(optimizer, config.optim)
        history = []
        for epoch in range(config.optim.epochs):
            method.train()
            sampler.set_epoch(epoch)
            learning_rate = optimizer.param_groups[0]["lr"]
            totals: dict[str, torch.Tensor] = {}
            label = f"task {task.index + 1}/{task.num_tasks} epoch {epoch + 1}/{config.optim.epochs}"
            self.reporter.start_epoch(label, len(loader))
            for step, (images, labels) in enumerate(loader):
                real = shards.real_on_rank(step)
                # A rank whose batch is all padding still takes part in DDP's all-reduce, with weight 0.
                keep = max(real, 1)
                images = images[:keep].to(ctx.device, non_blocking=True)
                labels = labels[:keep].to(ctx.device, non_blocking=True)
                with autocast_for(ctx.device, config.runtime.precision):
                    loss, batch_sum, logs = model(images, labels)
                optimizer.zero_grad(set_to_none=True)
                (loss * shards.loss_weight(step) + batch_sum * shards.batch_sum_weight(step)).backward()
                optimizer.step()
                # Logged per image like the mean terms: the rank's sum spread over the step's real images.
                step_loss = loss.detach() + batch_sum.detach() * shards.real_in_step(step) / keep
                for key, value in {"loss": step_loss, **logs}.items():
                    value = value.detach().float() * real if real else torch.zeros((), device=ctx.device)
                    totals[key] = totals.get(key, 0.0) + value
                self.reporter.advance(shards.real_in_step(step))
            scheduler.step()
            # Image-weighted epoch means: the same numbers for any number of processes.
            means = {key: (ctx.all_reduce_sum(value.clone()) / len(dataset)).item() for key, value in totals.items()}
            if not math.isfinite(means["loss"]):
                raise RunFailedError(f"the loss became {means['loss']} in task {task.index} epoch {epoch}")
            summary = ", ".join(f"{key} {value:.4f}" for key, value in sorted(means.items()))
            rate = self.reporter.end_epoch(summary)
            record = {"task": task.index, "epoch": epoch, "lr": learning_rate, **means, "images_per_s": rate}
            history.append(record)
            if ctx.is_main:
                rundir.append_log(self.run_dir, {"event": "epoch_end", **record})
        return history


def run_training(config: RunConfig, out: Path, resume_dir: Path | None, reporter: Reporter) -> RunResult:
    """Train a new run under `out`, or continue `resume_dir`, in this process (one rank of a group or alone).

    In a group, an error is re-raised with the rank that raised it, so the launcher (or torchrun's log)
    names where a run failed. The group is left as it is on failure: closing it would make the other
    ranks fail on the broken connection before this rank's own error is reported.
    """
    from ntkcl.engine.distributed import init_distributed, shutdown_distributed

    try:
        ctx = init_distributed(config.runtime.device, config.runtime.gpus)
        run_dir = resume_dir if resume_dir is not None else start_run(config, out, ctx)
        reporter.run_dir = run_dir
        trainer = Trainer(config, run_dir, ctx, reporter)
        result = trainer.run(resume=resume_dir is not None)
    except Exception as error:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        known = isinstance(error, (BadInputError, RunFailedError))
        reason = " ".join((str(error) if known else f"{type(error).__name__}: {error}").split())
        labelled = BadInputError if isinstance(error, BadInputError) else RunFailedError
        raise labelled(f"rank {os.environ.get('RANK', '?')} failed: {reason}") from error
    shutdown_distributed()
    return result
