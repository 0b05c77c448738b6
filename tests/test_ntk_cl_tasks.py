"""NTK-CL across a task and across tasks: the per-task orthogonality basis, the L2 pull, exact resume."""

import json
import shutil

import pytest
import torch

from ntkcl.engine import rundir
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.ntk_cl import NTKCL, NTKCLParams, orthogonality_basis
from ntkcl.models.backbone import create_backbone
from tests.conftest import TINY_BACKBONE, crashing_at_task, tiny_digits_run


def tiny_method(**params) -> NTKCL:
    backbone = create_backbone(
        TINY_BACKBONE["name"], pretrained=False, model_kwargs=TINY_BACKBONE["model_kwargs"], init_seed=0
    )
    return NTKCL(backbone, NTKCLParams(fusion_heads=4, **params))


def second_task(method: NTKCL) -> TaskInfo:
    method.begin_task(TaskInfo(0, 2, 0, 3))
    with torch.no_grad():
        method.prototypes.prototypes.normal_(generator=torch.Generator().manual_seed(3))
    task = TaskInfo(1, 2, 3, 3)
    method.begin_task(task)
    return task


def test_basis_computed_at_task_start_is_what_every_batch_would_compute():
    # The reference takes the SVD of the prototype matrix on every batch; the matrix does not change within a
    # task (new rows stay zero until end_task), so one SVD per task gives the same basis.
    method = tiny_method()
    second_task(method)
    cached = method._basis.clone()
    optimizer = torch.optim.SGD(method.parameter_groups()[0]["params"], lr=0.5, momentum=0.9)
    method.train()
    for _ in range(3):
        output = method.training_step(torch.rand(4, 3, 32, 32), torch.tensor([3, 4, 5, 3]))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        per_batch = orthogonality_basis(method.prototypes.prototypes, 40, 3, "reference")
        torch.testing.assert_close(per_batch, cached, rtol=0, atol=0)
    assert torch.count_nonzero(method.prototypes.prototypes[3:]) == 0


def test_l2_pull_is_the_sum_of_squared_weight_changes_since_the_task_started():
    method = tiny_method()
    second_task(method)
    assert method._regularisation().item() == 0.0
    with torch.no_grad():
        method.current["channel"][0].up.weight[0, :2] += torch.tensor([1.0, 2.0])
        method.current["patch"][1].norm.weight[0] += 3.0
        method.fusion.key.weight[1, 1] -= 0.5
        method.current["channel"][0].up.bias += 10.0  # biases are not pulled
        method.fusion.value.bias += 10.0
    assert method._regularisation().item() == pytest.approx(1 + 4 + 9 + 0.25)


def test_anchor_is_where_the_previous_task_ended():
    method = tiny_method()
    method.begin_task(TaskInfo(0, 2, 0, 3))
    with torch.no_grad():
        method.current["channel"][1].down.weight.add_(1.0)
    method.begin_task(TaskInfo(1, 2, 3, 3))
    assert method._regularisation().item() == 0.0


def test_per_task_tensors_stay_out_of_the_saved_state():
    method = tiny_method()
    second_task(method)
    keys = set(method.learned_state())
    assert not any(key.startswith(("proxy_head.", "backbone.")) for key in keys)
    assert any(key.startswith("averaged.") for key in keys) and "prototypes.prototypes" in keys
    assert not any("anchor" in key or "basis" in key for key in keys)


RUN = [*tiny_digits_run(init_classes=4, increment=3, batch_size=64), "--method", "ntk-cl"]


def only_run(out):
    (run,) = [path for path in out.iterdir() if path.is_dir()]
    return run


def test_resume_after_a_task_ends_with_the_metrics_of_an_uninterrupted_run(cli, data_root, tmp_path):
    reference = cli(*RUN, "--out", tmp_path / "reference")
    assert reference.code == 0, reference.err
    with crashing_at_task(NTKCL, 2):
        assert cli(*RUN, "--out", tmp_path / "crash").code == 1
    resumed = cli("train", "--resume", only_run(tmp_path / "crash"), "-q", "--json")
    assert resumed.code == 0, resumed.err
    assert resumed.json()["metrics"]["correct"] == reference.json()["metrics"]["correct"]

    # A saved run whose feature width no longer fits the configuration is bad input, not a crash.
    tampered = tmp_path / "tampered"
    shutil.copytree(only_run(tmp_path / "reference"), tampered)
    config = json.loads((tampered / rundir.CONFIG_FILE).read_text())
    config["method"]["params"]["use_init_ptm"] = True
    (tampered / rundir.CONFIG_FILE).write_text(json.dumps(config))
    result = cli("eval", tampered, "-q")
    assert result.code == 2
    assert "shape" in result.err and len(result.err.strip().splitlines()) == 1
