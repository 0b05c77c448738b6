"""The method protocol: a small set of task-level hooks the engine calls.

    begin_stream(tasks)           every task of the stream, once, before anything else (default: kept in `stream_tasks`)
    begin_task(task)              grow heads / make per-task modules before training a task
    prepare_task(task, data)      statistics of the task's training images before training it (default: nothing)
    training_step(images, labels) -> StepOutput(loss, logs, batch_sum)   (also `forward`, so DDP can wrap the method)
    end_task(task, data)          statistics over the task's training images (prototypes, averages, bases);
                                  may return diagnostics of the task, which the engine records in the run folder
    predict(images)               logits over every class seen so far; no task identity is given
    predict_task(images, task)    logits over `task`'s own classes only (task-incremental evaluation)
    predict_with_task(images)     the logits and, for methods that retrieve a task per image, which task

Labels are always global stream labels: task t's classes are `task.classes`, after the classes of the tasks
before it (label offsets), in training batches and in `TaskData` alike, whatever the scenario.

Scenarios (`TaskInfo.scenario`):

- class-incremental: evaluation calls `predict(images)` on the test images of every seen task and counts the
  argmax over all seen classes.
- task-incremental (multi-domain streams such as MTIL): each test image is classified among its own task's
  classes only: `predict_task(images, task)` returns one column per class of `task` (column k is label
  `task.known_classes + k`) and the argmax is taken within them. The default slices `predict`, which serves
  every class-incremental method for the tasks it has trained. A method with `zero_shot = True` must answer
  `predict_task` for any task, trained or not (a CLIP text classifier built from `task.class_names` and
  `task.templates`); the engine then evaluates every task of the stream after every task and once before
  the first (the zero-shot row), which is what MTIL's Transfer needs.

Capabilities are class attributes that the engine checks before anything runs (exit 2 with the reason):
`scenarios` (which of the two the method supports), `zero_shot` (predicts tasks it has not trained; streams
such as `mtil-order1` require it), `mixed_task_data` (accepts training data of a task holding labels of
other tasks, as VTAB-SimS streams have), `supports_distributed` (DDP over several processes),
`required_backbone_features` (what the method hooks into on the backbone; `--backbone resnet18` is refused).

A method that takes more than one optimizer step per batch names them in `training_stages()` (default: one,
`SINGLE_STAGE`). For each stage, in order, the engine runs the method's forward through DDP with the stage's
name (`training_step(images, labels, stage)`), back-propagates (DDP all-reduces the gradients),
calls `adjust_gradients(stage)` and steps the optimizer. Only the parameters a stage's loss reaches have a
gradient at its step, so the others are left alone (no momentum or weight-decay update) by SGD and Adam.

The engine sets `train_batch_size` (the run's global `optim.batch_size`) before the first task, for a method
whose reference reads its configured batch size inside the loss (NTK-CL samples that many old prototypes,
also on a task's last, partial batch); None outside a run.

A method whose `evaluates_per_task_batch` is true is handed evaluation batches that each hold test images
of one task only (PROTEUS retrieving one task per test batch); other methods get batches over all seen
tasks' images.

`predict` (and `predict_with_task`) must stay differentiable with respect to the learned state when
gradients are enabled: the engine and exports call them under `torch.no_grad`, and `ntkcl diagnose`
differentiates them (`ntkcl.diagnostics`).

A method declares what it saves (`learned_state`: everything but the frozen backbone and `transient`
modules; `training_only` marks the part needed to continue training but not to predict). Methods never
import the engine: statistics they need across processes go through `TaskData.all_reduce_sum`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ntkcl.config import StrictModel
from ntkcl.data.plugin import DEFAULT_TEMPLATES
from ntkcl.data.scenarios import CLASS_INCREMENTAL, SCENARIOS
from ntkcl.errors import BadInputError
from ntkcl.models.backbone import VIT_TOKENS, Backbone


@dataclass(frozen=True)
class TaskInfo:
    """One step of a stream, in stream-ordered labels.

    Task `index` introduces the labels `known_classes .. known_classes + num_new_classes - 1`.

    Attributes:
        increment: the stream's configured increment (None: this task's size, or a one-dataset-per-task stream).
        dataset: the dataset plugin the task's images come from.
        class_names: the task's classes in label order, as a text encoder should read them (the dataset
            plugin's prompt names, e.g. "annual crop land" for EuroSAT's `AnnualCrop`).
        templates: the dataset plugin's prompt templates, each with one `{}` for a class name.
        scenario: `CLASS_INCREMENTAL` or `TASK_INCREMENTAL` (see the module docstring).
    """

    index: int
    num_tasks: int
    known_classes: int
    num_new_classes: int
    increment: int | None = None
    dataset: str = ""
    class_names: tuple[str, ...] = ()
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    scenario: str = CLASS_INCREMENTAL

    @property
    def classes(self) -> range:
        return range(self.known_classes, self.known_classes + self.num_new_classes)

    @property
    def total_classes(self) -> int:
        return self.known_classes + self.num_new_classes

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_tasks - 1


@dataclass
class StepOutput:
    """What one training step returns: the loss to back-propagate and detached scalars to log.

    `loss` is a mean over the batch's images. `batch_sum` holds terms that a reference sums over the batch
    instead (NTK-CL's signed-sum orthogonality term): the engine weights the two differently so that a
    distributed step back-propagates the same total as one process would on the whole batch.
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    batch_sum: torch.Tensor | None = None

    def total(self) -> torch.Tensor:
        """The loss of the whole batch in one process."""
        return self.loss if self.batch_sum is None else self.loss + self.batch_sum


class TaskData(Protocol):
    """The current task's training images under test-time transforms, for end-of-task statistics.

    In a distributed run each process sees a disjoint shard (no sampler padding); sums must go through
    `all_reduce_sum` so every process ends with the same statistics. `indexed_batches` also yields each
    image's position in the task's training set (0 .. N-1, the same for any number of processes), for
    statistics that depend on the order or on a split of the images.
    """

    device: torch.device

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def indexed_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


class MethodParams(StrictModel):
    """Base of every method's hyper-parameter model: unknown keys, NaN, infinity and oversize integers are
    rejected in every field a method declares."""


def class_sums(
    features: torch.Tensor, labels: torch.Tensor, first_class: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class float64 feature sums and counts for labels first_class .. first_class+num_classes-1."""
    local = labels - first_class
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, local, features.to(torch.float64))
    # index_add rather than bincount, which reads the largest label back to the host (a device sync)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    counts.index_add_(0, local, torch.ones_like(local, dtype=torch.float64))
    return sums, counts


def class_means(data: TaskData, feature_fn, first_class: int, num_classes: int) -> torch.Tensor:
    """Mean feature of each class of the task, reduced over all processes (fp64 accumulation)."""
    sums = counts = None
    for images, labels in data.batches():
        features = feature_fn(images).float()
        batch_sums, batch_counts = class_sums(features, labels, first_class, num_classes)
        sums = batch_sums if sums is None else sums + batch_sums
        counts = batch_counts if counts is None else counts + batch_counts
    if sums is None:
        raise RuntimeError("end-of-task statistics saw no images")
    sums = data.all_reduce_sum(sums)
    counts = data.all_reduce_sum(counts)
    return (sums / counts.clamp_min(1).unsqueeze(1)).float()


@torch.no_grad()
def indexed_features(data: TaskData, feature_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's `feature_fn(images)` rows (float32) over the task's images, with labels and positions."""
    features, labels, positions = [], [], []
    for images, batch_labels, batch_positions in data.indexed_batches():
        features.append(feature_fn(images).float())
        labels.append(batch_labels)
        positions.append(batch_positions)
    if not features:
        raise RuntimeError("end-of-task statistics saw no images")
    return torch.cat(features), torch.cat(labels), torch.cat(positions)


def batch_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Percentage of `labels` ranked first by `logits`: the `train_acc` a method logs, in the same unit as
    every other accuracy ntkcl reports."""
    return (logits.argmax(dim=1) == labels).float().mean() * 100


def own_class_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, first_class: int, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a head over one task's classes (logit k is label first_class + k) and its accuracy (%).

    Images labelled with another task's class (mixed training sets such as VTAB-SimS) add nothing; the loss
    stays a mean over the whole batch, so a batch without any of the task's images gives 0, not NaN.
    """
    local = labels - first_class
    own = (local >= 0) & (local < logits.shape[1])
    summed = F.cross_entropy(logits.float()[own], local[own], label_smoothing=label_smoothing, reduction="sum")
    hits = (logits[own].argmax(dim=1) == local[own]).float().sum()
    return summed / len(labels), 100 * hits / own.sum().clamp_min(1)


def gather_rows(data: TaskData, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Every process's `rows` (one per image, at its task position) as one tensor in task order.

    A sum of zero-padded copies, so it needs nothing but `all_reduce_sum` and is exact (x + 0 = x).
    """
    count = data.all_reduce_sum(torch.tensor(len(positions), device=rows.device, dtype=torch.int64))
    full = rows.new_zeros(int(count), *rows.shape[1:])
    full[positions.to(rows.device)] = rows
    return data.all_reduce_sum(full)


SINGLE_STAGE = "loss"


class ContinualMethod(nn.Module, ABC):
    """Base class of continual-learning methods.

    Args:
        backbone: the frozen pre-trained model (shared, never saved by the method).
        params: the method's validated hyper-parameters (an instance of `Params`).

    Class attributes:
        name: the entry-point / CLI name.
        Params: pydantic model of the hyper-parameters (`ntkcl train --set method.params.x=...`).
        scenarios: the scenarios the method runs (see the module docstring).
        zero_shot: `predict_task` answers for tasks not trained yet.
        mixed_task_data: a task's training data may hold labels of other tasks (VTAB-SimS).
        supports_distributed: whether DDP over several processes is allowed.
        transient: attribute names of modules that live for one task and are not saved (e.g. proxy heads).
        citation: the method's BibTeX entry, printed in model cards.
        required_backbone_features: what the method hooks into (`ntkcl.models.backbone.BACKBONE_FEATURES`).
        compile_targets: names of bound methods that hold the heavy, task-independent work (backbone passes);
            the engine may replace them on the instance by compiled versions (`ntkcl.engine.compile`), and
            then lists them in the instance's `compiled_targets` (a method whose shapes grow with the tasks
            can then take a form of its passes with static shapes).
        training_only: prefixes of learned-state keys needed to continue training but not to predict (e.g. a
            ridge head's Gram matrix). Checkpoints keep them apart, exports leave them out, and loading a state
            without them gives a model that predicts exactly but cannot continue training.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    scenarios: ClassVar[tuple[str, ...]] = SCENARIOS
    zero_shot: ClassVar[bool] = False
    mixed_task_data: ClassVar[bool] = False
    supports_distributed: ClassVar[bool] = True
    transient: ClassVar[tuple[str, ...]] = ()
    compile_targets: ClassVar[tuple[str, ...]] = ()
    training_only: ClassVar[tuple[str, ...]] = ()
    citation: ClassVar[str] = ""
    required_backbone_features: ClassVar[tuple[str, ...]] = (VIT_TOKENS,)

    def __init__(self, backbone: Backbone, params: MethodParams):
        super().__init__()
        self.backbone = backbone
        self.params = params
        self.seen_classes = 0
        self.stream_tasks: tuple[TaskInfo, ...] = ()
        self.train_batch_size: int | None = None
        self.compiled_targets: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.backbone.mean.device

    def begin_stream(self, tasks: Sequence[TaskInfo]) -> None:
        """Every task of the stream, before the first one is trained (or a saved state is loaded)."""
        self.stream_tasks = tuple(tasks)

    @abstractmethod
    def begin_task(self, task: TaskInfo) -> None:
        """Prepare for `task` (grow heads, create per-task modules on `self.device`)."""

    @abstractmethod
    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """Loss for one batch of the current task (labels are stream-ordered global labels).

        A method with several `training_stages` takes the stage's name as a third argument.
        """

    def training_stages(self) -> tuple[str, ...]:
        """Names of the optimizer steps one batch of the current task takes, in order (default: one)."""
        return (SINGLE_STAGE,)

    def adjust_gradients(self, stage: str) -> None:
        """Change the (all-reduced) gradients of `stage` in place before its optimizer step (default: no change)."""

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, stage: str = SINGLE_STAGE
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """`training_step` as a (loss, batch_sum, logs) tuple, the output shape DistributedDataParallel expects."""
        output = (
            self.training_step(images, labels) if stage == SINGLE_STAGE else self.training_step(images, labels, stage)
        )
        batch_sum = output.loss.new_zeros(()) if output.batch_sum is None else output.batch_sum
        return output.loss, batch_sum, output.logs

    def prepare_task(self, task: TaskInfo, data: TaskData) -> None:
        """Look at the task's training images before training it (default: nothing).

        Runs after `begin_task`, with gradients enabled and under the run's autocast, for methods whose
        initialisation depends on the data (KeepLoRA's gradient estimate and LoRA initialisation). Every
        process must end in the same state: reduce through `data.all_reduce_sum`.
        """

    @torch.no_grad()
    def end_task(self, task: TaskInfo, data: TaskData) -> dict | None:
        """Statistics after training `task` (default: nothing).

        May return JSON-serialisable diagnostics of the task (e.g. a cluster-separation factor), which the
        engine records with the task in the run folder (`task.json`, `log.jsonl`, `metrics.json`).
        """
        self.seen_classes = task.total_classes
        return None

    @abstractmethod
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits over all `seen_classes`, without task identity."""

    def predict_task(self, images: torch.Tensor, task: TaskInfo) -> torch.Tensor:
        """Logits over `task`'s classes only (task-incremental evaluation); default: `predict`'s columns of them."""
        if task.total_classes > self.seen_classes:
            raise RuntimeError(f"{self.name} cannot classify task {task.index} before training it (no zero-shot)")
        return self.predict(images)[:, task.known_classes : task.total_classes]

    @property
    def evaluates_per_task_batch(self) -> bool:
        """Whether evaluation must give `predict_with_task` batches of one task's test images (default: no)."""
        return False

    def predict_with_task(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and, for a method that retrieves a task for each image, the retrieved task indices (B,).

        The engine compares them with the true tasks to report retrieval accuracy; None: no retrieval.
        """
        return self.predict(images), None

    @classmethod
    def is_training_only(cls, key: str) -> bool:
        """Whether a learned-state key is only needed to continue training (see `training_only`)."""
        return key.startswith(cls.training_only)

    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups for the current task (default: every trainable parameter)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to predict again: the state dict minus the backbone and transient modules."""
        skipped = ("backbone.",) + tuple(f"{name}." for name in self.transient)
        return {key: value.detach().clone() for key, value in self.state_dict().items() if not key.startswith(skipped)}

    def load_learned_state(self, state: dict[str, torch.Tensor], finished: Sequence[TaskInfo]) -> None:
        """Rebuild the structure of the `finished` tasks, then load `state`.

        Keys must match exactly, except `training_only` ones, which an export leaves out.
        """
        for task in finished:
            self.begin_task(task)
        self.seen_classes = finished[-1].total_classes if finished else 0
        expected = set(self.learned_state())
        missing = {key for key in expected - set(state) if not self.is_training_only(key)}
        unexpected = set(state) - expected
        if missing or unexpected:
            raise BadInputError(
                f"saved state does not fit method {self.name}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        own = self.state_dict()
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise BadInputError(
                    f"saved state does not fit method {self.name}: {key} has shape {tuple(value.shape)}, "
                    f"the model has {tuple(own[key].shape)}"
                )
        self.load_state_dict(state, strict=False)
