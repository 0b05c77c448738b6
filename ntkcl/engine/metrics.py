"""Class-incremental metrics from per-task correct/total counts.

Notation (0-based tasks, T tasks so far, last step L = T-1): R[t][i] is the accuracy (%) on the test images
of task i's classes after training task t, defined for i <= t.

* all-seen accuracy a_t = sum_i correct[t][i] / sum_i total[t][i]  (sample-weighted over tasks 0..t)
* A_T (final accuracy) = a_L
* mean incremental accuracy Ā = (1/T) sum_t a_t                      (the papers' "average accuracy")
* forgetting F = (1/L) sum_{i<L} ( max_{i<=t<L} R[t][i] - R[L][i] )  (Chaudhry et al. 2018; undefined for T=1)
* backward transfer BWT = (1/L) sum_{i<L} ( R[L][i] - R[i][i] )      (Lopez-Paz & Ranzato 2017; undefined for T=1)
* old accuracy at step t: sample-weighted accuracy over tasks i<t (undefined at t=0); new accuracy: R[t][t]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class AccuracyMatrix:
    """Lower-triangular counts: `correct[t][i]` and `total[t][i]` for i <= t."""

    correct: list[list[int]]
    total: list[list[int]]

    def __post_init__(self) -> None:
        if len(self.correct) != len(self.total):
            raise ValueError("correct and total have different numbers of rows")
        for t, (row_c, row_n) in enumerate(zip(self.correct, self.total)):
            if len(row_c) != t + 1 or len(row_n) != t + 1:
                raise ValueError(f"row {t} must have {t + 1} entries")
            if any(n <= 0 for n in row_n) or any(not 0 <= c <= n for c, n in zip(row_c, row_n)):
                raise ValueError(f"row {t} has impossible counts")

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[tuple[int, int]]]) -> AccuracyMatrix:
        """From rows of (correct, total) pairs."""
        return cls([[int(c) for c, _ in row] for row in rows], [[int(n) for _, n in row] for row in rows])

    @property
    def num_tasks(self) -> int:
        return len(self.correct)

    def accuracy(self, t: int, i: int) -> float:
        return 100.0 * self.correct[t][i] / self.total[t][i]

    def matrix(self) -> list[list[float | None]]:
        """R as a T x T list with None above the diagonal."""
        size = self.num_tasks
        return [[self.accuracy(t, i) if i <= t else None for i in range(size)] for t in range(size)]

    def _pooled(self, t: int, tasks: range) -> float | None:
        if len(tasks) == 0:
            return None
        correct = sum(self.correct[t][i] for i in tasks)
        total = sum(self.total[t][i] for i in tasks)
        return 100.0 * correct / total

    def all_seen_accuracy(self) -> list[float]:
        return [self._pooled(t, range(t + 1)) for t in range(self.num_tasks)]

    def old_accuracy(self) -> list[float | None]:
        return [self._pooled(t, range(t)) for t in range(self.num_tasks)]

    def new_accuracy(self) -> list[float]:
        return [self.accuracy(t, t) for t in range(self.num_tasks)]

    def final_accuracy(self) -> float:
        return self.all_seen_accuracy()[-1]

    def mean_incremental_accuracy(self) -> float:
        curve = self.all_seen_accuracy()
        return sum(curve) / len(curve)

    def forgetting(self) -> float | None:
        last = self.num_tasks - 1
        if last == 0:
            return None
        drops = [max(self.accuracy(t, i) for t in range(i, last)) - self.accuracy(last, i) for i in range(last)]
        return sum(drops) / last

    def backward_transfer(self) -> float | None:
        last = self.num_tasks - 1
        if last == 0:
            return None
        return sum(self.accuracy(last, i) - self.accuracy(i, i) for i in range(last)) / last

    def summary(self) -> dict:
        """Everything `metrics.json` holds."""
        return {
            "num_tasks": self.num_tasks,
            "final_accuracy": self.final_accuracy(),
            "mean_incremental_accuracy": self.mean_incremental_accuracy(),
            "forgetting": self.forgetting(),
            "backward_transfer": self.backward_transfer(),
            "all_seen_accuracy": self.all_seen_accuracy(),
            "old_accuracy": self.old_accuracy(),
            "new_accuracy": self.new_accuracy(),
            "accuracy_matrix": self.matrix(),
            "correct": self.correct,
            "total": self.total,
        }

    def to_csv(self) -> str:
        """`acc_matrix.csv`: one row per training step, one column per task, empty above the diagonal."""
        header = "after_task," + ",".join(f"task_{i}" for i in range(self.num_tasks))
        lines = [header]
        for t, row in enumerate(self.matrix()):
            lines.append(f"{t}," + ",".join("" if value is None else f"{value:.4f}" for value in row))
        return "\n".join(lines) + "\n"
