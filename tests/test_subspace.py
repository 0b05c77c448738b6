"""The energy-threshold subspace routine against hand-computed sizes and directions."""

from __future__ import annotations

import pytest
import torch

from ntkcl.models.subspace import energy_rank, gpm_update, gram, project_off, weight_basis

pytestmark = pytest.mark.usefixtures("one_thread")


def _orthogonal(size: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _projector(basis: torch.Tensor) -> torch.Tensor:
    return basis.double() @ basis.double().T


def _matrix_with_energies(energies: list[float], columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X = Q diag(sqrt e) Rᵀ with Q (d x d) and R (n x d) orthonormal: left singular vectors Q, energies e."""
    size = len(energies)
    left = _orthogonal(size, seed)
    right, _ = torch.linalg.qr(torch.randn(columns, size, generator=torch.Generator().manual_seed(seed + 1)).double())
    return left @ torch.diag(torch.tensor(energies).double().sqrt()) @ right.T, left


@pytest.mark.parametrize(
    ("threshold", "expected"), [(0.2, 1), (0.5, 1), (0.51, 1), (0.81, 2), (0.85, 2), (0.96, 3), (1.0, 3)]
)
def test_energy_rank_counts_directions_below_the_threshold(threshold, expected):
    # cumulative energy fractions 0.5, 0.8, 0.95, 1.0
    assert energy_rank(torch.tensor([0.5, 0.3, 0.15, 0.05]), threshold) == expected


def test_weight_basis_sizes_and_orientation_on_a_constructed_weight():
    out_features, in_features = 4, 4
    left, right = _orthogonal(out_features, 0), _orthogonal(in_features, 1)
    singular = torch.tensor([0.5, 0.3, 0.15, 0.05]).double().sqrt()
    weight = (left @ torch.diag(singular) @ right.T).float()  # PyTorch (out x in) layout
    for threshold, rank in ((0.85, 2), (0.2, 1), (0.96, 3)):
        inputs = weight_basis(weight, threshold, "input")
        outputs = weight_basis(weight, threshold, "output")
        assert inputs.shape == outputs.shape == (in_features, rank)
        torch.testing.assert_close(_projector(inputs), _projector(right[:, :rank]), atol=1e-5, rtol=0)
        torch.testing.assert_close(_projector(outputs), _projector(left[:, :rank]), atol=1e-5, rtol=0)
        torch.testing.assert_close(inputs.T @ inputs, torch.eye(rank), atol=1e-5, rtol=0)


def test_projection_residual_is_orthogonal_to_the_basis():
    basis = _orthogonal(8, 2)[:, :3].float()
    matrix = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    residual = project_off(matrix, basis)
    assert (basis.T @ residual).abs().max() < 1e-5
    torch.testing.assert_close(residual + basis @ (basis.T @ matrix), matrix)
    assert project_off(matrix, None) is matrix
    # projecting twice changes nothing more
    torch.testing.assert_close(project_off(residual, basis), residual, atol=1e-6, rtol=0)


def test_gpm_update_follows_the_reference_rule_on_a_constructed_matrix():
    # Energies 10, 5, 3, 2 along the columns of Q; the basis already holds Q[:, 0] (acc starts at 10/20 = 0.5).
    features, left = _matrix_with_energies([10.0, 5.0, 3.0, 2.0], columns=7, seed=4)
    basis = left[:, :1].float()
    # 0.5 -> +5/20 = 0.75 -> +3/20 = 0.9: below 0.8 twice, so two directions are added.
    grown = gpm_update(basis, gram(features), threshold=0.8)
    assert grown.shape == (4, 3)
    torch.testing.assert_close(grown[:, :1], basis)
    torch.testing.assert_close(_projector(grown), _projector(left[:, :3]), atol=1e-6, rtol=0)
    # 0.5 -> 0.75 stops at 0.7: one direction.
    assert gpm_update(basis, gram(features), threshold=0.7).shape == (4, 2)
    # nothing to add when the basis already explains enough
    assert gpm_update(basis, gram(features), threshold=0.45).shape == (4, 1)
    # the reference computes the residual's SVD directly; the Gram form selects the same directions
    residual = features - _projector(basis) @ features
    reference_left, singular, _ = torch.linalg.svd(residual, full_matrices=False)
    total, explained = (features**2).sum(), ((features**2).sum() - (residual**2).sum())
    accumulated, count = explained / total, 0
    while accumulated < 0.8:
        accumulated += singular[count] ** 2 / total
        count += 1
    assert count == 2
    torch.testing.assert_close(_projector(grown[:, 1:]), _projector(reference_left[:, :count]), atol=1e-6, rtol=0)


def test_gpm_update_from_empty_basis_and_truncation():
    features, left = _matrix_with_energies([4.0, 3.0, 2.0, 1.0], columns=6, seed=5)
    first = gpm_update(None, gram(features), threshold=0.65)  # 0.4 -> 0.7: two directions
    torch.testing.assert_close(_projector(first), _projector(left[:, :2]), atol=1e-6, rtol=0)
    full = gpm_update(first, gram(features), threshold=1.0)
    assert full.shape == (4, 4)
    torch.testing.assert_close(full.T @ full, torch.eye(4), atol=1e-5, rtol=0)
    assert gpm_update(full, gram(features), threshold=1.0).shape == (4, 4)
    assert gpm_update(first, torch.zeros(4, 4), threshold=0.99).shape == (4, 2)
