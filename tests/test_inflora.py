"""InfLoRA's pieces on a tiny random ViT against direct computation: DualGPM's sizes and switch, A orthogonal to
the protected basis, updates in span(A), what the gradients reach, and the merge."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ntkcl.methods.base import TaskInfo
from ntkcl.methods.inflora import InfLoRA, InfLoRAParams
from ntkcl.models.backbone import create_backbone
from ntkcl.models.subspace import dual_gpm_update, gram
from tests.conftest import TINY_BACKBONE, FakeData

pytestmark = pytest.mark.usefixtures("one_thread")


def task_data(task: TaskInfo, count: int = 8, seed: int = 0) -> FakeData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, 32, 32, generator=generator)
    return FakeData(images, task.known_classes + torch.arange(count) % task.num_new_classes)


def orthogonal(size: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def projector(basis: torch.Tensor) -> torch.Tensor:
    return basis.double() @ basis.double().T


@pytest.fixture(scope="module")
def backbone():
    settings = {key: value for key, value in TINY_BACKBONE.items() if key != "name"}
    return create_backbone(TINY_BACKBONE["name"], **settings)


def build(backbone, **options) -> InfLoRA:
    torch.manual_seed(0)
    return InfLoRA(backbone, InfLoRAParams(rank=4, **options))


# ------------------------------------------------------------------------------------------------- DualGPM
def representation(energies: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X = Q diag(sqrt e): left singular vectors Q (columns), energies e."""
    left = orthogonal(len(energies), seed)
    return left @ torch.diag(torch.tensor(energies, dtype=torch.float64).sqrt()), left


def test_first_task_keeps_the_directions_below_the_threshold():
    matrix, left = representation([0.5, 0.3, 0.15, 0.05, 0, 0, 0, 0], seed=0)  # cumulative 0.5, 0.8, 0.95, 1
    for threshold, kept in ((0.2, 1), (0.85, 2), (0.96, 3)):
        basis, free = dual_gpm_update(torch.zeros(8, 0), False, gram(matrix), threshold)
        assert not free and basis.shape == (8, kept)
        torch.testing.assert_close(projector(basis), projector(left[:, :kept]), atol=1e-6, rtol=0)


def test_protected_basis_wider_than_half_the_space_switches_to_its_free_complement():
    matrix, left = representation([0.4, 0.3, 0.2, 0.05, 0.03, 0.02], seed=1)  # cumulative 0.4 .. 0.95, 0.98, 1
    basis, free = dual_gpm_update(torch.zeros(6, 0), False, gram(matrix), 0.97)  # 4 protected > 6 / 2
    assert free and basis.shape == (6, 2)
    torch.testing.assert_close(projector(basis), projector(left[:, 4:]), atol=1e-6, rtol=0)


def test_later_task_grows_a_protected_basis_by_the_residual_energy():
    left = orthogonal(8, 2)
    protected = left[:, :1].float()
    # energy 0.6 along the protected direction, 0.3 and 0.1 along two new ones: explained 0.6, then 0.9, then 1.0
    matrix = left[:, :3] @ torch.diag(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64).sqrt())
    basis, free = dual_gpm_update(protected, False, gram(matrix), 0.85)
    assert not free and basis.shape == (8, 2)
    torch.testing.assert_close(projector(basis), projector(left[:, :2]), atol=1e-6, rtol=0)


def test_free_basis_gives_up_the_directions_a_new_task_fills():
    left = orthogonal(8, 3)
    free_basis = left[:, 5:].float()  # 3 free directions, 5 protected
    # the new task puts 0.3 and 0.02 of its energy into two free directions (left[:, 5], left[:, 6])
    weights = torch.tensor([0.68, 0.3, 0.02], dtype=torch.float64).sqrt()
    matrix = torch.stack([left[:, 0], left[:, 5], left[:, 6]], dim=1) * weights
    # threshold 0.9: the free energy 0.32 >= 0.1, so left[:, 5] leaves; then 0.02 < 0.1, so the loop stops
    basis, free = dual_gpm_update(free_basis, True, gram(matrix), 0.9)
    assert free and basis.shape == (8, 2)
    torch.testing.assert_close(projector(basis), projector(left[:, 6:]), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- design of A
def test_down_projection_is_orthogonal_to_the_protected_basis_and_scaled(backbone):
    method = build(backbone)
    dim = backbone.embed_dim
    covariance = gram(torch.randn(dim, 3 * dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    subspace = method.subspaces[0]
    subspace.value = orthogonal(dim, 5)[:, :10].float()
    down = method.designed_down(covariance, subspace)
    assert down.shape == (4, dim)
    assert (down.double() @ subspace.value.double()).abs().max() < 1e-6
    # the rows are the leading left singular vectors of (I - P Pᵀ) R, over √3
    residual = covariance - projector(subspace.value) @ covariance
    left, _, _ = torch.linalg.svd(residual)
    torch.testing.assert_close(projector(down.T * math.sqrt(3)), projector(left[:, :4]), atol=1e-5, rtol=0)
    # a free basis Q: the rows lie in span(Q)
    subspace.value, _ = torch.linalg.qr(torch.randn(dim, 12, generator=torch.Generator().manual_seed(6)))
    subspace.free.fill_(True)
    down = method.designed_down(covariance, subspace).double()
    torch.testing.assert_close(down @ projector(subspace.value), down, atol=1e-6, rtol=0)


def test_training_moves_only_b_and_the_head_and_the_update_stays_in_span_a(backbone):
    method = build(backbone)
    first, second = TaskInfo(0, 2, 0, 3), TaskInfo(1, 2, 3, 2)
    for task in (first, second):
        method.begin_task(task)
        data = task_data(task)
        method.prepare_task(task, data)
        method.train()
        method.zero_grad(set_to_none=True)
        optimizer = torch.optim.SGD(method.parameter_groups(), lr=0.5)
        method.training_step(data.images, data.labels).loss.backward()
        reached = {id(parameter) for parameter in method.parameters() if parameter.grad is not None}
        trained = [*method.heads[task.index].parameters()]
        trained += [lora.up for delta in method.weight_deltas for lora in delta.loras]
        assert reached == {id(parameter) for parameter in trained}
        optimizer.step()
        for block, delta in enumerate(method.weight_deltas):
            down = delta.loras[0].down.double()
            assert torch.equal(delta.loras[0].down, delta.loras[1].down)
            update = delta.lora_delta(delta.merged).double()
            dim = backbone.embed_dim
            assert update[:dim].abs().max() == 0  # q is never adapted
            assert update[dim:].abs().max() > 0
            row_space = down.T @ torch.linalg.pinv(down.T)
            torch.testing.assert_close(update[dim:] @ row_space, update[dim:], atol=1e-6, rtol=0)
            subspace = method.subspaces[block]
            if subspace.value.shape[1]:
                assert not bool(subspace.free)
                assert (down @ subspace.value.double()).abs().max() < 1e-6
        method.eval()
        images = data.images[:5]
        with torch.no_grad():
            before = method.backbone(images)
        method.end_task(task, data)
        assert all(len(delta.loras) == 0 for delta in method.weight_deltas)
        with torch.no_grad():
            torch.testing.assert_close(method.backbone(images), before, atol=1e-5, rtol=1e-5)
        assert all(subspace.value.shape[1] > 0 for subspace in method.subspaces)
    assert method.predict(data.images).shape == (8, 5)
    # the pre-trained weights never change: everything learned is in the merged deltas
    pristine = create_backbone(TINY_BACKBONE["name"], **{k: v for k, v in TINY_BACKBONE.items() if k != "name"})
    for block, original in zip(method.backbone.blocks, pristine.blocks, strict=True):
        assert torch.equal(block.attn.qkv.parametrizations.weight.original, original.attn.qkv.weight)
    # the threshold moves from λ_start to λ_end over the stream
    assert method.threshold(TaskInfo(1, 4, 3, 2)) == pytest.approx(0.95 + 0.05 / 4)
    assert F.softmax(method.predict(data.images), dim=1).shape[1] == 5
