"""Evaluation after each task and the end-of-task data view, both sharded without padding.

Class-incremental streams are scored on the test images of every seen task, with `predict` over all seen
classes (in batches of one task's images each for a method that asks, `evaluates_per_task_batch`). Task-incremental streams are scored task by task with `predict_task` (argmax within the task's own
classes): the seen tasks, or, for a method that predicts untrained tasks (`zero_shot`), every task of the
stream, also once before the first task (`evaluate(..., upto=None)`: the zero-shot row).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ntkcl.config import RunConfig
from ntkcl.data.loaders import ImageDataset, Samples, ShardSampler
from ntkcl.data.scenarios import TASK_INCREMENTAL
from ntkcl.data.stream import Stream
from ntkcl.engine.distributed import DistributedContext
from ntkcl.engine.feed import DeviceFeed
from ntkcl.engine.metrics import AccuracyMatrix
from ntkcl.engine.progress import Reporter
from ntkcl.methods.base import ContinualMethod, TaskInfo


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU unless fp32 is asked for; plain fp32 on CPU (precision "auto")."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class ScoringLoader:
    """How evaluation and end-of-task statistics read a stream: test transform, batches, workers, precision,
    and the device feed when the run uses it (`ntkcl.engine.feed`; the same shards, the same pixels).

    Each process reads its own shard without padding, so sums over processes count every image once.
    """

    stream: Stream
    transform: Callable
    ctx: DistributedContext
    batch_size: int
    num_workers: int
    precision: str = "auto"
    feed: DeviceFeed | None = None
    progress: Reporter | None = None  # shows a bar while a split is read (on a terminal)

    @classmethod
    def for_run(
        cls,
        config: RunConfig,
        stream: Stream,
        transform: Callable,
        ctx: DistributedContext,
        feed: DeviceFeed | None = None,
        progress: Reporter | None = None,
    ) -> ScoringLoader:
        """The run configuration's evaluation batch size, workers and precision."""
        runtime = config.runtime
        batch_size = config.optim.eval_batch_size
        return cls(stream, transform, ctx, batch_size, runtime.num_workers, runtime.precision, feed, progress)

    def batches(self, images: Samples, indices: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's shard of `images[indices]`, on its device."""
        device = self.ctx.device
        if self.feed is not None and self.feed.serves(images):
            yield from self.feed.scoring_batches(images, indices, self.ctx.rank, self.ctx.world_size, self.batch_size)
            return
        loader = DataLoader(
            Subset(ImageDataset(images, self.transform), indices.tolist()),
            batch_size=self.batch_size,
            sampler=ShardSampler(np.arange(len(indices)), self.ctx.rank, self.ctx.world_size),
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
            generator=torch.Generator(),  # its workers' base seed must not move the global generator
        )
        bar = self.progress.bar("scoring", len(loader)) if self.progress else contextlib.nullcontext(lambda: None)
        with bar as advance:
            for batch_images, labels in loader:
                yield batch_images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                advance()


class TaskImages:
    """`TaskData` for `end_task`: the task's training images under test-time transforms, this rank's shard."""

    def __init__(self, scoring: ScoringLoader, task: TaskInfo):
        self.device = scoring.ctx.device
        self._scoring = scoring
        self._task = task

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = self._scoring.stream
        return self._scoring.batches(stream.train, stream.train_indices(self._task))

    def indexed_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ctx, seen = self._scoring.ctx, 0
        for images, labels in self.batches():
            local = torch.arange(seen, seen + len(labels), device=labels.device)
            yield images, labels, ShardSampler.unsharded_positions(local, ctx.rank, ctx.world_size)
            seen += len(labels)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._scoring.ctx.all_reduce_sum(tensor)


def evaluates_untrained_tasks(method: ContinualMethod, stream: Stream) -> bool:
    """Whether the run's matrix is full (every task after every task) with a zero-shot row before the first."""
    return stream.scenario == TASK_INCREMENTAL and method.zero_shot


@dataclass
class TaskScores:
    """One evaluation: (correct, total) per evaluated task, and for a method that retrieves a task per image
    (class-incremental streams), (test images whose retrieved task is their own, total) per task."""

    counts: list[tuple[int, int]]
    retrieval: list[tuple[int, int]] | None = None


@torch.no_grad()
def evaluate(method: ContinualMethod, scoring: ScoringLoader, upto: TaskInfo | None) -> TaskScores:
    """Scores of each evaluated task after training task `upto` (None: before the first task)."""
    method.eval()
    stream, ctx = scoring.stream, scoring.ctx
    if stream.scenario == TASK_INCREMENTAL:
        return TaskScores(_evaluate_task_aware(method, scoring, upto))
    num_tasks = upto.index + 1
    task_of_label = torch.as_tensor(stream.task_of_label(), device=ctx.device)
    correct = torch.zeros(num_tasks, dtype=torch.int64, device=ctx.device)
    retrieved_correct = torch.zeros(num_tasks, dtype=torch.int64, device=ctx.device)
    total = torch.zeros(num_tasks, dtype=torch.int64, device=ctx.device)
    retrieves = False
    if method.evaluates_per_task_batch:
        batches = itertools.chain.from_iterable(
            scoring.batches(stream.test, stream.task_test_indices(stream.task(index))) for index in range(num_tasks)
        )
    else:
        batches = scoring.batches(stream.test, stream.test_indices(upto))
    for images, labels in batches:
        with autocast_for(ctx.device, scoring.precision):
            logits, retrieved = method.predict_with_task(images)
        predictions = logits.float().argmax(dim=1)
        tasks = task_of_label[labels]
        correct.index_add_(0, tasks, (predictions == labels).long())
        total.index_add_(0, tasks, torch.ones_like(labels))
        if retrieved is not None:
            retrieves = True
            retrieved_correct.index_add_(0, tasks, (retrieved.to(tasks.device) == tasks).long())
    for counts in (correct, total, retrieved_correct):
        ctx.all_reduce_sum(counts)
    retrieval = list(zip(retrieved_correct.tolist(), total.tolist())) if retrieves else None
    return TaskScores(list(zip(correct.tolist(), total.tolist())), retrieval)


def _evaluate_task_aware(
    method: ContinualMethod, scoring: ScoringLoader, upto: TaskInfo | None
) -> list[tuple[int, int]]:
    stream, ctx = scoring.stream, scoring.ctx
    tasks = stream.tasks() if evaluates_untrained_tasks(method, stream) else stream.tasks()[: upto.index + 1]
    counts = torch.zeros(len(tasks), 2, dtype=torch.int64, device=ctx.device)
    for position, task in enumerate(tasks):
        for images, labels in scoring.batches(stream.test, stream.task_test_indices(task)):
            with autocast_for(ctx.device, scoring.precision):
                logits = method.predict_task(images, task)
            predictions = logits.float().argmax(dim=1) + task.known_classes
            counts[position, 0] += (predictions == labels).sum()
            counts[position, 1] += labels.numel()
    ctx.all_reduce_sum(counts)
    return [(int(c), int(n)) for c, n in counts.tolist()]


def compare_with_training(recorded: dict, recomputed: AccuracyMatrix) -> str:
    """How the matrix recomputed from the checkpoints relates to the one training recorded in metrics.json.

    "identical"; "last_task_unrecorded" when metrics.json holds exactly the rows before the last checkpoint
    (the run stopped between saving that task's checkpoint and recording its metrics, which `--resume`
    records); else "different".
    """
    correct, total = recorded.get("correct", []), recorded.get("total", [])
    # A zero-shot row is first recorded with the first task's metrics.
    same_zero_shot = recorded.get("zero_shot_correct") == recomputed.zero_shot_correct
    if same_zero_shot and correct == recomputed.correct and total == recomputed.total:
        return "identical"
    if (same_zero_shot or not correct) and correct == recomputed.correct[:-1] and total == recomputed.total[:-1]:
        return "last_task_unrecorded"
    return "different"


def evaluate_run(run_dir, data_root=None, reporter=None) -> dict:
    """Rebuild every saved task of a run and recompute its accuracy matrix from the checkpoints.

    Returns the recomputed metrics and how they compare with the ones training recorded
    (`compare_with_training`; `matches_training` when identical).
    """
    from pathlib import Path

    from ntkcl.engine import rundir
    from ntkcl.engine.builders import build_backbone, build_method, build_run_transforms, build_stream
    from ntkcl.engine.distributed import init_distributed
    from ntkcl.engine.metrics import retrieval_summary
    from ntkcl.engine.run_reader import read_run_folder
    from ntkcl.errors import BadInputError

    run = read_run_folder(Path(run_dir))
    if reporter is not None:
        for note in run.notes:
            reporter.message(note)
    config = run.config
    if data_root is not None:
        config.stream.data_root = data_root
    checkpoints = run.checkpoints
    if not checkpoints:
        raise BadInputError(f"{run.path} has no finished task to evaluate")
    ctx = init_distributed(config.runtime.device)
    stream, _ = build_stream(config, ctx)
    backbone = build_backbone(config).to(ctx.device)
    if run.record["backbone"]["weights_sha256"] != backbone.weights_sha256:
        raise BadInputError("the backbone weights differ from the ones the run was trained with (sha256 mismatch)")
    _, test_transform = build_run_transforms(config, backbone)
    scoring = ScoringLoader.for_run(config, stream, test_transform, ctx, progress=reporter)

    def fresh_method() -> ContinualMethod:
        method = build_method(config, backbone)
        method.begin_stream(stream.tasks())
        return method

    initial = fresh_method()
    zero_shot = None
    if evaluates_untrained_tasks(initial, stream):
        zero_shot = evaluate(initial.to(ctx.device), scoring, None).counts
    scores = []
    for index, checkpoint in enumerate(checkpoints):
        state = run.load_state(index, training=False)  # only the last one keeps its training-only part
        method = fresh_method()
        try:
            method.load_learned_state(state, stream.tasks()[: index + 1])
        except BadInputError as error:
            raise run.damaged(checkpoint / rundir.STATE_FILE, str(error), index) from error
        method.to(ctx.device)
        scores.append(evaluate(method, scoring, stream.task(index)))
        if reporter is not None:
            reporter.message(f"evaluated task {index + 1}/{len(checkpoints)}")
    matrix = AccuracyMatrix.from_rows([score.counts for score in scores], zero_shot)
    metrics = matrix.summary()
    if scores[0].retrieval is not None:
        metrics["task_retrieval"] = retrieval_summary(AccuracyMatrix.from_rows([score.retrieval for score in scores]))
    comparison = compare_with_training(run.metrics, matrix)
    if comparison == "identical" and run.metrics.get("task_retrieval") != metrics.get("task_retrieval"):
        comparison = "different"
    return {
        "run_dir": str(run.path),
        "finished": len(checkpoints) == stream.num_tasks,
        "metrics": metrics,
        "training_metrics": comparison,
        "matches_training": comparison == "identical",
    }
