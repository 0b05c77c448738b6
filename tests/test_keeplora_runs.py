"""The CLIP methods end to end on a task-incremental composite stream of three generated datasets (MTIL's
protocol in miniature) with a tiny random CLIP: zero-shot metrics, KeepLoRA against sequential LoRA, resume
and re-evaluation."""

from __future__ import annotations

import pytest

from ntkcl.methods.keeplora import KeepLoRA
from tests.conftest import TINY_CLIP_FLAGS

pytestmark = pytest.mark.usefixtures("one_thread")

# Three generated datasets of 3, 5 and 4 classes, 32 training and 8 test images per class.
MEMBERS = (
    "["
    + ", ".join(
        f'{{dataset="synthetic", options={{classes={classes}, per_class=40, seed={seed}}}}}'
        for seed, classes in ((1, 3), (2, 5), (3, 4))
    )
    + "]"
)


def composite_run(method: str, out, *extra) -> list:
    """A run of `method` with the keeplora presets' optimisation (AdamW, OneCycle per batch, seed 42) at a
    learning rate a random CLIP learns from in five epochs."""
    return [
        "train", "--stream", "three-synthetic", "--set", f"stream.members={MEMBERS}",
        "--scenario", "task-incremental", "--method", method, *TINY_CLIP_FLAGS,
        "--epochs", "5", "--batch-size", "16", "--set", "optim.lr=0.05", "--num-workers", "0",
        "--out", out, "-q", "--json", *extra,
    ]  # fmt: skip


def forgetting(matrix: list[list[float]]) -> float:
    """Mean over the tasks before the last of the best accuracy reached after training them minus the last."""
    last = len(matrix) - 1
    return sum(max(matrix[t][i] for t in range(i, last)) - matrix[last][i] for i in range(last)) / last


def test_zero_shot_scores_every_task_before_and_after_with_mtil_metrics(cli, data_root, tmp_path):
    result = cli(*composite_run("zero-shot", tmp_path))
    assert result.code == 0, result.err
    metrics = result.json()["metrics"]
    matrix, zero_shot = metrics["accuracy_matrix"], metrics["zero_shot_accuracy"]
    # Nothing is trained: every row is the zero-shot row.
    assert all(row == zero_shot for row in matrix)
    assert metrics["transfer"] == pytest.approx((zero_shot[1] + zero_shot[2]) / 2)
    assert metrics["avg"] == pytest.approx(sum(zero_shot) / 3)
    assert metrics["last"] == pytest.approx(sum(zero_shot) / 3)


def test_keeplora_forgets_less_than_sequential_lora_and_resumes_exactly(cli, data_root, tmp_path, monkeypatch):
    sequential = cli(*composite_run("sequential-lora", tmp_path / "sequential"))
    assert sequential.code == 0, sequential.err
    keeplora = cli(*composite_run("keeplora", tmp_path / "keeplora"))
    assert keeplora.code == 0, keeplora.err
    ours, theirs = keeplora.json()["metrics"], sequential.json()["metrics"]
    assert forgetting(ours["accuracy_matrix"]) + 10 < forgetting(theirs["accuracy_matrix"])
    assert ours["last"] > theirs["last"] + 10
    assert ours["accuracy_matrix"][0][0] > 2 * ours["zero_shot_accuracy"][0]  # it learns

    original = KeepLoRA.prepare_task

    def crash_on_last_task(self, task, data):
        if task.index == 2:
            raise RuntimeError("simulated crash")
        return original(self, task, data)

    monkeypatch.setattr(KeepLoRA, "prepare_task", crash_on_last_task)
    crashed = cli(*composite_run("keeplora", tmp_path / "crash"))
    assert crashed.code == 1
    monkeypatch.setattr(KeepLoRA, "prepare_task", original)
    run = next((tmp_path / "crash").iterdir())
    resumed = cli("train", "--resume", run, "-q", "--json")
    assert resumed.code == 0, resumed.err
    for key in ("correct", "total", "zero_shot_correct", "transfer", "avg", "last"):
        assert resumed.json()["metrics"][key] == ours[key], key
    evaluated = cli("eval", run, "--json", "-q")
    assert evaluated.code == 0, evaluated.err
    assert evaluated.json()["matches_training"] is True
