"""The CLIP methods end to end on a task-incremental composite stream of three generated datasets (MTIL's
protocol in miniature) with a tiny random CLIP: zero-shot metrics, KeepLoRA's orthogonality to its protected
subspaces, resume and re-evaluation."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from ntkcl.engine import rundir
from ntkcl.methods.keeplora import KeepLoRA
from ntkcl.methods.sequential_lora import Target
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


RANK = 4


def protected_update_leaks(run) -> dict[str, float]:
    """For every task after the first and every adapted projection whose protected basis P (saved with the
    previous task) leaves at least `RANK` free input dimensions: the relative part of the task's update ΔW
    (PyTorch's out x in layout) that acts on P, |ΔW P| / |ΔW|. Where fewer dimensions are free, rank-r
    directions orthogonal to P do not exist and the method cannot promise it."""
    checkpoints = rundir.finished_checkpoints(run)
    states = [load_file(path / rundir.STATE_FILE) for path in checkpoints]
    leaks = {}
    for task, (before, after) in enumerate(zip(states, states[1:]), 1):
        for name, basis in before.items():
            if not name.startswith("bases.") or basis.shape[0] - basis.shape[1] < RANK:
                continue
            tower, layer, role = name.split(".")[1].rsplit("_", 2)
            target = Target(tower, int(layer), role, basis.shape[0])
            merged = f"weight_deltas.{target.weight_key}.merged"
            update = (after[merged] - before[merged])[target.rows].double()
            leaks[f"task {task} {name}"] = float((update @ basis.double()).norm() / update.norm())
    return leaks


def test_keeplora_updates_leave_the_protected_subspace_alone_and_resume_exactly(cli, data_root, tmp_path, monkeypatch):
    """What KeepLoRA guarantees, on any CPU: every task's update of an adapted weight is orthogonal to the
    basis protected before it, so the weight's output on any input in that subspace (the earlier tasks'
    principal features, the pre-trained weight's principal directions) is unchanged; and a resumed run is
    identical to an uninterrupted one.

    How much less it forgets than sequential LoRA is a learning outcome whose margin depends on the machine's
    float kernels at this scale; that comparison belongs in a benchmark, not here."""
    rank = ("--set", f"method.params.rank={RANK}")
    keeplora = cli(*composite_run("keeplora", tmp_path / "keeplora", *rank))
    assert keeplora.code == 0, keeplora.err
    ours = keeplora.json()["metrics"]
    leaks = protected_update_leaks(next((tmp_path / "keeplora").iterdir()))
    assert len(leaks) >= 16, leaks  # at least the text tower's eight projections after each of two tasks
    assert max(leaks.values()) < 1e-4, leaks

    original = KeepLoRA.prepare_task

    def crash_on_last_task(self, task, data):
        if task.index == 2:
            raise RuntimeError("simulated crash")
        return original(self, task, data)

    monkeypatch.setattr(KeepLoRA, "prepare_task", crash_on_last_task)
    crashed = cli(*composite_run("keeplora", tmp_path / "crash", *rank))
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
