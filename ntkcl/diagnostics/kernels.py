"""The empirical neural tangent kernel of a method's tuned parameters and what is read from it.

NTK-CL (Liu et al., "Parameter-Efficient Fine-Tuning for Continual Learning: A Neural Tangent Kernel
Perspective", arXiv 2407.17120) ties PEFT-CL generalisation to the kernel Θ(x, x') = J(x) J(x')ᵀ of the tuned
parameters, J the Jacobian of the outputs with respect to them. Here J comes from `torch.func`
(`functional_call` over the method's `predict`, `jacrev`, i.e. vmap over vector-Jacobian products); the frozen
backbone is not among the differentiated tensors, so it contributes nothing.

The scalar kernel used for every summary is the output trace k(x, x') = Σ_c Θ_cc(x, x'): the inner product of
the tangent features φ(x) = vec(J(x)). Task subspaces and class prototypes live in that feature space and
are computed from k alone (no P-dimensional vector is formed).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel


class _Predict(nn.Module):
    """`method.predict` as a module's forward, so that `functional_call` can swap the method's tensors."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.predict(images)


def tangent_features(
    method: nn.Module,
    names: list[str],
    images: torch.Tensor,
    projection: torch.Tensor | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """(N, K, P): the Jacobian of the method's logits (or `logits @ projection`) with respect to `names`.

    Args:
        method: a module with `predict(images) -> logits`, differentiable when gradients are enabled.
        names: the differentiated tensors, by their names in `method.named_parameters()`.
        images: the inputs (N, ...), processed `batch_size` at a time.
        projection: (C, K) applied to the logits (C seen classes); None: the logits themselves.
    """
    wrapper = _Predict(method)
    owned = dict(method.named_parameters())
    values = {f"method.{name}": owned[name].detach() for name in names}

    def outputs(tensors: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        logits = functional_call(wrapper, tensors, (batch,)).float()
        return logits if projection is None else logits @ projection[: logits.shape[1]].to(logits)

    rows = []
    # The math attention kernel: its backward is made of operations with batching rules, so the vmap over
    # output directions stays batched (the fused kernels' backward would fall back to a per-direction loop).
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            jacobian = jacrev(outputs)(values, batch)
            rows.append(torch.cat([part.reshape(len(batch), part.shape[1], -1) for part in jacobian.values()], dim=2))
    return torch.cat(rows).detach()


def empirical_ntk(features: torch.Tensor) -> torch.Tensor:
    """Θ (N, K, N, K) with Θ[a, c, b, e] = J_c(x_a) · J_e(x_b), from `tangent_features`."""
    return torch.einsum("acp,bep->acbe", features, features)


def trace_kernel(features: torch.Tensor) -> torch.Tensor:
    """k (N, N) = Σ_c Θ[:, c, :, c] in float64: the inner products of the flattened tangent features."""
    flat = features.reshape(len(features), -1).double()
    return flat @ flat.T


def _centred(kernel: torch.Tensor) -> torch.Tensor:
    return kernel - kernel.mean(0, keepdim=True) - kernel.mean(1, keepdim=True) + kernel.mean()


def centred_alignment(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """⟨HK₁H, HK₂H⟩_F / (‖HK₁H‖_F ‖HK₂H‖_F), H = I − 11ᵀ/n (Cortes et al. 2012; CKA of Kornblith et al. 2019
    when both are kernels of representations). None when either centred kernel is zero."""
    a, b = _centred(first.double()), _centred(second.double())
    norms = a.norm() * b.norm()
    return None if norms == 0 else float((a * b).sum() / norms)


def label_kernel(labels: torch.Tensor) -> torch.Tensor:
    """Y Yᵀ with Y the one-hot labels: 1 where two images share a class."""
    return (labels.unsqueeze(0) == labels.unsqueeze(1)).double()


def effective_rank(kernel: torch.Tensor) -> float | None:
    """exp of the Shannon entropy of the normalised eigenvalues (Roy and Vetterli 2007); None for a zero kernel."""
    eigenvalues = torch.linalg.eigvalsh(kernel.double()).clamp_min(0)
    total = eigenvalues.sum()
    if total == 0:
        return None
    p = eigenvalues[eigenvalues > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def block_norms(kernel: torch.Tensor, groups: list[torch.Tensor]) -> list[list[float | None]]:
    """‖k_ij‖_F / sqrt(‖k_ii‖_F ‖k_jj‖_F) for every pair of row groups (None where a diagonal block is zero)."""
    norms = [[float(kernel[rows][:, columns].norm()) for columns in groups] for rows in groups]
    return [
        [
            None if norms[i][i] == 0 or norms[j][j] == 0 else norms[i][j] / math.sqrt(norms[i][i] * norms[j][j])
            for j in range(len(groups))
        ]
        for i in range(len(groups))
    ]


def energy_basis(gram: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """Coefficients C (n, k) such that Φᵀ C is an orthonormal basis of the top-k directions of the rows Φ of a
    feature matrix with Gram matrix `gram` = ΦΦᵀ, k the fewest directions holding `energy` of Σλ."""
    eigenvalues, vectors = torch.linalg.eigh(gram.double())
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    positive = eigenvalues > eigenvalues[0].clamp_min(0) * len(gram) * torch.finfo(torch.float64).eps
    eigenvalues, vectors = eigenvalues[positive], vectors[:, positive]
    if len(eigenvalues) == 0:
        return vectors, 0
    share = eigenvalues.cumsum(0) / eigenvalues.sum()
    k = min(int((share < energy - 1e-12).sum()) + 1, len(eigenvalues))
    return vectors[:, :k] / eigenvalues[:k].sqrt(), k


def principal_angles(
    gram_a: torch.Tensor, gram_ab: torch.Tensor, gram_b: torch.Tensor, energy: float = 0.9
) -> tuple[torch.Tensor, int, int]:
    """Principal angles (radians, ascending) between the energy subspaces of two sets of feature rows.

    Only Gram matrices are needed: with orthonormal bases U_a = Φ_aᵀC_a and U_b = Φ_bᵀC_b, the cosines are
    the singular values of U_aᵀU_b = C_aᵀ (Φ_a Φ_bᵀ) C_b (Björck and Golub 1973). Returns the angles and k_a, k_b.
    """
    basis_a, k_a = energy_basis(gram_a, energy)
    basis_b, k_b = energy_basis(gram_b, energy)
    if k_a == 0 or k_b == 0:
        return torch.zeros(0, dtype=torch.float64), k_a, k_b
    cosines = torch.linalg.svdvals(basis_a.T @ gram_ab.double() @ basis_b).clamp(0, 1)
    return torch.arccos(cosines), k_a, k_b


def prototype_cosines(kernel: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines between class means of the feature rows behind `kernel` (classes: sorted unique labels)."""
    classes = labels.unique()
    averaging = (labels.unsqueeze(1) == classes.unsqueeze(0)).double()
    averaging = averaging / averaging.sum(0, keepdim=True)
    gram = averaging.T @ kernel.double() @ averaging
    scale = gram.diagonal().clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    return gram / scale.unsqueeze(0) / scale.unsqueeze(1), classes


def ntk_summary(kernel: torch.Tensor, labels: torch.Tensor, groups: list[torch.Tensor]) -> dict[str, list]:
    """The per-checkpoint NTK numbers: cross-task block norms, per-task effective rank and label alignment."""
    return {
        "block_norms": block_norms(kernel, groups),
        "effective_rank": [effective_rank(kernel[rows][:, rows]) for rows in groups],
        "label_alignment": [centred_alignment(kernel[rows][:, rows], label_kernel(labels[rows])) for rows in groups],
    }
