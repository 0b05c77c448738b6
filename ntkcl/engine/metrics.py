"""Continual-learning metrics from per-task correct/total counts.

Notation (0-based tasks, T tasks so far, last step L = T-1): R[t][i] is the accuracy (%) on the test images
of task i's classes after training task t. The matrix is lower-triangular (i <= t) unless the method
classifies tasks it has not trained (task-incremental multi-domain streams such as MTIL): then every row
holds every task of the stream, and a zero-shot row Z[i] (before the first task) comes with it.

* all-seen accuracy a_t = sum_i correct[t][i] / sum_i total[t][i]  (sample-weighted over tasks 0..t)
* A_T (final accuracy) = a_L
* mean incremental accuracy Ā = (1/T) sum_t a_t                      (the papers' "average accuracy")
* forgetting F = (1/L) sum_{i<L} ( max_{i<=t<L} R[t][i] - R[L][i] )  (Chaudhry et al. 2018; undefined for T=1)
* backward transfer BWT = (1/L) sum_{i<L} ( R[L][i] - R[i][i] )      (Lopez-Paz & Ranzato 2017; undefined for T=1)
* old accuracy at step t: sample-weighted accuracy over tasks i<t (undefined at t=0); new accuracy: R[t][t]

MTIL (Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language
Models", ICCV 2023, arXiv 2303.06628; as computed by KeepLoRA's `cal_MTIL_metrics`), for a full N x N matrix
after all N tasks, unweighted means over datasets:

* Transfer = (1/(N-1)) sum_{i=1..N-1} mean_{j<i} R[j][i]   (accuracy on dataset i before it is trained)
* Avg      = (1/N) sum_i mean_{j=0..N-1} R[j][i]
* Last     = (1/N) sum_i R[N-1][i]

Methods that retrieve a task per test image (PROTEUS) also get a retrieval matrix of the same shape on
class-incremental streams: Ret[t][i] is the percentage of task i's test images whose retrieved task is i,
after training task t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def _check_counts(correct: Sequence[int], total: Sequence[int], what: str) -> None:
    if len(correct) != len(total):
        raise ValueError(f"{what}: correct and total differ in length")
    if any(n <= 0 for n in total) or any(not 0 <= c <= n for c, n in zip(correct, total)):
        raise ValueError(f"{what} has impossible counts")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass
class AccuracyMatrix:
    """Counts `correct[t][i]` and `total[t][i]`: lower-triangular (i <= t), or, with a zero-shot row
    (`zero_shot_correct` / `zero_shot_total`, before the first task), full rows of every task of the stream.
    """

    correct: list[list[int]]
    total: list[list[int]]
    zero_shot_correct: list[int] | None = None
    zero_shot_total: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.correct) != len(self.total):
            raise ValueError("correct and total have different numbers of rows")
        if (self.zero_shot_correct is None) != (self.zero_shot_total is None):
            raise ValueError("the zero-shot row needs both correct and total")
        if self.zero_shot_correct is not None:
            _check_counts(self.zero_shot_correct, self.zero_shot_total, "the zero-shot row")
        for t, (row_c, row_n) in enumerate(zip(self.correct, self.total)):
            expected = t + 1 if self.zero_shot_correct is None else len(self.zero_shot_correct)
            if len(row_c) != expected or len(row_n) != expected:
                raise ValueError(f"row {t} must have {expected} entries")
            _check_counts(row_c, row_n, f"row {t}")
        if self.zero_shot_correct is not None and len(self.correct) > len(self.zero_shot_correct):
            raise ValueError("a full matrix cannot have more rows than tasks")

    @classmethod
    def from_rows(
        cls, rows: Sequence[Sequence[tuple[int, int]]], zero_shot: Sequence[tuple[int, int]] | None = None
    ) -> AccuracyMatrix:
        """From rows of (correct, total) pairs (and the zero-shot row, if any)."""
        return cls(
            [[int(c) for c, _ in row] for row in rows],
            [[int(n) for _, n in row] for row in rows],
            None if zero_shot is None else [int(c) for c, _ in zero_shot],
            None if zero_shot is None else [int(n) for _, n in zero_shot],
        )

    @property
    def num_tasks(self) -> int:
        """Tasks trained so far (rows)."""
        return len(self.correct)

    @property
    def is_full(self) -> bool:
        """Every row covers every task of the stream, untrained ones included (there is a zero-shot row)."""
        return self.zero_shot_correct is not None

    @property
    def width(self) -> int:
        """Tasks evaluated per row: every task of the stream for a full matrix, else the rows so far."""
        return len(self.zero_shot_correct) if self.is_full else self.num_tasks

    def accuracy(self, t: int, i: int) -> float:
        return 100.0 * self.correct[t][i] / self.total[t][i]

    def matrix(self) -> list[list[float | None]]:
        """R as a list of rows; None where a task was not evaluated (above the diagonal unless full)."""
        return [
            [self.accuracy(t, i) if i < len(self.correct[t]) else None for i in range(self.width)]
            for t in range(self.num_tasks)
        ]

    def zero_shot_accuracy(self) -> list[float] | None:
        if self.zero_shot_correct is None:
            return None
        return [100.0 * c / n for c, n in zip(self.zero_shot_correct, self.zero_shot_total)]

    def _complete_full(self) -> bool:
        return self.is_full and self.num_tasks == self.width

    def transfer_per_task(self) -> list[float | None] | None:
        """MTIL Transfer of each dataset i: mean_{j<i} R[j][i] (None for the first); None unless complete."""
        if not self._complete_full():
            return None
        return [None] + [_mean([self.accuracy(j, i) for j in range(i)]) for i in range(1, self.width)]

    def transfer(self) -> float | None:
        per_task = self.transfer_per_task()
        return None if per_task is None or len(per_task) < 2 else _mean(per_task[1:])

    def average_per_task(self) -> list[float] | None:
        """MTIL Avg of each dataset i: mean over all rows j of R[j][i]; None unless complete."""
        if not self._complete_full():
            return None
        return [_mean([self.accuracy(j, i) for j in range(self.num_tasks)]) for i in range(self.width)]

    def average(self) -> float | None:
        per_task = self.average_per_task()
        return None if per_task is None else _mean(per_task)

    def last(self) -> float | None:
        """MTIL Last: mean over datasets of the final row; None unless complete."""
        if not self._complete_full():
            return None
        return _mean([self.accuracy(self.num_tasks - 1, i) for i in range(self.width)])

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

    def forgetting_per_task(self) -> list[float] | None:
        """max_{i<=t<L} R[t][i] - R[L][i] for each task i < L; None for a single task."""
        last = self.num_tasks - 1
        if last == 0:
            return None
        return [max(self.accuracy(t, i) for t in range(i, last)) - self.accuracy(last, i) for i in range(last)]

    def forgetting(self) -> float | None:
        drops = self.forgetting_per_task()
        return None if drops is None else _mean(drops)

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
            "zero_shot_accuracy": self.zero_shot_accuracy(),
            "zero_shot_correct": self.zero_shot_correct,
            "zero_shot_total": self.zero_shot_total,
            "transfer": self.transfer(),
            "avg": self.average(),
            "last": self.last(),
            "transfer_per_task": self.transfer_per_task(),
            "avg_per_task": self.average_per_task(),
        }

    def to_csv(self, retrieval: AccuracyMatrix | None = None) -> str:
        """`acc_matrix.csv`: one row per training step (after a `zero-shot` row where there is one), one column
        per task, empty where a task was not evaluated; with `retrieval`, columns `retrieval_task_i` follow
        with the task-retrieval accuracy Ret[t][i]."""
        header = "after_task," + ",".join(f"task_{i}" for i in range(self.width))
        extra = retrieval.matrix() if retrieval is not None else [[] for _ in range(self.num_tasks)]
        if retrieval is not None:
            header += "," + ",".join(f"retrieval_task_{i}" for i in range(retrieval.width))
        lines = [header]
        zero_shot = self.zero_shot_accuracy()
        if zero_shot is not None:
            lines.append("zero-shot," + ",".join(f"{value:.4f}" for value in zero_shot))
        for t, row in enumerate(self.matrix()):
            lines.append(f"{t}," + ",".join("" if value is None else f"{value:.4f}" for value in row + extra[t]))
        return "\n".join(lines) + "\n"


def retrieval_summary(retrieval: AccuracyMatrix) -> dict:
    """`metrics.json`'s `task_retrieval`: Ret[t][i], the pooled retrieval accuracy per step, and the counts."""
    return {
        "accuracy_matrix": retrieval.matrix(),
        "all_seen_accuracy": retrieval.all_seen_accuracy(),
        "correct": retrieval.correct,
        "total": retrieval.total,
    }
