"""Energy-threshold subspaces: the Gradient Projection Memory routine (Saha et al., "Gradient Projection Memory
for Continual Learning", arXiv 2103.09762) that KeepLoRA (Luo et al., "KeepLoRA: Continual Learning with
Residual Gradient Adaptation", arXiv 2601.19659) uses to protect pre-trained and learned directions, and its
dual form (DualGPM, Liang and Li, "Adaptive Plasticity Improvement for Continual Learning", CVPR 2023) that
InfLoRA (Liang and Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024,
arXiv 2404.00228) uses: once the protected directions fill more than half of the space, the basis of the free
directions is kept instead, which is the smaller of the two.

A basis is a (d x k) matrix with orthonormal columns. Energies are squared singular values (equivalently the
eigenvalues of a Gram matrix X Xᵀ), sorted in descending order. The linear algebra runs in float64 outside
autocast and the bases come back in float32, so a bf16 run selects the same directions as an fp32 one.
"""

from __future__ import annotations

from typing import Literal

import torch

WeightSpace = Literal["input", "output"]


def energy_rank(energies: torch.Tensor, threshold: float) -> int:
    """How many leading directions KeepLoRA keeps of a pre-trained weight.

    The count of i with Σ_{k≤i} e_k / Σ_k e_k < threshold, at least 1 (so the direction whose energy crosses
    the threshold is not included).

    Args:
        energies: descending squared singular values.
        threshold: fraction of the total energy, in (0, 1].
    """
    energies = energies.double()
    total = energies.sum()
    if total <= 0:
        return 1
    below = torch.cumsum(energies, dim=0) / total < threshold
    return max(1, int(below.sum()))


def _float64_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(device_type=matrix.device.type, enabled=False):
        left, singular, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    return left, singular


def weight_basis(weight: torch.Tensor, threshold: float, space: WeightSpace = "input") -> torch.Tensor:
    """The principal directions of a pre-trained weight that hold `threshold` of its energy.

    Args:
        weight: a PyTorch-layout (out x in) weight.
        threshold: energy fraction (`energy_rank`); KeepLoRA uses 0.85 for vision, 0.2 for text.
        space: "input" takes the left singular vectors of Wᵀ (in x p), the directions the paper's
            W_p = U[:, :p] describes for W in (in x out) layout (and its LLaVA code computes); "output" takes
            the left singular vectors of W itself (out x p), as the MTIL code does before using them as an
            input-space projector (the same shape only for square weights).

    Returns:
        (in x p) or (out x p) float32 basis.
    """
    matrix = weight.detach().T if space == "input" else weight.detach()
    left, singular = _float64_svd(matrix)
    rank = energy_rank(singular.square(), threshold)
    return left[:, :rank].float().contiguous()


def project_off(matrix: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """The component of `matrix` (d x n) orthogonal to span(basis): M - B Bᵀ M."""
    if basis is None or basis.shape[1] == 0:
        return matrix
    basis = basis.to(matrix.dtype)
    return matrix - basis @ (basis.T @ matrix)


def gram(samples: torch.Tensor) -> torch.Tensor:
    """X Xᵀ in float64 for samples X (d x n): its eigenpairs are X's left singular vectors and energies."""
    with torch.autocast(device_type=samples.device.type, enabled=False):
        samples = samples.double()
        return samples @ samples.T


def gpm_update(basis: torch.Tensor | None, gram_matrix: torch.Tensor, threshold: float) -> torch.Tensor:
    """Grow a basis with the new directions of a feature matrix X, GPM's rule.

    With G = X Xᵀ: total energy tot = tr(G); the residual X̂ = X - P Pᵀ X has Gram (I - PPᵀ) G (I - PPᵀ),
    whose eigenpairs are X̂'s left singular vectors Û and energies ê. Starting from the energy the basis
    already explains, acc = (tot - ‖X̂‖²_F) / tot, directions of Û are appended one at a time (acc += ê_i/tot)
    while acc < threshold; the result [P, Û[:, :m]] is cut to d columns.

    Args:
        basis: current (d x k) basis, or None for an empty one.
        gram_matrix: (d x d) Gram matrix of the features (`gram`), or any positive semi-definite matrix whose
            eigenvalues are the energies to threshold (a feature covariance).
        threshold: energy fraction (KeepLoRA: 0.99).

    Returns:
        The (d x k') float32 basis, k <= k' <= d.
    """
    dimension = gram_matrix.shape[0]
    with torch.autocast(device_type=gram_matrix.device.type, enabled=False):
        full = gram_matrix.double()
        total = torch.trace(full)
        if basis is None:
            basis = full.new_zeros(dimension, 0)
        if total <= 0:
            return basis.float()
        projector = torch.eye(dimension, dtype=torch.float64, device=full.device)
        projector = projector - basis.double() @ basis.double().T
        residual = projector @ full @ projector
        energies, vectors = torch.linalg.eigh((residual + residual.T) / 2)
        energies, vectors = energies.flip(0).clamp_min(0), vectors.flip(1)
        explained = ((total - torch.trace(residual)) / total).item()
        ratios = (energies / total).tolist()
    added = 0
    while added < len(ratios) and explained < threshold:
        explained += ratios[added]
        added += 1
    grown = torch.cat([basis.double(), vectors[:, :added]], dim=1)[:, :dimension]
    return grown.float().contiguous()


def _descending_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric float64 matrix."""
    energies, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return energies.flip(0).clamp_min(0), vectors.flip(1)


def free_component(matrix: torch.Tensor, basis: torch.Tensor, free: bool) -> torch.Tensor:
    """The component of `matrix` (d x n) in the free space of a DualGPM basis.

    Args:
        matrix: the columns to project.
        basis: (d x k) orthonormal columns.
        free: whether `basis` spans the free directions (then Q Qᵀ M) or the protected ones (then M - P Pᵀ M).
    """
    if free:
        basis = basis.to(matrix.dtype)
        return basis @ (basis.T @ matrix)
    return project_off(matrix, basis)


def _free_when_over_half(basis: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A protected basis wider than half the space as the basis of its complement (DualGPM's switch)."""
    dimension, width = basis.shape
    if width <= dimension / 2:
        return basis, False
    with torch.autocast(device_type=basis.device.type, enabled=False):
        left, _, _ = torch.linalg.svd(basis.double(), full_matrices=True)
    return left[:, width:].float().contiguous(), True


def dual_gpm_update(
    basis: torch.Tensor, free: bool, gram_matrix: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, bool]:
    """Grow the protected space of a DualGPM basis with a task's representation matrix X (d x n).

    With G = X Xᵀ (`gram`) and tot = tr(G):

    * nothing protected yet (a protected basis of width 0): the leading `energy_rank(ê, threshold)` eigenvectors
      of G (at least one, the direction crossing the threshold excluded);
    * a protected basis P: `gpm_update` (GPM's rule, the crossing direction included);
    * a free basis Q (k columns): with Ĝ = Q Qᵀ G Q Qᵀ (the energy still in the free space), acc = tr(Ĝ) / tot;
      while acc ≥ 1 - threshold, the next eigenvector of Ĝ leaves the free space (acc -= ê_i / tot); the
      r that left are removed: Q ← the leading k - r left singular vectors of Q - U_r U_rᵀ Q.

    Afterwards a protected basis wider than d / 2 is replaced by the basis of its complement (free).

    Returns:
        The new (d x k') float32 basis and whether it spans the free space.
    """
    with torch.autocast(device_type=gram_matrix.device.type, enabled=False):
        full = gram_matrix.double()
        if not free and basis.shape[1] == 0:
            energies, vectors = _descending_eigh(full)
            rank = energy_rank(energies, threshold)
            return _free_when_over_half(vectors[:, :rank].float().contiguous())
        if not free:
            return _free_when_over_half(gpm_update(basis, full, threshold))
        total = torch.trace(full)
        if total <= 0:
            return basis, True
        kept = basis.double()
        projector = kept @ kept.T
        energies, vectors = _descending_eigh(projector @ full @ projector)
        remaining = (energies.sum() / total).item()
        ratios = (energies / total).tolist()
        removed = 0
        while removed < len(ratios) and remaining >= 1 - threshold:
            remaining -= ratios[removed]
            removed += 1
        if removed == 0:
            return basis, True
        leaving = vectors[:, :removed]
        left, _, _ = torch.linalg.svd(kept - leaving @ (leaving.T @ kept), full_matrices=True)
        return left[:, : kept.shape[1] - removed].float().contiguous(), True
