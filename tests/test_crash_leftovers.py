"""What a killed run leaves behind: half-written files and folders, a folder without run.json, metrics one
task behind its checkpoints. Resume cleans up and continues; eval says what happened."""

import json
import shutil

import pytest

from ntkcl.engine import rundir
from ntkcl.engine.metrics import AccuracyMatrix
from tests.conftest import TINY_BACKBONE_FLAGS
from tests.test_cli_bad_input import assert_one_line_error

# Three tasks of simplecil (no training, deterministic) on the tiny ViT: about a second.
RUN = ["train", "--stream", "digits", "--method", "simplecil", *TINY_BACKBONE_FLAGS]
RUN += ["--init-classes", "4", "--increment", "3", "--num-workers", "0", "-q", "--json"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished run and its data root, trained once for the module."""
    from ntkcl.cli import main

    base = tmp_path_factory.mktemp("leftovers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NTKCL_DATA_ROOT", str(base / "data"))
        main([*RUN, "--out", str(base / "runs")])
    (run,) = (base / "runs").iterdir()
    return run, base / "data"


@pytest.fixture
def copy_of_reference(reference, tmp_path, monkeypatch):
    run, data = reference
    monkeypatch.setenv("NTKCL_DATA_ROOT", str(data))
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy


def reference_metrics(reference) -> dict:
    return json.loads((reference[0] / rundir.METRICS_FILE).read_text())


def test_resume_removes_what_killed_writes_left(cli, reference, copy_of_reference):
    run = copy_of_reference
    checkpoints = run / rundir.CHECKPOINT_DIR
    shutil.rmtree(checkpoints / "task-02")
    # Killed while writing task 2, before renaming task 1's retired copy away, and while rewriting metrics.
    for stale in (".task-02.staging-4242", ".task-01.staging-old-4242"):
        (checkpoints / stale).mkdir()
        (checkpoints / stale / rundir.STATE_FILE).write_bytes(b"half")
    (run / ".metrics.json.tmp-4242").write_text("{")
    result = cli("train", "--resume", run, "-q", "--json")
    assert result.code == 0, result.err
    assert result.json()["metrics"]["correct"] == reference_metrics(reference)["correct"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["task-00", "task-01", "task-02"]
    assert not list(run.glob(".*"))


def test_folder_without_run_json_is_started_again_by_resume(cli, reference, copy_of_reference):
    """Killed after config.json and before run.json: no task finished, the config says how to start it."""
    run = copy_of_reference
    for name in (rundir.RUN_FILE, rundir.METRICS_FILE, rundir.MATRIX_FILE, rundir.LOG_FILE):
        (run / name).unlink()
    shutil.rmtree(run / rundir.CHECKPOINT_DIR)
    for command in (("eval", run), ("export", run, "--out", run.parent / "export")):
        assert_one_line_error(cli(*command), "no task finished", f"ntkcl train --resume {run}")
    result = cli("train", "--resume", run, "-q", "--json")
    assert result.code == 0, result.err
    assert result.json()["metrics"]["correct"] == reference_metrics(reference)["correct"]
    assert (run / rundir.RUN_FILE).is_file()


def test_eval_tells_metrics_one_task_behind_from_a_mismatch(cli, reference, copy_of_reference):
    """Killed between task 2's checkpoint rename and its metrics update."""
    run = copy_of_reference
    recorded = reference_metrics(reference)
    rows = [list(zip(c, n)) for c, n in zip(recorded["correct"][:2], recorded["total"][:2])]
    rundir.write_metrics(run, AccuracyMatrix.from_rows(rows), finished=False)
    behind = cli("eval", run, "--json", "-q")
    assert behind.code == 0, behind.err
    assert behind.json()["training_metrics"] == "last_task_unrecorded"
    assert behind.json()["matches_training"] is False
    human = cli("eval", run, "-q").out
    assert "tasks 0-1" in human and "metrics of task 2 were not recorded" in human and "DIFFERENT" not in human

    rows[1][0] = (rows[1][0][0] - 1, rows[1][0][1])  # a recorded count that the checkpoints do not give
    rundir.write_metrics(run, AccuracyMatrix.from_rows(rows), finished=False)
    assert "DIFFERENT from the one training reported" in cli("eval", run, "-q").out
