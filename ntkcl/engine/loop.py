"""The task loop.

For every task: reseed, `begin_task`, `prepare_task` on the task's images, train on the task's own data
(`ntkcl.engine.training`: a new optimizer and schedule per task, in-task snapshots), `end_task`
statistics, evaluate (`ntkcl.engine.evaluate`: all seen classes, or each task among its own classes, every
task for a zero-shot method, which is also scored once before the first task), then write an atomic
checkpoint and the metrics so far, and drop the task's snapshots. Seeds are derived from the run seed and
the position (`ntkcl.engine.seeding`), so a run resumed after task k, or from a snapshot inside task k,
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import timm
import torch

import ntkcl
from ntkcl.config import RunConfig, save_config
from ntkcl.data.scenarios import CLASS_INCREMENTAL
from ntkcl.data.stream import Stream
from ntkcl.engine import rundir
from ntkcl.engine.builders import StreamProvenance, build_run_transforms, data_root
from ntkcl.engine.compile import compile_method, compile_seconds, plan_compilation
from ntkcl.engine.distributed import DistributedContext
from ntkcl.engine.evaluate import ScoringLoader, TaskImages, autocast_for, evaluate, evaluates_untrained_tasks
from ntkcl.engine.feed import DEVICE, DeviceFeed, choose_feed
from ntkcl.engine.metrics import AccuracyMatrix
from ntkcl.engine.phases import PhaseClock
from ntkcl.engine.preflight import RunParts, prepare_run
from ntkcl.engine.progress import Reporter
from ntkcl.engine.reference import (
    has_reference,
    read_cached_reference,
    reference_cache_file,
    reference_identity,
    reference_matrix,
    reference_summary,
    write_cached_reference,
)
from ntkcl.engine.run_reader import read_run_folder
from ntkcl.engine.seeding import derived_seed, seed_everything
from ntkcl.engine.tracking import Tracking
from ntkcl.engine.training import TaskTraining, per_process_batch
from ntkcl.errors import BadInputError, RunFailedError
from ntkcl.files import atomic_write_text, remove_interrupted_writes
from ntkcl.methods.base import TaskInfo


@dataclass
class RunResult:
    """What a run hands back; only rank 0's carries the metrics (`main_process`)."""

    run_dir: Path
    matrix: AccuracyMatrix
    metrics: dict
    finished: bool
    main_process: bool = True


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
        "backbone": backbone.record(),
        "dataset": provenance.record(),
        "scenario": stream.scenario,
        "task_datasets": stream.task_datasets,
        "class_order": stream.order,
        "class_names": stream.class_names,
        "task_sizes": stream.sizes,
        "tasks": [dataclasses.asdict(task) for task in stream.tasks()],
        "seeds": {"training": config.runtime.seed, "class_order": config.stream.class_order_seed},
    }


class Trainer:
    """Runs (or resumes) the task loop of one run directory."""

    def __init__(self, config: RunConfig, run_dir: Path, ctx: DistributedContext, reporter: Reporter, parts: RunParts):
        self.config = config
        self.run_dir = run_dir
        self.ctx = ctx
        self.reporter = reporter if ctx.is_main else Reporter(enabled=False)
        self.stream, self.provenance = parts.stream, parts.provenance
        self.backbone, self.method = parts.backbone, parts.method
        optim = config.optim
        micro_batch = per_process_batch(optim.batch_size, ctx.world_size, optim.accumulation_steps)
        micro_batch //= optim.accumulation_steps
        self.compile_plan = plan_compilation(
            config.runtime.compile,
            ctx.device,
            self._full_training_steps(),
            ctx.enabled,
            (micro_batch, optim.eval_batch_size),
        )
        self.compiled = compile_method(self.method, self.compile_plan, self.reporter.message)
        self.train_transform, test_transform = build_run_transforms(config, self.backbone)
        self.feed_choice = choose_feed(config, self.stream, ctx.device)
        self.feed = None
        if self.feed_choice.feed == DEVICE:
            self.feed = DeviceFeed.build(config, self.stream, ctx, data_root(config), self.backbone.img_size)
        self.scoring = ScoringLoader.for_run(config, self.stream, test_transform, ctx, self.feed, self.reporter)
        self.record = run_record(config, self.stream, self.provenance, self.backbone, ctx)
        self.zero_shot: list[tuple[int, int]] | None = None
        self.tracking = Tracking([], run_dir, {})

    def _full_training_steps(self) -> int:
        """Optimizer steps of the whole run with a full batch (what compilation can speed up)."""
        optim = self.config.optim
        images = [len(self.stream.train_indices(task)) for task in self.stream.tasks()]
        return sum(optim.epochs * (count // optim.batch_size) for count in images)

    def _restore(self) -> list[dict]:
        """Load the last finished checkpoint of the validated run folder; return the finished tasks' records."""
        run = read_run_folder(self.run_dir, started=False)
        for note in run.notes:
            self.reporter.message(note)
        if not run.checkpoints:
            return []
        saved = run.record
        if saved["backbone"]["weights_sha256"] != self.backbone.weights_sha256:
            raise BadInputError("the backbone weights differ from the ones this run started with (sha256 mismatch)")
        if saved["class_order"] != self.stream.order:
            raise BadInputError("the class order differs from the one this run started with")
        if saved["dataset"]["manifest_sha256"] != self.provenance.sha256:
            raise BadInputError("the data differs from the one this run started with (manifest sha256 mismatch)")
        last = run.finished_tasks - 1
        try:
            self.method.load_learned_state(run.load_state(last), self.stream.tasks()[: last + 1])
        except BadInputError as error:
            raise run.damaged(run.checkpoints[last] / rundir.STATE_FILE, str(error), last) from error
        self.method.to(self.ctx.device)
        return run.task_records

    def run(self, resume: bool = False) -> RunResult:
        trackers = self.config.runtime.log if self.ctx.is_main else []
        self.tracking = Tracking(trackers, self.run_dir, self.config.model_dump(mode="json"))
        try:
            return self._run(resume)
        finally:
            self.tracking.close()

    def _run(self, resume: bool) -> RunResult:
        ctx = self.ctx
        if resume and ctx.is_main:
            remove_interrupted_writes(self.run_dir)
        # A resumed run that was stopped before run.json was written starts again from its config.json.
        if ctx.is_main and not (self.run_dir / rundir.RUN_FILE).is_file():
            rundir.write_json(self.run_dir / rundir.RUN_FILE, self.record)
            if self.provenance.train_files is not None:
                atomic_write_text(self.run_dir / rundir.TRAIN_FILES_FILE, self.provenance.train_files_text())
        if ctx.is_main:
            plan = self.compile_plan
            event = {"event": "compile", "enabled": plan.enabled, "reason": plan.reason, "targets": self.compiled}
            rundir.append_log(self.run_dir, {**event, "mode": plan.mode} if plan.enabled else event)
            rundir.append_log(self.run_dir, {"event": "feed", **dataclasses.asdict(self.feed_choice)})
            self.reporter.message(f"data feed: {self.feed_choice.feed} ({self.feed_choice.reason})")
        if evaluates_untrained_tasks(self.method, self.stream):
            self.zero_shot = self._zero_shot_row()  # before any saved state is loaded
        # Before any saved state is loaded, so a method's merged weight deltas are not in the reference's features.
        wanted = self.config.runtime.no_training_reference and has_reference(self.method, self.scoring)
        reference = self._no_training_reference() if wanted else None
        records = self._restore() if resume else []
        started = time.perf_counter()
        snapshot = rundir.latest_snapshot(self.run_dir, len(records)) if resume else None
        if snapshot is not None:
            self.reporter.message(f"resuming {self.run_dir.name} from snapshot {snapshot.name}")
        elif resume and records:
            self.reporter.message(f"resuming {self.run_dir.name} after task {len(records)}/{self.stream.num_tasks}")
        first = len(records)  # only the first task trained in this session can continue from a snapshot
        for task in self.stream.tasks()[first:]:
            records.append(self._run_task(task, snapshot if task.index == first else None, records))
        matrix = self._matrix(records) if records else None
        metrics = {}
        if ctx.is_main and matrix is not None:
            extra = {"wall_time_s_last_session": time.perf_counter() - started}
            if reference is not None:
                extra["no_training_reference"] = reference
            metrics = self._write_metrics(records, finished=True, extra=extra)
        ctx.barrier()
        return RunResult(self.run_dir, matrix, metrics, finished=True, main_process=ctx.is_main)

    def _matrix(self, records: list[dict]) -> AccuracyMatrix:
        return AccuracyMatrix.from_rows([record["counts"] for record in records], self.zero_shot)

    def _write_metrics(self, records: list[dict], finished: bool, extra: dict | None = None) -> dict:
        return rundir.write_task_metrics(self.run_dir, records, self.zero_shot, finished, extra)

    def _no_training_reference(self) -> dict:
        """SimpleCIL's A_T and forgetting on this run's backbone and stream (`ntkcl.engine.reference`), from the
        data root's cache when an earlier run computed it for the same identity."""
        ctx, started = self.ctx, time.perf_counter()
        identity = reference_identity(self.config, self.record)
        cache = reference_cache_file(data_root(self.config), identity)
        # Rank 0 decides, so every process takes the same path (computing it is collective).
        cached = ctx.broadcast_object(read_cached_reference(cache, identity) if ctx.is_main else None)
        matrix = reference_matrix(self.backbone, self.scoring) if cached is None else cached
        if ctx.is_main and cached is None:
            try:
                write_cached_reference(cache, identity, matrix)
            except OSError as error:  # a read-only data root costs the cache, not the run
                self.reporter.message(f"no-training reference not cached ({error.strerror}: {cache.parent})")
        summary = reference_summary(matrix)
        how = "cached" if cached is not None else f"{time.perf_counter() - started:.1f}s"
        self.reporter.message(
            f"no-training reference ({summary['method']}): A_T {summary['final_accuracy']:.2f} ({how})"
        )
        return summary

    def _zero_shot_row(self) -> list[tuple[int, int]]:
        """Every task scored before the first is trained: computed once, kept in the run folder for resumes."""
        path = self.run_dir / rundir.ZERO_SHOT_FILE
        if path.is_file():
            return [tuple(pair) for pair in rundir.read_json(path)["counts"]]
        counts = evaluate(self.method, self.scoring, None).counts
        if self.ctx.is_main:
            rundir.write_json(path, {"counts": counts})
            scores = ", ".join(f"{100.0 * c / n:.2f}" for c, n in counts)
            self.reporter.message(f"zero-shot accuracy of each task before training: {scores}")
        self.ctx.barrier()
        return counts

    def _run_task(self, task: TaskInfo, snapshot: Path | None, earlier: list[dict]) -> dict:
        """Train, summarise and evaluate one task; returns its record (the checkpoint's `task.json`)."""
        ctx, config = self.ctx, self.config
        started = time.perf_counter()
        compiled_before = compile_seconds() if self.compiled else 0.0
        clock = PhaseClock(ctx.device, compile_seconds if self.compiled else None)
        start_mark = clock.mark()
        with clock.phase("setup"):
            seed_everything(derived_seed(config.runtime.seed, task.index))
            self.method.begin_task(task)
            self.method.to(ctx.device)
            # Before the per-rank seed: a data-dependent initialisation must draw the same numbers on every rank.
            with autocast_for(ctx.device, config.runtime.precision):
                self.method.prepare_task(task, TaskImages(self.scoring, task))
        trainable = sum(parameter.numel() for parameter in self.method.parameters() if parameter.requires_grad)
        epochs = self._train(task, snapshot, clock)
        seed_everything(derived_seed(config.runtime.seed, task.index, 1 + ctx.rank))
        self.method.eval()
        with clock.phase("statistics"), torch.no_grad(), autocast_for(ctx.device, config.runtime.precision):
            diagnostics = self.method.end_task(task, TaskImages(self.scoring, task))
        with clock.phase("evaluation"):
            scores = evaluate(self.method, self.scoring, task)
        seconds = time.perf_counter() - started
        record = {
            "task": task.index,
            "counts": scores.counts,
            "epochs": epochs,
            "seconds": seconds,
            "trainable_parameters": trainable,
        }
        if scores.retrieval is not None:
            record["retrieval"] = scores.retrieval
        if diagnostics:
            record["diagnostics"] = diagnostics
        if ctx.is_main:
            if self.compiled:
                record["compile_s"] = compile_seconds() - compiled_before
            with clock.phase("checkpoint"):
                state = self.method.learned_state()
                rundir.save_checkpoint(self.run_dir, task.index, state, record, self.method.is_training_only)
                if task.index > 0:
                    rundir.drop_training_state(rundir.checkpoint_dir(self.run_dir, task.index - 1))
                rundir.remove_snapshots(self.run_dir)
                records = [*earlier, record]
                seen = self._write_metrics(records, finished=task.is_last)["all_seen_accuracy"][-1]
                self.tracking.task_end(self._matrix(records))
            wall = time.perf_counter() - started
            phases = clock.since(start_mark, wall)
            rundir.append_log(self.run_dir, {"event": "task_end", **record, "wall_s": wall, "phases": phases})
            scope = (
                f"{task.total_classes} seen classes"
                if task.scenario == CLASS_INCREMENTAL
                else f"{task.index + 1} seen tasks, each among its own classes,"
            )
            self.reporter.message(
                f"task {task.index + 1}/{task.num_tasks}: accuracy on {scope} {seen:.2f}% ({seconds:.1f}s)"
            )
        ctx.barrier()
        return record

    def _train(self, task: TaskInfo, snapshot: Path | None, clock: PhaseClock) -> list[dict]:
        """Train the current task (from `snapshot` when resuming inside it); returns one record per epoch."""
        trainable = [p for p in self.method.parameters() if p.requires_grad]
        if not trainable or self.config.optim.epochs_of(task.index) == 0:
            return []
        with clock.phase("setup"):
            training = TaskTraining(
                self.method,
                task,
                self.stream,
                self.train_transform,
                self.config,
                self.ctx,
                self.reporter,
                self.tracking,
                self.run_dir,
                clock,
                self.feed,
            )
        return training.run(snapshot)


def run_training(config: RunConfig, out: Path, resume_dir: Path | None, reporter: Reporter) -> RunResult:
    """Train a new run under `out`, or continue `resume_dir`, in this process (one rank of a group or alone).

    In a group, an error is re-raised with the rank that raised it, so the launcher (or torchrun's log)
    names where a run failed. The group is left as it is on failure: closing it would make the other
    ranks fail on the broken connection before this rank's own error is reported.
    """
    from ntkcl.engine.distributed import init_distributed, shutdown_distributed

    try:
        ctx = init_distributed(config.runtime.device, config.runtime.gpus)
        parts = prepare_run(config, ctx, out if resume_dir is None else None)
        reporter.checked()
        run_dir = resume_dir if resume_dir is not None else start_run(config, out, ctx)
        reporter.started(run_dir)
        trainer = Trainer(config, run_dir, ctx, reporter, parts)
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
