"""CL-LoRA through the engine: presets, forgetting against finetune, exact resume, eval, two processes."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from ntkcl.engine import rundir
from ntkcl.methods.cl_lora import CLLoRA, CLLoRAParams
from ntkcl.presets import resolve_config
from tests.conftest import metrics_of

# The digits preset's small ViT (depth 4: shared blocks 0-1, specific 2-3) on three tasks (4, 3, 3 digits), so
# two of them take the distillation step; one epoch; the global batch divides over 2 ranks.
RUN = ["train", "--stream", "digits", "--init-classes", "4", "--increment", "3", "--epochs", "1"]
RUN += ["--batch-size", "32", "--num-workers", "0", "-q", "--json", "--method", "cl-lora"]

# stream: (backbone, tasks as (init, increment), epochs, lr, batch, weight decay, rank)
REFERENCE = {
    "cifar100": ("vit_base_patch16_224.augreg_in21k", (5, 5), 30, 0.03, 64, 1e-4, 8),
    "imagenet-r": ("vit_base_patch16_224.augreg_in21k_ft_in1k", (5, 5), 20, 0.05, 32, 5e-4, 10),
    "imagenet-a": ("vit_base_patch16_224.augreg_in21k", (20, 20), 25, 0.05, 32, 5e-3, 10),
    "vtab": ("vit_base_patch16_224.augreg_in21k", (10, 10), 45, 0.03, 32, 1e-4, 10),
}


@pytest.mark.parametrize("stream", sorted(REFERENCE))
def test_each_stream_gets_the_reference_experiment_file(stream):
    config = resolve_config(overrides={"stream": {"dataset": stream}, "method": {"name": "cl-lora"}})
    backbone, (init, increment), epochs, lr, batch, weight_decay, rank = REFERENCE[stream]
    optim = config.optim
    assert (optim.optimizer, optim.momentum, optim.scheduler, optim.min_lr) == ("sgd", 0.9, "cosine", 0.0)
    assert (optim.epochs, optim.lr, optim.batch_size, optim.weight_decay) == (epochs, lr, batch, weight_decay)
    assert (config.backbone.name, config.backbone.normalize, config.stream.augment) == (backbone, "none", "paper")
    assert (config.stream.init_classes, config.stream.increment, config.runtime.seed) == (init, increment, 1993)
    params = CLLoRAParams(**config.method.params)
    assert params.rank == rank
    assert (params.kd_weight, params.kd_temperature, params.orth_weight) == (5.0, 2.0, 1e-4)
    assert (params.shared_blocks, params.specific_blocks, params.ce_gradient) == (None, None, "before_kd_step")
    if stream == "vtab":  # shuffle=false: the fixed order, one source dataset per task
        assert config.stream.class_order == list(range(50))
    else:
        assert (config.stream.class_order, config.stream.class_order_seed) == (None, 1993)


def test_class_order_seed_flag_shuffles_the_fixed_vtab_order():
    from ntkcl.cli.train import _flag_overrides

    flags = _flag_overrides(stream="vtab", method="cl-lora", class_order_seed=3)
    config = resolve_config(overrides=flags)
    assert config.stream.class_order is None and config.stream.class_order_seed == 3


def test_digits_preset_backbone_and_split():
    config = resolve_config(overrides={"method": {"name": "cl-lora"}})
    assert config.backbone.name == "ntkcl-tiny-fdsl" and config.stream.dataset == "digits"
    assert CLLoRAParams(**config.method.params).rank == 8 and config.optim.lr == 0.005


def only_run(out):
    (run,) = [path for path in out.iterdir() if path.is_dir()]
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run, shared by the tests below: (run dir, data root)."""
    from ntkcl.cli import main

    data, out = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NTKCL_DATA_ROOT", str(data))
        main([str(argument) for argument in [*RUN, "--out", out]])
    return only_run(out), data


def test_cl_lora_forgets_less_than_finetune_on_digits(cli, reference, tmp_path, monkeypatch):
    run, data = reference
    monkeypatch.setenv("NTKCL_DATA_ROOT", str(data))
    finetune = cli(*RUN, "--method", "finetune", "--out", tmp_path)
    assert finetune.code == 0, finetune.err
    assert metrics_of(run)["forgetting"] < finetune.json()["metrics"]["forgetting"]
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    second_task = [record for record in epochs if record["event"] == "epoch_end" and record["task"] == 1]
    assert second_task and all({"kd", "ce", "orth"} <= set(record) for record in second_task)


def test_ctrl_c_inside_a_task_resumes_to_the_metrics_of_an_uninterrupted_run(cli, reference, tmp_path, monkeypatch):
    """Stopped in the middle of the second task (both optimizer steps of a batch, teacher and momentum in
    flight): the snapshot, then `--resume`, end with the uninterrupted run's matrix; `ntkcl eval` agrees."""
    run, data = reference
    monkeypatch.setenv("NTKCL_DATA_ROOT", str(data))
    original = CLLoRA.training_step
    calls = []

    def interrupt_in_the_second_task(self, images, labels, stage="ce"):
        calls.append((self._task.index, stage))
        if (self._task.index, stage) == (1, "kd") and calls.count((1, "kd")) == 3:
            signal.raise_signal(signal.SIGINT)
        return original(self, images, labels, stage)

    monkeypatch.setattr(CLLoRA, "training_step", interrupt_in_the_second_task)
    interrupted = cli(*RUN, "--out", tmp_path)
    assert interrupted.code == 130, interrupted.err
    monkeypatch.setattr(CLLoRA, "training_step", original)
    (snapshot,) = (only_run(tmp_path) / "snapshots").iterdir()
    assert snapshot.name == "task-01-epoch-000-step-000003"
    resumed = cli("train", "--resume", only_run(tmp_path), "-q", "--json")
    assert resumed.code == 0, resumed.err
    assert resumed.json()["metrics"]["correct"] == metrics_of(run)["correct"]
    evaluated = cli("eval", only_run(tmp_path), "-q", "--json")
    assert evaluated.code == 0, evaluated.err
    assert evaluated.json()["matches_training"] is True


def test_two_processes_match_one_process(cli, reference, tmp_path, monkeypatch):
    """Both optimizer steps of every batch go through DDP: same learned state and accuracy as one process."""
    run, data = reference
    monkeypatch.setenv("NTKCL_DATA_ROOT", str(data))
    double = cli(*RUN, "--nproc", "2", "--out", tmp_path)
    assert double.code == 0, double.err
    one, two = metrics_of(run), double.json()["metrics"]
    assert one["total"] == two["total"]
    for row_one, row_two in zip(one["correct"], two["correct"], strict=True):
        assert all(abs(a - b) <= 1 for a, b in zip(row_one, row_two, strict=True)), (one["correct"], two["correct"])
    checkpoints = zip(rundir.finished_checkpoints(run), rundir.finished_checkpoints(only_run(tmp_path)), strict=True)
    for path_one, path_two in checkpoints:
        state_one, state_two = (load_file(next(path.glob("*.safetensors"))) for path in (path_one, path_two))
        for key, value in state_one.items():
            torch.testing.assert_close(state_two[key], value, rtol=0, atol=1e-5, msg=key)
