"""Resuming inside a task: a run killed after epoch 1 of 3, or stopped by Ctrl+C in the middle of an epoch,
continues from its snapshot and ends with exactly the accuracy matrix (and epoch losses) of an
uninterrupted run. Two tasks of digits (5 + 5 classes) on the tiny ViT, three epochs per task."""

import json
import signal

import pytest

from ntkcl.engine import rundir
from ntkcl.methods.ntk_cl import NTKCL
from ntkcl.methods.simplecil import SimpleCIL
from tests.conftest import only_run, tiny_digits_run, train_once

# A still smaller ViT than the other tests' (16 pixels, one block): the runs here train three epochs per task.
SMALLER = ["--set", "backbone.model_kwargs={img_size=16, patch_size=8, depth=1}"]
RUN = [*tiny_digits_run(init_classes=5, increment=5, epochs=3, batch_size=256), *SMALLER]


def epoch_losses(run):
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["task"], r["epoch"], r["loss"]) for r in records if r["event"] == "epoch_end"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs of each method, shared by the tests of this module: name -> (metrics, run folder)."""
    runs = train_once(tmp_path_factory.mktemp("reference"), {m: [*RUN, "--method", m] for m in ("ntk-cl", "simplecil")})
    return {name: (metrics, run) for name, (run, metrics) in runs.items()}


def test_killed_after_epoch_one_resumes_to_the_same_matrix(cli, data_root, tmp_path, monkeypatch, references):
    original = rundir.save_snapshot
    saved = []

    def save_then_die(run_dir, position, state):
        path = original(run_dir, position, state)
        saved.append(path.name)
        if (position["task"], position["epoch"], position["step"]) == (1, 1, 0):
            raise RuntimeError("killed after epoch 1 of task 1")
        return path

    monkeypatch.setattr(rundir, "save_snapshot", save_then_die)
    crashed = cli(*RUN, "--method", "ntk-cl", "--out", tmp_path / "crash")
    assert crashed.code == 1 and "killed after epoch 1" in crashed.err
    run = only_run(tmp_path / "crash")
    # One snapshot per epoch; the older ones are pruned, the finished task's are removed.
    assert saved[-1] == "task-01-epoch-001-step-000000"
    assert [path.name for path in (run / "snapshots").iterdir()] == ["task-01-epoch-001-step-000000"]
    assert [path.name for path in rundir.finished_checkpoints(run)] == ["task-00"]

    monkeypatch.setattr(rundir, "save_snapshot", original)
    resumed = cli("train", "--resume", run, "-q", "--json")
    assert resumed.code == 0, resumed.err
    reference_metrics, reference_run = references["ntk-cl"]
    assert resumed.json()["metrics"]["correct"] == reference_metrics["correct"]
    assert epoch_losses(run) == epoch_losses(reference_run)
    assert not any((run / "snapshots").iterdir())


def test_ctrl_c_mid_epoch_saves_a_snapshot_and_resume_matches(cli, data_root, tmp_path, monkeypatch, references):
    """With `runtime.snapshot_epochs=0` the only snapshot is the one Ctrl+C writes after the step in progress."""
    original_step, original_save = NTKCL.training_step, rundir.save_snapshot
    calls, saved = [], []

    def interrupt_in_the_middle_of_an_epoch(self, images, labels):
        calls.append(self._task.index)
        if calls.count(1) == 5:  # task 1 has 721 images, 3 steps per epoch: its second epoch, second step
            signal.raise_signal(signal.SIGINT)
        return original_step(self, images, labels)

    def counted_save(run_dir, position, state):
        saved.append(position)
        return original_save(run_dir, position, state)

    monkeypatch.setattr(NTKCL, "training_step", interrupt_in_the_middle_of_an_epoch)
    monkeypatch.setattr(rundir, "save_snapshot", counted_save)
    interrupted = cli(*RUN, "--method", "ntk-cl", "--set", "runtime.snapshot_epochs=0", "--out", tmp_path / "ctrl-c")
    assert interrupted.code == 130
    run = only_run(tmp_path / "ctrl-c")
    assert f"--resume {run}" in interrupted.err
    assert [(p["task"], p["epoch"], p["step"], p["updates"]) for p in saved] == [(1, 1, 2, 5)]
    assert [path.name for path in (run / "snapshots").iterdir()] == ["task-01-epoch-001-step-000002"]

    monkeypatch.setattr(NTKCL, "training_step", original_step)
    resumed = cli("train", "--resume", run, "-q", "--json")
    assert resumed.code == 0, resumed.err
    reference_metrics, reference_run = references["ntk-cl"]
    assert resumed.json()["metrics"]["correct"] == reference_metrics["correct"]
    assert epoch_losses(run) == epoch_losses(reference_run)
    assert len(saved) == 1  # snapshot_epochs=0 is kept by the resumed session


def test_method_without_training_resumes_after_its_last_task(cli, data_root, tmp_path, monkeypatch, references):
    """SimpleCIL trains nothing, so it has no epochs to snapshot: a kill in task 1 resumes after task 0."""

    def die(self, task, data):
        raise RuntimeError("killed in task 1")

    original = SimpleCIL.end_task
    monkeypatch.setattr(
        SimpleCIL, "end_task", lambda self, task, data: (die if task.index else original)(self, task, data)
    )
    crashed = cli(*RUN, "--method", "simplecil", "--out", tmp_path / "crash")
    assert crashed.code == 1
    run = only_run(tmp_path / "crash")
    assert not (run / "snapshots").exists()
    monkeypatch.setattr(SimpleCIL, "end_task", original)
    resumed = cli("train", "--resume", run, "-q", "--json")
    assert resumed.json()["metrics"]["correct"] == references["simplecil"][0]["correct"]
