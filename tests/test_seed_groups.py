"""Seed groups: `ntkcl train --seeds` on digits, a member killed and resumed, a repeat that runs nothing, and the
mean ± sample sd of `train`, `eval` and `report` checked by hand against the members' metrics.json."""

import json
import math
import statistics

import pytest

from ntkcl.engine import rundir
from ntkcl.engine.groups import GROUP_FILE, mean_sd, parse_seeds
from ntkcl.errors import BadInputError
from tests.conftest import run_cli, tiny_digits_run

GROUP_RUN = [*tiny_digits_run(init_classes=5, increment=5, batch_size=256), "--method", "finetune"]
SEEDS = [0, 1, 2]


def _member_metrics(group):
    return [json.loads((group / f"seed-{seed}" / rundir.METRICS_FILE).read_text()) for seed in SEEDS]


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory):
    """Three seeds of finetune on digits (2 tasks, 1 epoch); seed 1 is killed after its first task's checkpoint,
    then the same command continues, then runs once more."""
    root = tmp_path_factory.mktemp("group")
    command = [*GROUP_RUN, "--seeds", "0-2", "--out", root, "--group", "g"]
    calls = {"interrupted": None, "continued": None, "repeated": None}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NTKCL_DATA_ROOT", str(root / "data"))
        original = rundir.save_checkpoint

        def killed_after_first_checkpoint(run_dir, task_index, *args, **kwargs):
            path = original(run_dir, task_index, *args, **kwargs)
            if run_dir.name == "seed-1" and task_index == 0:
                raise KeyboardInterrupt
            return path

        patch.setattr(rundir, "save_checkpoint", killed_after_first_checkpoint)
        calls["interrupted"] = run_cli(*command)
        patch.setattr(rundir, "save_checkpoint", original)
        first_checkpoint = root / "g" / "seed-1" / rundir.CHECKPOINT_DIR / "task-00" / rundir.STATE_FILE
        calls["first_checkpoint_mtime"] = first_checkpoint.stat().st_mtime_ns
        calls["continued"] = run_cli(*command)
        calls["repeated"] = run_cli(*command)
        calls["resumed"] = run_cli("train", "--resume", root / "g", "-q", "--json")
        calls["eval"] = run_cli("eval", root / "g", "-q", "--json")
    return root / "g", calls


def test_parse_seeds_and_sample_sd():
    assert parse_seeds("0-2,7, 1") == [0, 1, 2, 7]
    for bad in ("", "a", "3-1", "1,,2"):
        with pytest.raises(BadInputError):
            parse_seeds(bad)
    assert mean_sd([1.0, 2.0, 4.0]) == {"mean": pytest.approx(7 / 3), "sd": pytest.approx(math.sqrt(7 / 3)), "n": 3}
    assert mean_sd([5.0, None]) == {"mean": 5.0, "sd": None, "n": 1}


def test_group_folder_members_and_seeds(group_runs):
    group, calls = group_runs
    assert calls["interrupted"].code == 130 and "run the same command again" in calls["interrupted"].err
    assert calls["continued"].code == 0, calls["continued"].err
    assert json.loads((group / GROUP_FILE).read_text())["seeds"] == SEEDS
    assert sorted(path.name for path in group.iterdir() if path.is_dir()) == ["seed-0", "seed-1", "seed-2"]
    orders = []
    for seed in SEEDS:
        record = json.loads((group / f"seed-{seed}" / rundir.RUN_FILE).read_text())
        assert record["seeds"] == {"training": seed, "class_order": seed}
        orders.append(record["class_order"])
    assert len({tuple(order) for order in orders}) == 3  # one class order per seed


def test_killed_member_resumes_after_its_last_task(group_runs):
    group, calls = group_runs
    runs = {run["seed"]: run for run in calls["continued"].json()["runs"]}
    assert runs[0] == {"seed": 0, "run_dir": str(group / "seed-0"), "before": "finished", "trained": False}
    assert runs[1]["before"] == "partial" and runs[1]["trained"]
    assert runs[2]["before"] == "new" and runs[2]["trained"]
    # Task 0 of the killed member was kept, not trained again.
    first_checkpoint = group / "seed-1" / rundir.CHECKPOINT_DIR / "task-00" / rundir.STATE_FILE
    assert first_checkpoint.stat().st_mtime_ns == calls["first_checkpoint_mtime"]
    task_ends = [line for line in (group / "seed-1" / rundir.LOG_FILE).read_text().splitlines() if '"task_end"' in line]
    # The kill came after task 0's checkpoint and before its log line: only task 1 ran in the second call.
    assert [json.loads(line)["task"] for line in task_ends] == [1]
    assert all(metrics["finished"] and metrics["num_tasks"] == 2 for metrics in _member_metrics(group))


def test_second_call_runs_nothing(group_runs):
    _, calls = group_runs
    repeated = calls["repeated"]
    assert repeated.code == 0, repeated.err
    assert [run["trained"] for run in repeated.json()["runs"]] == [False, False, False]
    resumed = calls["resumed"]  # `--resume GROUP` continues every member: here, none is left
    assert resumed.code == 0, resumed.err
    assert [run["before"] for run in resumed.json()["runs"]] == ["finished"] * 3


def test_group_mean_and_sd_by_hand(group_runs):
    group, calls = group_runs
    members = _member_metrics(group)
    for result in (calls["continued"].json(), calls["repeated"].json()):
        summary = result["summary"]
        for key in ("final_accuracy", "mean_incremental_accuracy", "forgetting", "backward_transfer"):
            values = [metrics[key] for metrics in members]
            assert summary[key]["n"] == 3
            assert summary[key]["mean"] == pytest.approx(sum(values) / 3)
            assert summary[key]["sd"] == pytest.approx(statistics.stdev(values))
        assert summary["transfer"] == {"mean": None, "sd": None, "n": 0}  # class-incremental stream
    evaluated = calls["eval"]
    assert evaluated.code == 0, evaluated.err
    document = evaluated.json()
    assert set(document["training_metrics"].values()) == {"identical"}
    values = [metrics["final_accuracy"] for metrics in members]
    assert document["summary"]["final_accuracy"]["mean"] == pytest.approx(statistics.mean(values))
    assert document["summary"]["final_accuracy"]["sd"] == pytest.approx(statistics.stdev(values))


def test_report_of_a_group_has_error_bars_and_researcher_columns(group_runs, tmp_path):
    group, _ = group_runs
    result = run_cli("report", group, group / "seed-0", "--out", tmp_path / "report", "--json")
    assert result.code == 0, result.err
    rows = {row["run"]: row for row in result.json()["runs"]}
    values = [metrics["final_accuracy"] for metrics in _member_metrics(group)]
    assert rows["g"]["final_accuracy"]["mean"] == pytest.approx(statistics.mean(values))
    assert rows["g"]["final_accuracy"]["sd"] == pytest.approx(statistics.stdev(values))
    assert rows["g"]["label"] == "finetune / digits (g), 3 seeds"
    assert rows["seed-0"]["label"] == "finetune / digits (seed-0)"
    tasks = [rundir.read_json(group / "seed-0" / "checkpoints" / f"task-0{t}" / "task.json") for t in range(2)]
    assert rows["seed-0"]["wall_time_s"] == pytest.approx(sum(task["seconds"] for task in tasks))
    assert rows["seed-0"]["trainable_parameters"] == tasks[-1]["trainable_parameters"] > 0
    assert rows["seed-0"]["epochs_per_task"] == "1"
    page = (tmp_path / "report" / "index.html").read_text()
    assert "trainable parameters" in page and "wall time (s)" in page
    assert f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" in page


def test_group_of_another_configuration_is_refused(group_runs, cli):
    group, _ = group_runs
    result = cli(*GROUP_RUN, "--lr", "0.5", "--seeds", "0", "--out", group.parent, "--group", "g")
    assert result.code == 2
    assert "another configuration (differs in optim.lr)" in result.err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "0", "--seed", "3"], "drop --seed"),
        (["--group", "g"], "give --seeds too"),
        (["--seeds", "x"], "--seeds expects"),
        (["--seeds", "0", "--group", "a/b"], "plain folder name"),
    ],
)
def test_bad_group_flags_exit_2(cli, tmp_path, extra, message):
    result = cli(*GROUP_RUN, *extra, "--out", tmp_path)
    assert result.code == 2 and message in result.err
    assert not any(tmp_path.iterdir())
