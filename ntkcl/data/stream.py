"""Class-incremental streams.

The class order follows the PyCIL / PILOT / NTK-CL convention: `np.random.seed(seed);
np.random.permutation(n)`, and a sample of base label `y` gets stream label `order.index(y)`. Task sizes
follow their DataManager: `init_classes`, then `increment` while it fits, then the remainder. The
class-order seed is deliberately separate from the training seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ntkcl.data.plugin import Samples
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
class ClassIncrementalStream:
    """Train and test samples relabelled into stream order and cut into tasks."""

    train: Samples
    test: Samples
    order: list[int]
    sizes: list[int]
    class_names: list[str]
    increment: int | None = None

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
    ) -> ClassIncrementalStream:
        order = class_order(num_classes, order_seed, explicit_order)
        sizes = task_sizes(num_classes, init_classes, increment)
        stream_label = np.empty(num_classes, dtype=np.int64)
        stream_label[np.asarray(order)] = np.arange(num_classes)
        names = list(train.class_names) or [str(c) for c in range(num_classes)]
        relabelled = []
        for samples in (train, test):
            if len(samples) and (samples.labels.min() < 0 or samples.labels.max() >= num_classes):
                raise BadInputError(f"labels outside 0..{num_classes - 1}")
            copy = samples.subset(np.arange(len(samples)))
            copy.labels = stream_label[samples.labels]
            relabelled.append(copy)
        return cls(relabelled[0], relabelled[1], order, sizes, [names[c] for c in order], increment)

    @property
    def num_tasks(self) -> int:
        return len(self.sizes)

    def task(self, index: int) -> TaskInfo:
        return TaskInfo(index, self.num_tasks, sum(self.sizes[:index]), self.sizes[index], self.increment)

    def tasks(self) -> list[TaskInfo]:
        return [self.task(i) for i in range(self.num_tasks)]

    def train_indices(self, task: TaskInfo) -> np.ndarray:
        """Training samples of the task's own classes only (no replay)."""
        labels = self.train.labels
        return np.flatnonzero((labels >= task.known_classes) & (labels < task.total_classes))

    def test_indices(self, upto: TaskInfo) -> np.ndarray:
        """Test samples of every class seen up to and including task `upto`."""
        return np.flatnonzero(self.test.labels < upto.total_classes)

    def task_of_label(self) -> np.ndarray:
        """Task index of each stream label."""
        return np.repeat(np.arange(self.num_tasks), self.sizes)
