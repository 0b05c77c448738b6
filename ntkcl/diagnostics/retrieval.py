"""The task-retrieval bound of PROTEUS (Le, Bui, Hoang, Hoang, "Continual Fine-Tuning with Provably Accurate
and Parameter-Free Task Retrieval", arXiv 2603.13235): δ, κ and the threshold of the paper's Eq. 28 per
cluster, as the authors' precursor code (`theories.py`) computes them.

For cluster k of task t (the images its own mixture assigns to component k) and every other task i with
stored components s (mean μ_is, covariance Σ_is as fitted, no scoring regulariser):

    δ  = min_{i≠t, s} mean_{a,b} (h_a − μ_is)ᵀ Σ_is⁻¹ (h_b − μ_is) / d − 1,   h = the cluster's embeddings by
         task i's model; the mean over the n × n matrix equals the centroid form (h̄ − μ)ᵀ Σ⁻¹ (h̄ − μ)
    κ  = min_{i≠t, s} (log det Σ_is − log det Λ_tk),   Λ_tk the cluster's own component covariance
    σ² = max_{i≠t} of the largest per-dimension (unbiased) variance of h; for a one-image cluster the
         precursor takes the largest coordinate of h instead, and so does this function
    N  = (T − 1) Σ_i τ_i + 1 (τ_i task i's component truncation), ε = 0.01, d the embedding width
    M  = 3dσ² − κ
    threshold = (2/d) · max(¼(M + √(M² − 24dσ²κ)) − κ,  log((N/ε)(√(1 + 4d / log(N/ε)) + 1)))

The cluster satisfies the bound's condition when δ > threshold. Where M² < 24dσ²κ the first term is not a
real number; the precursor's comparison then yields NaN and the cluster fails: the threshold is reported as
None and the condition as not satisfied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

EPSILON = 0.01


@dataclass(frozen=True)
class RetrievalBound:
    delta: float
    kappa: float
    sigma_squared: float
    threshold: float | None
    satisfied: bool

    def as_dict(self) -> dict:
        return asdict(self)


def retrieval_bound(
    cluster_embeddings: Sequence[torch.Tensor],
    other_means: Sequence[torch.Tensor],
    other_covariances: Sequence[torch.Tensor],
    own_covariance: torch.Tensor,
    truncations: Sequence[int],
    epsilon: float = EPSILON,
) -> RetrievalBound:
    """δ, κ, σ² and the threshold of one cluster (see the module docstring).

    Args:
        cluster_embeddings: per other task i, the cluster's images embedded by task i's model (n, d).
        other_means: per other task i, its components' means (S_i, d).
        other_covariances: per other task i, its components' covariances (S_i, d, d).
        own_covariance: the cluster's own component covariance Λ_tk (d, d).
        truncations: τ of every task of the stream, the cluster's own included.
        epsilon: ε of the bound.
    """
    dim = own_covariance.shape[-1]
    deltas, log_ratios, spreads = [], [], []
    own_log_det = torch.logdet(own_covariance.double())
    for embeddings, means, covariances in zip(cluster_embeddings, other_means, other_covariances, strict=True):
        embeddings, means, covariances = embeddings.double(), means.double(), covariances.double()
        offsets = (embeddings.mean(0) - means).unsqueeze(-1)  # (S, d, 1)
        distances = (offsets.transpose(1, 2) @ torch.linalg.solve(covariances, offsets)).reshape(-1)
        deltas.append(distances / dim - 1)
        log_ratios.append(torch.logdet(covariances) - own_log_det)
        spreads.append(embeddings.var(0).max() if len(embeddings) > 1 else embeddings[0].max())
    delta = float(torch.cat(deltas).min())
    kappa = float(torch.cat(log_ratios).min())
    sigma_squared = float(torch.stack(spreads).max())
    count = (len(truncations) - 1) * sum(truncations) + 1
    log_term = math.log(count / epsilon)
    second = math.log((count / epsilon) * (math.sqrt(1 + 4 * dim / log_term) + 1))
    m = 3 * dim * sigma_squared - kappa
    discriminant = m * m - 24 * dim * sigma_squared * kappa
    if discriminant < 0:
        return RetrievalBound(delta, kappa, sigma_squared, None, False)
    first = 0.25 * (m + math.sqrt(discriminant)) - kappa
    threshold = 2 / dim * max(first, second)
    return RetrievalBound(delta, kappa, sigma_squared, threshold, delta > threshold)
