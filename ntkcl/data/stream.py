"""Streams: the samples of a run relabelled into stream order and cut into tasks.

A single dataset is split by classes (`Stream.build`); a composite stream has one dataset per task
(`ntkcl.data.composite`). Either way task t owns a contiguous range of stream labels, after the tasks before
it, and the scenario (class- or task-incremental) only changes how the engine evaluates.

The class order follows the PyCIL / PILOT / NTK-CL convention: `np.random.seed(seed);
np.random.permutation(n)`, and a sample of base label `y` gets stream label `order.index(y)`. Task sizes
follow their DataManager: `init_classes`, then `increment` while it fits, then the remainder. The
class-order seed is deliberately separate from the training seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ntkcl.data.composite import SimilarityMixing
from ntkcl.data.plugin import DEFAULT_TEMPLATES, Samples
from ntkcl.data.scenarios import CLASS_INCREMENTAL
from ntkcl.errors import BadInputError
from ntkcl.methods.base import TaskInfo


def class_order(num_classes: int, seed: int | None = None, explicit: Sequence[int] | None = None) -> list[int]:
    """`order[k]` is the base label shown as stream label k.

    Args:
        num_classes: classes in the dataset.
        seed: class-order seed; None keeps the base order (0..n-1).
        explicit: a full permutation given by the user; overrides `seed`.
    """
    if explicit is not None:
        order = [int(c) for c in explicit]
        if sorted(order) != list(range(num_classes)):
            raise BadInputError(f"class_order must be a permutation of 0..{num_classes - 1}")
        return order
    if seed is None:
        return list(range(num_classes))
    np.random.seed(seed)
    return np.random.permutation(num_classes).tolist()


def task_sizes(num_classes: int, init_classes: int, increment: int) -> list[int]:
    """Classes per task: init, then `increment` while it fits, then the remainder."""
    if not 1 <= init_classes <= num_classes:
        raise BadInputError(f"init_classes={init_classes} does not fit a dataset of {num_classes} classes")
    if increment < 1:
        raise BadInputError(f"increment={increment} must be at least 1")
    if init_classes < num_classes and increment > num_classes - init_classes:
        raise BadInputError(
            f"increment={increment} does not fit: only {num_classes - init_classes} classes follow "
            f"the first {init_classes}"
        )
    sizes = [init_classes]
    while sum(sizes) + increment < num_classes:
        sizes.append(increment)
    if num_classes - sum(sizes) > 0:
        sizes.append(num_classes - sum(sizes))
    return sizes


@dataclass
class Stream:
    """Train and test samples relabelled into stream order and cut into tasks.

    Attributes:
        order: `order[k]` is the base label shown as stream label k (identity for composite streams).
        sizes: classes per task.
        class_names: stream-ordered class names as the datasets name them.
        increment: the configured increment (None for one-dataset-per-task streams).
        scenario: class- or task-incremental (`ntkcl.methods.base`).
        task_datasets: the dataset each task's classes come from.
        prompt_names: stream-ordered class names for a text encoder (`DatasetPlugin.text_class_names`).
        task_templates: each task's prompt templates.
        train_task: the task whose training set holds each training image, where that is not the task of its
            label (VTAB-SimS mixes images of other datasets, with their own labels, into a task); None: by label.
    """

    train: Samples
    test: Samples
    order: list[int]
    sizes: list[int]
    class_names: list[str]
    increment: int | None = None
    scenario: str = CLASS_INCREMENTAL
    task_datasets: list[str] = field(default_factory=list)
    prompt_names: list[str] = field(default_factory=list)
    task_templates: list[tuple[str, ...]] = field(default_factory=list)
    train_task: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        train: Samples,
        test: Samples,
        num_classes: int,
        init_classes: int,
        increment: int,
        order_seed: int | None,
        explicit_order: Sequence[int] | None = None,
        dataset: str = "",
        prompt_names: Sequence[str] = (),
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        scenario: str = CLASS_INCREMENTAL,
    ) -> Stream:
        """One dataset split by classes: `init_classes`, then `increment` per task, in the seeded class order."""
        order = class_order(num_classes, order_seed, explicit_order)
        sizes = task_sizes(num_classes, init_classes, increment)
        stream_label = np.empty(num_classes, dtype=np.int64)
        stream_label[np.asarray(order)] = np.arange(num_classes)
        names = list(train.class_names) or [str(c) for c in range(num_classes)]
        text_names = list(prompt_names) or names
        relabelled = []
        for samples in (train, test):
            if len(samples) and (samples.labels.min() < 0 or samples.labels.max() >= num_classes):
                raise BadInputError(f"labels outside 0..{num_classes - 1}")
            copy = samples.subset(np.arange(len(samples)))
            copy.labels = stream_label[samples.labels]
            relabelled.append(copy)
        return cls(
            relabelled[0],
            relabelled[1],
            order,
            sizes,
            [names[c] for c in order],
            increment,
            scenario=scenario,
            task_datasets=[dataset] * len(sizes),
            prompt_names=[text_names[c] for c in order],
            task_templates=[tuple(templates)] * len(sizes),
        )

    @property
    def num_tasks(self) -> int:
        return len(self.sizes)

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)

    def task(self, index: int) -> TaskInfo:
        known = sum(self.sizes[:index])
        return TaskInfo(
            index,
            self.num_tasks,
            known,
            self.sizes[index],
            self.increment,
            dataset=self.task_datasets[index] if self.task_datasets else "",
            class_names=tuple(self.prompt_names[known : known + self.sizes[index]]),
            templates=self.task_templates[index] if self.task_templates else DEFAULT_TEMPLATES,
            scenario=self.scenario,
        )

    def tasks(self) -> list[TaskInfo]:
        return [self.task(i) for i in range(self.num_tasks)]

    def train_indices(self, task: TaskInfo) -> np.ndarray:
        """The task's training samples (its own classes, plus any images mixed into it; no replay)."""
        if self.train_task is not None:
            return np.flatnonzero(self.train_task == task.index)
        labels = self.train.labels
        return np.flatnonzero((labels >= task.known_classes) & (labels < task.total_classes))

    def test_indices(self, upto: TaskInfo) -> np.ndarray:
        """Test samples of every class seen up to and including task `upto`."""
        return np.flatnonzero(self.test.labels < upto.total_classes)

    def task_test_indices(self, task: TaskInfo) -> np.ndarray:
        """Test samples of the task's own classes."""
        labels = self.test.labels
        return np.flatnonzero((labels >= task.known_classes) & (labels < task.total_classes))

    def task_of_label(self) -> np.ndarray:
        """Task index of each stream label (the true task of any sample, training or test)."""
        return np.repeat(np.arange(self.num_tasks), self.sizes)


@dataclass
class TaskSource:
    """What the stream builder needs of one member: its splits in base labels and its text side.

    `train_rows` names each training image (the manifest's relative path), for the recorded file lists.
    """

    dataset: str
    train: Samples
    test: Samples
    num_classes: int
    prompt_names: Sequence[str]
    templates: Sequence[str]
    train_rows: Sequence[str]


def mix_training_sets(
    sizes: Sequence[int], groups: Sequence[str | None], similarity: int, seed: int
) -> list[list[tuple[int, np.ndarray]]]:
    """The VTAB-SimS rule: for each task, `(source task, indices into its training set)` pairs.

    Task k with n images keeps `n * (100 - S) // 100` of its own, drawn without replacement, and takes the
    other `n - keep` from the tasks of its group (stream order), `(n - keep) // m` from each of the m others
    and the remainder from the last; a source smaller than its share gives all it has. A task alone in its
    group (or with group None) keeps all its images. Draws come from one RandomState(seed) in task order.
    """
    generator = np.random.RandomState(seed)
    plan = []
    for task, size in enumerate(sizes):
        group = groups[task]
        others = [j for j in range(len(sizes)) if j != task and group is not None and groups[j] == group]
        if not others:
            plan.append([(task, np.arange(size))])
            continue
        keep = size * (100 - similarity) // 100
        replaced = size - keep
        shares = [replaced // len(others)] * len(others)
        shares[-1] += replaced - sum(shares)
        parts = [(task, np.sort(generator.permutation(size)[:keep]))]
        for source, share in zip(others, shares):
            parts.append((source, np.sort(generator.permutation(sizes[source])[:share])))
        plan.append(parts)
    return plan


@dataclass
class CompositeStream:
    """A built composite stream and, for mixed streams, the training file list that defines it."""

    stream: Stream
    file_list: list[tuple[int, str, str, int]] | None = None  # (task, dataset, row, stream label)


def compose(sources: Sequence[TaskSource], scenario: str, mixing: SimilarityMixing | None = None) -> CompositeStream:
    """One task per source, labels offset by the classes of the sources before it."""
    offsets = np.cumsum([0] + [source.num_classes for source in sources])
    shifted = []
    for source, offset in zip(sources, offsets):
        parts = []
        for split in (source.train, source.test):
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= source.num_classes):
                raise BadInputError(f"{source.dataset}: labels outside 0..{source.num_classes - 1}")
            copy = split.subset(np.arange(len(split)))
            copy.labels = split.labels + offset
            parts.append(copy)
        shifted.append(parts)
    test = Samples.concatenate([test for _, test in shifted])
    sizes = [source.num_classes for source in sources]
    class_names = [name for _, test in shifted for name in test.class_names]
    if len(class_names) != sum(sizes):
        class_names = [f"{source.dataset}:{c}" for source in sources for c in range(source.num_classes)]
    stream = Stream(
        train=Samples.concatenate([train for train, _ in shifted]),
        test=test,
        order=list(range(sum(sizes))),
        sizes=sizes,
        class_names=class_names,
        scenario=scenario,
        task_datasets=[source.dataset for source in sources],
        prompt_names=[name for source in sources for name in source.prompt_names],
        task_templates=[tuple(source.templates) for source in sources],
    )
    if mixing is None:
        return CompositeStream(stream)
    plan = mix_training_sets(
        [len(source.train) for source in sources],
        [mixing.groups.get(source.dataset) for source in sources],
        mixing.similarity,
        mixing.seed,
    )
    pieces, owners, file_list = [], [], []
    for task, parts in enumerate(plan):
        for source_task, indices in parts:
            piece = shifted[source_task][0].subset(indices)
            pieces.append(piece)
            owners.append(np.full(len(indices), task, dtype=np.int64))
            rows = sources[source_task].train_rows
            dataset = sources[source_task].dataset
            file_list.extend((task, dataset, rows[index], int(label)) for index, label in zip(indices, piece.labels))
    stream.train = Samples.concatenate(pieces)
    stream.train.class_names = class_names
    stream.train_task = np.concatenate(owners)
    return CompositeStream(stream, file_list)
