"""Data-parallel runs on CPU (gloo) against one process: equal results, failure of a rank, resume, bad input.

Two tasks of `digits` (5 + 5 classes: 716 and 721 training images, so the second task does not divide
evenly over 2 processes), one epoch, the tiny ViT. The finetune runs switch off the only per-rank randomness
(adapter dropout, random augmentation), so one and two processes compute the same global batches; what may
differ is the order of floating-point sums (DDP's all-reduce of two half-batch gradients against one
full-batch gradient): learned weights agree to 1e-5 and the accuracy matrix may differ by at most one test
image per cell, where a logit tie within rounding flips (none has so far: the matrices are identical).
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from ntkcl.engine import rundir
from ntkcl.engine.training import ShardedBatches
from tests.conftest import tiny_digits_run

RUN = tiny_digits_run(init_classes=5, increment=5)
NO_RANDOMNESS = ["--set", "method.params.adapter_dropout=0", "--set", "stream.augment=resize"]
# A bound far above the seconds a failing 2-process run takes (minutes on a loaded two-core machine, where
# starting the ranks alone can take one), far below a hang (collectives wait 30 min).
FAILURE_DEADLINE_S = 300


def only_run(out):
    runs = [path for path in out.iterdir() if path.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def learned_states(run):
    return [load_file(next(path.glob("*.safetensors"))) for path in rundir.finished_checkpoints(run)]


def epoch_logs(run):
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [record for record in records if record["event"] == "epoch_end"]


def assert_matrices_match(one, many):
    assert many["total"] == one["total"]
    for row_one, row_many in zip(one["correct"], many["correct"]):
        assert len(row_one) == len(row_many)
        assert all(abs(a - b) <= 1 for a, b in zip(row_one, row_many)), (one["correct"], many["correct"])


def test_simplecil_two_processes_equal_one_process(cli, data_root, tmp_path):
    """No training: prototypes (uneven shards in task 1) and evaluation counts are reduced exactly."""
    single = cli(*RUN, "--method", "simplecil", "--out", tmp_path / "one")
    assert single.code == 0, single.err
    double = cli(*RUN, "--method", "simplecil", "--nproc", "2", "--out", tmp_path / "two")
    assert double.code == 0, double.err
    assert double.json()["metrics"]["correct"] == single.json()["metrics"]["correct"]
    assert double.json()["metrics"]["total"] == single.json()["metrics"]["total"]
    run_one, run_two = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    for state_one, state_two in zip(learned_states(run_one), learned_states(run_two), strict=True):
        prototypes_one, prototypes_two = state_one["classifier.prototypes"], state_two["classifier.prototypes"]
        torch.testing.assert_close(prototypes_two, prototypes_one, rtol=0, atol=1e-6)
    record = json.loads((run_two / "run.json").read_text())
    assert record["world_size"] == 2
    assert json.loads((run_two / "config.json").read_text())["runtime"]["nproc"] == 2


def test_finetune_two_processes_match_one_process(cli, data_root, tmp_path):
    single = cli(*RUN, "--method", "finetune", *NO_RANDOMNESS, "--out", tmp_path / "one")
    assert single.code == 0, single.err
    double = cli(*RUN, "--method", "finetune", *NO_RANDOMNESS, "--nproc", "2", "--out", tmp_path / "two")
    assert double.code == 0, double.err
    assert_matrices_match(single.json()["metrics"], double.json()["metrics"])
    run_one, run_two = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    for state_one, state_two in zip(learned_states(run_one), learned_states(run_two), strict=True):
        for key, value in state_one.items():
            torch.testing.assert_close(state_two[key], value, rtol=0, atol=1e-5, msg=key)
    for log_one, log_two in zip(epoch_logs(run_one), epoch_logs(run_two), strict=True):
        assert log_two["loss"] == pytest.approx(log_one["loss"], rel=1e-5)
        assert log_two["train_acc"] == pytest.approx(log_one["train_acc"], abs=1e-4)  # percent


@pytest.mark.parametrize(("size", "world_size"), [(721, 2), (716, 2), (33, 4), (3, 4), (65, 3)])
def test_sharded_batches_cover_each_image_once(size, world_size):
    """Per step, the real images over all ranks are the single-process batch; loss weights average to 1."""
    batch = 4 * world_size
    steps = -(-size // batch)
    for step in range(steps):
        shards = [ShardedBatches(size, batch, world_size, rank) for rank in range(world_size)]
        real = [shard.real_on_rank(step) for shard in shards]
        assert sum(real) == shards[0].real_in_step(step) == min(batch, size - step * batch)
        assert sum(shard.loss_weight(step) for shard in shards) == pytest.approx(world_size)
        # a batch-summed term: the weighted rank sums average (as DDP does) to the sum over the step
        per_image = torch.arange(size, dtype=torch.float64)[step * batch :][: sum(real)]
        rank_sums = per_image.split(real)
        averaged = (
            sum(s.sum() * shard.batch_sum_weight(step) for s, shard in zip(rank_sums, shards, strict=True)) / world_size
        )
        assert averaged.item() == pytest.approx(per_image.sum().item())


FLAKY_SOURCE = textwrap.dedent(
    """
    import os
    import signal
    from ntkcl.methods.finetune import Finetune

    class FlakyFinetune(Finetune):
        name = "flaky-finetune"

        def begin_task(self, task):
            failure = os.environ.get("FLAKY_FAIL")
            if task.index == 1 and os.environ.get("RANK") == "1" and failure == "raise":
                raise RuntimeError("injected failure on the second task")
            if task.index == 1 and os.environ.get("RANK") == "1" and failure == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            super().begin_task(task)
    """
)


@pytest.fixture
def flaky_method(tmp_path, monkeypatch):
    """A third-party method that fails on rank 1 in task 1 as FLAKY_FAIL says (raise / kill; seen by spawned ranks)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "ntkcl_flaky.py").write_text(FLAKY_SOURCE)
    info = site / "ntkcl_flaky-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ntkcl_flaky\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ntkcl.methods]\nflaky-finetune = ntkcl_flaky:FlakyFinetune\n")
    monkeypatch.syspath_prepend(str(site))
    return "flaky-finetune"


def test_failing_rank_stops_all_ranks_and_resume_finishes(cli, data_root, tmp_path, flaky_method, monkeypatch):
    monkeypatch.setenv("FLAKY_FAIL", "raise")
    started = time.monotonic()
    crashed = cli(*RUN, "--method", flaky_method, *NO_RANDOMNESS, "--nproc", "2", "--out", tmp_path / "crash")
    assert time.monotonic() - started < FAILURE_DEADLINE_S
    assert crashed.code == 1, crashed.err
    error = crashed.json()["error"]
    assert error == "rank 1 failed: RuntimeError: injected failure on the second task"
    assert crashed.err.strip() == f"error: {error}"
    run = only_run(tmp_path / "crash")
    assert [path.name for path in rundir.finished_checkpoints(run)] == ["task-00"]
    assert json.loads((run / "metrics.json").read_text())["finished"] is False

    monkeypatch.delenv("FLAKY_FAIL")
    resumed = cli("train", "--resume", run, "-q", "--json")  # the saved config asks for 2 processes again
    assert resumed.code == 0, resumed.err
    reference = cli(*RUN, "--method", flaky_method, *NO_RANDOMNESS, "--out", tmp_path / "one")
    assert reference.code == 0, reference.err
    assert_matrices_match(reference.json()["metrics"], resumed.json()["metrics"])
    assert [path.name for path in rundir.finished_checkpoints(run)] == ["task-00", "task-01"]


def test_rank_killed_by_a_signal_is_named(cli, data_root, tmp_path, flaky_method, monkeypatch):
    """A rank that dies without a word (OOM killer, SIGKILL) is the error, not its peers' broken connection."""
    monkeypatch.setenv("FLAKY_FAIL", "kill")
    started = time.monotonic()
    crashed = cli(*RUN, "--method", flaky_method, *NO_RANDOMNESS, "--nproc", "2", "--out", tmp_path / "crash")
    assert time.monotonic() - started < FAILURE_DEADLINE_S
    assert crashed.code == 1
    assert crashed.err.strip() == "error: rank 1 was killed by SIGKILL; the other ranks were stopped"
    assert [path.name for path in rundir.finished_checkpoints(only_run(tmp_path / "crash"))] == ["task-00"]


def test_torchrun_ranks_join_one_group(data_root, tmp_path):
    """Under torchrun, `ntkcl train` joins the group; rank 0 alone prints and writes."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "ntkcl",
        *RUN,
        "--method",
        "simplecil",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "torchrun"),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    run = only_run(tmp_path / "torchrun")
    assert result["run_dir"] == str(run)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert result["metrics"]["finished"] is True


def test_method_without_distributed_support_exits_2(cli, data_root, tmp_path, monkeypatch):
    from ntkcl.methods.simplecil import SimpleCIL

    monkeypatch.setattr(SimpleCIL, "supports_distributed", False)
    result = cli(*RUN, "--method", "simplecil", "--nproc", "2", "--out", tmp_path / "runs")
    assert result.code == 2
    assert result.err.strip() == (
        "error: method simplecil does not support distributed training; run it with one process"
    )
    assert not (tmp_path / "runs").exists()


def fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    ("gpus_on_host", "flags", "message"),
    [
        (1, ["--gpus", "7"], "--gpus 7: this host has no GPU 7 (visible: 0)"),
        (2, ["--gpus", "0,2"], "--gpus 2: this host has no GPU 2 (visible: 0..1)"),
        (0, ["--gpus", "0"], "--gpus needs CUDA, but no GPU is visible on this host (use --nproc N for CPU processes)"),
        (0, ["--gpus", "all"], "--gpus all: no GPU is visible on this host (use --nproc N for CPU processes)"),
        (2, ["--gpus", "0,0"], "--gpus lists GPU 0 more than once"),
        (2, ["--gpus", "0,x"], "--gpus expects comma-separated GPU indices (0,1) or 'all', got '0,x'"),
        (2, ["--gpus", "-1"], "--gpus expects comma-separated GPU indices (0,1) or 'all', got '-1'"),
        (2, ["--gpus", ""], "--gpus expects comma-separated GPU indices (0,1) or 'all', got ''"),
        (2, ["--gpus", "0,1", "--device", "cpu"], "--gpus picks the device of each process; drop --device cpu"),
        (2, ["--gpus", "0,1", "--nproc", "3"], "--nproc 3 conflicts with --gpus (one process per listed GPU)"),
        (0, ["--nproc", "0"], "--nproc must be at least 1, got 0"),
        (0, ["--nproc", "-2"], "--nproc must be at least 1, got -2"),
        (
            0,
            ["--nproc", "2", "--batch-size", "33"],
            "the global batch size 33 is not divisible by the 2 processes; give --batch-size a multiple of 2",
        ),
        (
            1,
            ["--nproc", "2"],
            "--nproc 2 needs one GPU per process; this host has 1 (use --device cpu for CPU processes)",
        ),
    ],
)
def test_bad_process_flags_exit_2_with_one_line(cli, data_root, tmp_path, monkeypatch, gpus_on_host, flags, message):
    fake_gpus(monkeypatch, gpus_on_host)
    result = cli(*RUN, "--method", "simplecil", *flags, "--out", tmp_path / "runs")
    assert result.code == 2, result.err
    assert result.err.strip() == f"error: {message}"
    assert not (tmp_path / "runs").exists()


def test_nproc_is_refused_under_torchrun(cli, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    result = cli(*RUN, "--method", "simplecil", "--nproc", "2", "--out", tmp_path / "runs")
    assert result.code == 2
    assert "under torchrun the number of processes comes from torchrun" in result.err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_runs_on_listed_gpu_and_under_torchrun(cli, data_root, tmp_path):
    """`--gpus 0` trains on cuda:0 with the same accuracy as torchrun's single rank; 2+ GPUs also run DDP."""
    single = cli(
        *RUN, "--method", "finetune", *NO_RANDOMNESS, "--gpus", "0", "--precision", "fp32", "--out", tmp_path / "gpu"
    )
    assert single.code == 0, single.err
    run = only_run(tmp_path / "gpu")
    record = json.loads((run / "run.json").read_text())
    assert record["device_type"] == "cuda" and record["world_size"] == 1
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "ntkcl",
        *RUN,
        "--method",
        "finetune",
        *NO_RANDOMNESS,
        "--gpus",
        "0",
        "--precision",
        "fp32",
        "--out",
        str(tmp_path / "torchrun"),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert_matrices_match(single.json()["metrics"], json.loads(finished.stdout)["metrics"])
    if torch.cuda.device_count() >= 2:
        double = cli(
            *RUN,
            "--method",
            "finetune",
            *NO_RANDOMNESS,
            "--gpus",
            "0,1",
            "--precision",
            "fp32",
            "--out",
            tmp_path / "ddp",
        )
        assert double.code == 0, double.err
        assert_matrices_match(single.json()["metrics"], double.json()["metrics"])
