"""End-to-end engine behaviour on digits with a tiny ViT: reproducibility, crash + resume, Ctrl+C, eval."""

import json
import os
import shutil

import pytest

from ntkcl.engine import rundir
from ntkcl.methods.finetune import Finetune
from tests.conftest import crashing_at_task, tiny_digits_run

# Three tasks (4 + 3 + 3 classes), one short epoch each: a few seconds on two cores.
FINETUNE_RUN = [*tiny_digits_run(init_classes=4, increment=3, batch_size=64), "--method", "finetune"]


def train(cli, out, *extra):
    result = cli(*FINETUNE_RUN, "--out", out, *extra)
    return result


def only_run(out):
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1
    return runs[0]


@pytest.fixture
def reference_metrics(cli, data_root, tmp_path):
    result = train(cli, tmp_path / "reference")
    assert result.code == 0, result.err
    return result.json()["metrics"]


def test_run_directory_contents(reference_metrics, tmp_path):
    run = only_run(tmp_path / "reference")
    assert run.name.startswith("digits-finetune-")
    for name in ("config.json", "run.json", "metrics.json", "acc_matrix.csv", "log.jsonl"):
        assert (run / name).is_file(), name
    assert [p.name for p in rundir.finished_checkpoints(run)] == ["task-00", "task-01", "task-02"]
    record = json.loads((run / "run.json").read_text())
    assert len(record["backbone"]["weights_sha256"]) == 64
    assert record["task_sizes"] == [4, 3, 3]
    assert record["seeds"] == {"training": 0, "class_order": 0}
    assert sorted(record["class_order"]) == list(range(10))
    config = json.loads((run / "config.json").read_text())
    assert config["stream"]["init_classes"] == 4 and config["method"]["params"]["bottleneck"] == 16
    events = [json.loads(line)["event"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert events.count("epoch_end") == 3 and events.count("task_end") == 3
    assert reference_metrics["finished"] is True


def test_same_seed_same_metrics(cli, reference_metrics, tmp_path):
    again = train(cli, tmp_path / "again")
    assert again.code == 0
    assert again.json()["metrics"]["correct"] == reference_metrics["correct"]


def test_crash_then_resume_matches_uninterrupted_run(cli, reference_metrics, tmp_path):
    with crashing_at_task(Finetune, 2):
        crashed = train(cli, tmp_path / "crash")
    assert crashed.code == 1
    assert "simulated crash" in crashed.err and "Traceback" not in crashed.err
    run = only_run(tmp_path / "crash")
    assert [p.name for p in rundir.finished_checkpoints(run)] == ["task-00", "task-01"]
    partial = json.loads((run / "metrics.json").read_text())
    assert partial["finished"] is False and partial["num_tasks"] == 2

    resumed = cli("train", "--resume", run, "-q", "--json")
    assert resumed.code == 0, resumed.err
    metrics = resumed.json()["metrics"]
    assert metrics["correct"] == reference_metrics["correct"]
    assert metrics["total"] == reference_metrics["total"]


def test_ctrl_c_keeps_finished_tasks_and_resume_finishes(cli, reference_metrics, tmp_path, monkeypatch):
    original = Finetune.begin_task

    def interrupt_second_task(self, task):
        if task.index == 1:
            raise KeyboardInterrupt
        return original(self, task)

    monkeypatch.setattr(Finetune, "begin_task", interrupt_second_task)
    interrupted = train(cli, tmp_path / "ctrl-c")
    assert interrupted.code == 130
    run = only_run(tmp_path / "ctrl-c")
    assert "--resume" in interrupted.err and str(run) in interrupted.err
    assert [p.name for p in rundir.finished_checkpoints(run)] == ["task-00"]
    monkeypatch.setattr(Finetune, "begin_task", original)
    resumed = cli("train", "--resume", run, "-q", "--json")
    assert resumed.json()["metrics"]["correct"] == reference_metrics["correct"]


def test_half_written_checkpoint_is_ignored(cli, reference_metrics, tmp_path):
    run = only_run(tmp_path / "reference")
    copy = tmp_path / "copy" / run.name
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "task-02")
    (copy / "checkpoints" / ".task-02.staging-1234").mkdir()  # what a crash during the rename would leave
    assert [p.name for p in rundir.finished_checkpoints(copy)] == ["task-00", "task-01"]
    resumed = cli("train", "--resume", copy, "-q", "--json")
    assert resumed.json()["metrics"]["correct"] == reference_metrics["correct"]


def test_eval_recomputes_the_reported_matrix(cli, reference_metrics, tmp_path):
    run = only_run(tmp_path / "reference")
    result = cli("eval", run, "--json", "-q")
    assert result.code == 0, result.err
    document = result.json()
    assert document["matches_training"] is True
    assert document["metrics"]["correct"] == reference_metrics["correct"]
    human = cli("eval", run, "-q")
    assert "identical to the one training reported" in human.out


def test_finished_run_resumes_to_the_same_metrics(cli, reference_metrics, tmp_path):
    run = only_run(tmp_path / "reference")
    before = os.stat(run / "checkpoints" / "task-02" / "learned_state.safetensors").st_mtime_ns
    result = cli("train", "--resume", run, "-q", "--json")
    assert result.json()["metrics"]["correct"] == reference_metrics["correct"]
    assert os.stat(run / "checkpoints" / "task-02" / "learned_state.safetensors").st_mtime_ns == before
