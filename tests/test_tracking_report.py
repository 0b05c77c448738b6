"""Experiment tracking (TensorBoard event files read back, W&B offline) and `ntkcl report` over two runs."""

import base64
import json

import pytest

from ntkcl.engine import rundir
from tests.conftest import only_run, tiny_digits_run, train_once

RUN = tiny_digits_run(init_classes=5, increment=5, batch_size=256)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logged_runs(tmp_path_factory):
    """A finetune run logged to TensorBoard and a simplecil run, two tasks of digits each."""
    runs = {
        "finetune": [*RUN, "--method", "finetune", "--log", "tensorboard"],
        "simplecil": [*RUN, "--method", "simplecil"],
    }
    return train_once(tmp_path_factory.mktemp("tracked"), runs)


def test_tensorboard_event_files_hold_epochs_and_accuracy_rows(logged_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, metrics = logged_runs["finetune"]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/train_acc", "train/lr", "train/images_per_s"} <= scalars
    assert {"accuracy/task_00", "accuracy/task_01", "accuracy/all_seen", "accuracy/new", "accuracy/old"} <= scalars
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in epochs if record["event"] == "epoch_end"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, pytest.approx(losses[0])),
        (2, pytest.approx(losses[1])),
    ]
    assert [e.value for e in events.Scalars("accuracy/all_seen")] == pytest.approx(metrics["all_seen_accuracy"])
    assert [e.value for e in events.Scalars("accuracy/task_00")] == pytest.approx(
        [row[0] for row in metrics["accuracy_matrix"]]
    )
    assert [e.step for e in events.Scalars("summary/forgetting")] == [2]
    assert events.Scalars("summary/forgetting")[0].value == pytest.approx(metrics["forgetting"])


def test_report_writes_a_page_and_pngs_for_two_runs(logged_runs, tmp_path, cli):
    (finetune, finetune_metrics), (simplecil, _) = logged_runs["finetune"], logged_runs["simplecil"]
    result = cli("report", finetune, simplecil, "--out", tmp_path / "report", "--json")
    assert result.code == 0, result.err
    written = result.json()
    names = sorted(path.name for path in (tmp_path / "report").iterdir())
    assert names == sorted(
        [
            "index.html",
            "all_seen_accuracy.png",
            "forgetting.png",
            f"accuracy_matrix-{finetune.name}.png",
            f"accuracy_matrix-{simplecil.name}.png",
            f"phase_times-{finetune.name}.png",
            f"phase_times-{simplecil.name}.png",
        ]
    )
    assert sorted(str(tmp_path / "report" / name) for name in names) == sorted(written["files"])
    for name in names:
        if name.endswith(".png"):
            assert (tmp_path / "report" / name).read_bytes().startswith(PNG_SIGNATURE), name
    page = (tmp_path / "report" / "index.html").read_text()
    assert finetune.name in page and simplecil.name in page
    # Self-contained: every picture is embedded, none is linked.
    embedded = page.count('src="data:image/png;base64,')
    assert embedded == 6 and 'src="accuracy' not in page
    assert f"time per phase of each task of {finetune.name}" in page
    first = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(first).startswith(PNG_SIGNATURE)
    row = next(row for row in written["runs"] if row["run"] == finetune.name)
    assert row["final_accuracy"] == pytest.approx(finetune_metrics["final_accuracy"])
    assert f"{finetune_metrics['final_accuracy']:.2f}" in page


def test_report_of_a_folder_without_results_exits_2(cli, tmp_path):
    result = cli("report", tmp_path, "--out", tmp_path / "report")
    assert result.code == 2
    assert "is not an ntkcl run directory" in result.err
    assert not (tmp_path / "report").exists()


def test_missing_tracker_package_exits_2_before_the_run(cli, data_root, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = cli(*RUN, "--method", "simplecil", "--log", "wandb", "--out", tmp_path / "runs")
    assert result.code == 2
    assert result.json()["error"] == "--log wandb needs wandb: pip install 'ntkcl[wandb]'"
    assert not (tmp_path / "runs").exists()


class FakeWandbRun:
    def __init__(self, **settings):
        self.settings, self.metrics, self.logged, self.finished = settings, {}, [], False

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        self.finished = True


def test_wandb_gets_the_run_offline_by_default_with_one_axis_per_kind(logged_runs, monkeypatch):
    """The W&B calls, against a stand-in module: offline unless WANDB_MODE, id = run folder, resumable."""
    import sys
    import types

    from ntkcl.engine.metrics import AccuracyMatrix
    from ntkcl.engine.tracking import Tracking

    runs = []
    fake = types.SimpleNamespace(init=lambda **settings: runs.append(FakeWandbRun(**settings)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir, _ = logged_runs["simplecil"]
    tracking = Tracking(["wandb"], run_dir, {"optim": {"lr": 0.1}})
    tracking.epoch_end({"task": 1, "epoch": 0, "lr": 0.1, "loss": 0.5, "images_per_s": 100.0}, 3)
    tracking.task_end(AccuracyMatrix([[8], [6, 9]], [[10], [10, 10]]))
    tracking.close()
    (run,) = runs
    assert run.settings["mode"] == "offline" and run.settings["resume"] == "allow"
    assert run.settings["id"] == run_dir.name and run.settings["dir"] == str(run_dir)
    assert run.settings["config"] == {"optim": {"lr": 0.1}}
    assert run.metrics["train/*"] == "epoch" and run.metrics["accuracy/*"] == "task"
    assert run.logged[0] == {"train/loss": 0.5, "train/lr": 0.1, "train/images_per_s": 100.0, "epoch": 3}
    assert run.logged[1]["task"] == 2 and run.logged[1]["accuracy/task_01"] == pytest.approx(90.0)
    assert run.logged[1]["accuracy/all_seen"] == pytest.approx(75.0)
    assert run.logged[1]["summary/forgetting"] == pytest.approx(20.0)
    assert run.finished


@pytest.mark.slow  # W&B starts its own service process: tens of seconds on two cores
def test_wandb_logs_offline_into_the_run_folder(cli, data_root, tmp_path, monkeypatch):
    """With the real package (not a test dependency; skipped without it): WANDB_MODE=offline needs no network."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = cli(*RUN, "--method", "simplecil", "--log", "wandb", "--out", tmp_path / "runs")
    assert result.code == 0, result.err
    run = only_run(tmp_path / "runs")
    (offline,) = (run / "wandb").glob("offline-run-*")
    records = offline / f"run-{run.name}.wandb"
    assert records.is_file() and records.stat().st_size > 0
    assert rundir.read_json(run / rundir.CONFIG_FILE)["runtime"]["log"] == ["wandb"]
