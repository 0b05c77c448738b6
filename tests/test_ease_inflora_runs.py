"""EASE and InfLoRA through the engine on digits: presets, what each guarantees against forgetting, exact resume
from inside a task, `ntkcl eval`, and two processes against one."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from ntkcl.engine import rundir
from ntkcl.methods.ease import EASE, EASEParams
from ntkcl.methods.inflora import InfLoRA, InfLoRAParams
from ntkcl.presets import resolve_config
from tests.conftest import SHIPPED_BACKBONE_FLAGS, metrics_of, tiny_digits_run

# Two tasks of five digits on the tiny ViT, one epoch; the global batch divides over 2 ranks.
RUN = [*tiny_digits_run(init_classes=5, increment=5, batch_size=32, backbone=SHIPPED_BACKBONE_FLAGS)]
METHODS = {"ease": EASE, "inflora": InfLoRA}


@pytest.mark.parametrize(
    ("stream", "optimizer", "lr", "epochs", "batch"),
    [("cifar100", "sgd", 0.025, 20, 48), ("imagenet-r", "sgd", 0.05, 20, 16), ("vtab", "sgd", 0.03, 45, 16)],
)
def test_ease_presets_follow_the_official_experiment_files(stream, optimizer, lr, epochs, batch):
    config = resolve_config(overrides={"stream": {"dataset": stream}, "method": {"name": "ease"}})
    assert (config.optim.optimizer, config.optim.lr, config.optim.epochs, config.optim.batch_size) == (
        optimizer,
        lr,
        epochs,
        batch,
    )
    params = EASEParams(**config.method.params)
    assert params.bottleneck == (16 if stream == "vtab" else 64)
    assert (params.alpha, params.beta, params.use_init_ptm, params.complement) == (0.1, 0.0, False, "all_later")


@pytest.mark.parametrize(("stream", "epochs", "threshold"), [("cifar100", 20, 0.95), ("imagenet-r", 50, 0.98)])
def test_inflora_presets_follow_the_official_configuration_files(stream, epochs, threshold):
    config = resolve_config(overrides={"stream": {"dataset": stream}, "method": {"name": "inflora"}})
    optim = config.optim
    assert (optim.optimizer, optim.lr, optim.weight_decay, optim.epochs, optim.batch_size) == (
        "adam",
        0.0005,
        0.0,
        epochs,
        128,
    )
    params = InfLoRAParams(**config.method.params)
    assert (params.rank, params.threshold_start, params.threshold_end, params.energies) == (
        10,
        threshold,
        1.0,
        "squared",
    )


def only_run(out):
    (run,) = [path for path in out.iterdir() if path.is_dir()]
    return run


def states(run) -> list[dict[str, torch.Tensor]]:
    return [load_file(next(path.glob("*.safetensors"))) for path in rundir.finished_checkpoints(run)]


# InfLoRA's DualGPM bases as each task found them (checkpoints of finished tasks keep only what predicts).
PROTECTED: dict[int, list[tuple[torch.Tensor, bool]]] = {}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One uninterrupted single-process run per method and one of finetune: {method: run dir}, data root."""
    from ntkcl.cli import main

    data = tmp_path_factory.mktemp("data")
    runs = {}
    original = InfLoRA.prepare_task

    def recording_bases(self, task, task_data):
        PROTECTED[task.index] = [(subspace.value.clone(), bool(subspace.free)) for subspace in self.subspaces]
        return original(self, task, task_data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NTKCL_DATA_ROOT", str(data))
        patch.setattr(InfLoRA, "prepare_task", recording_bases)
        for method in (*METHODS, "finetune"):
            out = tmp_path_factory.mktemp(method)
            main([str(argument) for argument in [*RUN, "--method", method, "--out", out]])
            runs[method] = only_run(out)
    return runs, data


def test_ease_keeps_old_subspaces_and_forgets_less_than_finetune(references):
    runs, _ = references
    first, last = states(runs["ease"])
    # the first task's adapters and its classes' prototypes in its own subspace never change
    for key, value in first.items():
        if key.startswith("adapters.0."):
            assert torch.equal(last[key], value), key
    assert torch.equal(last["prototypes"][:5, 0], first["prototypes"][:5, 0])
    assert last["prototypes"].shape[:2] == (10, 2) and last["prototypes"][:5, 1].abs().sum() > 0  # complemented
    assert metrics_of(runs["ease"])["forgetting"] < metrics_of(runs["finetune"])["forgetting"]


def test_inflora_updates_avoid_the_protected_inputs(references):
    """InfLoRA's guarantee: the second task's weight change is orthogonal to the input directions protected after
    the first, and the first task's head is untouched. (Its forgetting against finetune is compared in
    tests/test_prompt_method_runs.py.)"""
    runs, _ = references
    first, last = states(runs["inflora"])
    blocks = 0
    for index, (basis, free) in enumerate(PROTECTED[1]):
        key = f"weight_deltas.{index}.merged"
        blocks += 1
        change = (last[key] - first[key]).double()
        basis = basis.double()
        dim = change.shape[1]
        assert basis.shape[1] > 0
        assert change[:dim].abs().max() == 0 and change[dim:].abs().max() > 0  # k and v only
        leak = change - change @ basis @ basis.T if free else change @ basis
        assert leak.norm() <= 1e-5 * change.norm(), key
    assert blocks == 4  # every block of the shipped backbone
    for key in ("heads.0.weight", "heads.0.bias"):
        assert torch.equal(last[key], first[key])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ctrl_c_inside_the_second_task_resumes_to_the_uninterrupted_metrics(
    cli, references, tmp_path, monkeypatch, method
):
    runs, data = references
    monkeypatch.setenv("NTKCL_DATA_ROOT", str(data))
    cls = METHODS[method]
    original = cls.training_step
    calls = []

    def interrupt_in_the_second_task(self, images, labels):
        calls.append(self._task.index)
        if calls.count(1) == 3:
            signal.raise_signal(signal.SIGINT)
        return original(self, images, labels)

    monkeypatch.setattr(cls, "training_step", interrupt_in_the_second_task)
    interrupted = cli(*RUN, "--method", method, "--out", tmp_path)
    assert interrupted.code == 130, interrupted.err
    monkeypatch.setattr(cls, "training_step", original)
    (snapshot,) = (only_run(tmp_path) / "snapshots").iterdir()
    assert snapshot.name == "task-01-epoch-000-step-000003"
    resumed = cli("train", "--resume", only_run(tmp_path), "-q", "--json")
    assert resumed.code == 0, resumed.err
    assert resumed.json()["metrics"]["correct"] == metrics_of(runs[method])["correct"]
    evaluated = cli("eval", only_run(tmp_path), "-q", "--json")
    assert evaluated.code == 0, evaluated.err
    assert evaluated.json()["matches_training"] is True


def projector(basis: torch.Tensor) -> torch.Tensor:
    return basis.double() @ basis.double().T


def test_inflora_two_processes_match_one_process(cli, references, tmp_path, monkeypatch):
    """Covariances reduced over ranks, the designed A, DualGPM and the merged deltas: the same as one process."""
    runs, data = references
    monkeypatch.setenv("NTKCL_DATA_ROOT", str(data))
    double = cli(*RUN, "--method", "inflora", "--nproc", "2", "--out", tmp_path)
    assert double.code == 0, double.err
    one, two = metrics_of(runs["inflora"]), double.json()["metrics"]
    assert one["total"] == two["total"]
    for row_one, row_two in zip(one["correct"], two["correct"], strict=True):
        assert all(abs(a - b) <= 1 for a, b in zip(row_one, row_two, strict=True)), (one["correct"], two["correct"])
    for state_one, state_two in zip(states(runs["inflora"]), states(only_run(tmp_path)), strict=True):
        assert set(state_one) == set(state_two)
        for key, value in state_one.items():
            if key.endswith(".value"):  # a basis is defined up to rotation: compare the spans
                torch.testing.assert_close(projector(state_two[key]), projector(value), rtol=0, atol=1e-4, msg=key)
            else:
                torch.testing.assert_close(state_two[key], value, rtol=0, atol=1e-4, msg=key)
