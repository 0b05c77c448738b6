"""Task signatures for parameter-free task retrieval: Gaussian components of a task's features.

PROTEUS (Le, Bui, Hoang, Hoang, "Continual Fine-Tuning with Provably Accurate and Parameter-Free Task
Retrieval", arXiv 2603.13235) fits, after each task, a Dirichlet-process Gaussian mixture (DP-GMM) to the
task's training features as embedded by that task's model, and routes a test image to the task whose
signature scores its embedding highest. The fit is scikit-learn's `BayesianGaussianMixture` with a
Dirichlet-process weight prior. What is kept per component (`statistics`): "empirical" (as the authors'
precursor code keeps `cls_mean` / `cls_cov`): the mean and the full covariance (unbiased, zero for a
one-image component) of the embeddings the fit assigns to it, or "mixture": scikit-learn's posterior
weights, means and covariances. Either is stored as tensors (module buffers, saved in safetensors) and
scored with the covariances regularised by `epsilon * I` (1e-4, as the precursor's
`MultivariateNormal(mean, cov + 1e-4 I)`), by the best component (the precursor) or the weighted mixture.

`retrieval_bound` computes, per cluster, the quantities of the paper's retrieval bound exactly as the
precursor's `theories.py` does: the separation factor δ, the covariance log-det ratio κ and the threshold
of the paper's Eq. (28); a cluster satisfies the bound's condition when δ > threshold.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ntkcl.errors import RunFailedError

CovarianceType = Literal["full", "diag"]
Statistics = Literal["empirical", "mixture"]


def empirical_components(
    data: np.ndarray, assigned: np.ndarray, kept: np.ndarray, covariance_type: CovarianceType
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Share, mean and unbiased covariance (zero for a single row; diagonal: variances) of each kept
    component's rows."""
    weights, means, covariances = [], [], []
    for component in kept:
        rows = data[assigned == component]
        weights.append(len(rows) / len(data))
        means.append(rows.mean(axis=0))
        if len(rows) < 2:
            spread = np.zeros((data.shape[1], data.shape[1]))
        else:
            spread = np.cov(rows, rowvar=False).reshape(data.shape[1], data.shape[1])
        covariances.append(spread if covariance_type == "full" else np.diag(spread).copy())
    return np.asarray(weights), np.stack(means), np.stack(covariances)


@dataclass(frozen=True)
class MixtureFit:
    """How a fit went: components kept, EM iterations, convergence, wall time, and each row's component
    among the kept ones (its cluster)."""

    components: int
    iterations: int
    converged: bool
    seconds: float
    clusters: torch.Tensor


class GaussianMixtureSignature(nn.Module):
    """A fitted Gaussian mixture as buffers: `weights` (K), `means` (K, d), `covariances` (K, d, d) or (K, d).

    Args:
        num_components: K.
        dim: feature width d.
        covariance_type: "full" or "diag" (diagonal covariances, K x d storage).
        epsilon: added to the covariance diagonal when scoring.

    The Cholesky factors used for scoring are derived in float64 from the stored covariances whenever they
    are set or loaded (not saved).
    """

    def __init__(self, num_components: int, dim: int, covariance_type: CovarianceType = "full", epsilon: float = 1e-4):
        super().__init__()
        self.covariance_type = covariance_type
        self.epsilon = epsilon
        shape = (num_components, dim, dim) if covariance_type == "full" else (num_components, dim)
        self.register_buffer("weights", torch.zeros(num_components))
        self.register_buffer("means", torch.zeros(num_components, dim))
        self.register_buffer("covariances", torch.zeros(shape))
        self.register_buffer("whitening", torch.zeros(shape), persistent=False)
        self.register_buffer("log_normalizers", torch.zeros(num_components), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        max_components: int,
        concentration: float,
        covariance_type: CovarianceType = "full",
        max_iter: int = 100,
        reg_covar: float = 1e-6,
        seed: int = 0,
        prune: bool = True,
        epsilon: float = 1e-4,
        threads: int | None = None,
        statistics: Statistics = "empirical",
    ) -> tuple[GaussianMixtureSignature, MixtureFit]:
        """Fit a DP-GMM to `features` (N, d) with scikit-learn.

        Args:
            features: the task's embeddings, one row per training image.
            max_components: the truncation K of the Dirichlet process (at most N).
            concentration: `weight_concentration_prior` of the stick-breaking prior.
            covariance_type: "full" or "diag".
            max_iter: EM iterations at most.
            reg_covar: scikit-learn's diagonal regulariser during the fit.
            seed: `random_state` (k-means initialisation).
            prune: keep only the components that own at least one training image (hard assignment); the
                others carry almost no weight under the Dirichlet process. Weights are kept as fitted.
                Empirical statistics always drop them (an empty component has none).
            epsilon: diagonal regulariser when scoring.
            threads: BLAS/OpenMP threads of the fit (None: the libraries' default). Small fits run faster on
                one thread, which avoids contention with torch's own thread pool.
            statistics: "empirical" (per component the share, mean and unbiased covariance of the rows the
                fit assigns to it) or "mixture" (scikit-learn's fitted weights, means and covariances).
        """
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import BayesianGaussianMixture
        from threadpoolctl import threadpool_limits

        data = features.detach().to("cpu", torch.float64).numpy()
        mixture = BayesianGaussianMixture(
            n_components=max(1, min(max_components, len(data))),
            covariance_type=covariance_type,
            weight_concentration_prior_type="dirichlet_process",
            weight_concentration_prior=concentration,
            max_iter=max_iter,
            reg_covar=reg_covar,
            random_state=seed,
        )
        started = time.perf_counter()
        with warnings.catch_warnings(), threadpool_limits(threads):
            warnings.simplefilter("ignore", ConvergenceWarning)
            try:
                mixture.fit(data)
            except ValueError as error:  # collapsed features: a component's covariance is singular
                raise RunFailedError(
                    f"the Gaussian mixture of {len(data)} features failed: {str(error).splitlines()[0]} "
                    "(lower method.params.n_components or raise method.params.gmm_reg_covar)"
                ) from error
        seconds = time.perf_counter() - started
        assigned = mixture.predict(data)
        empirical = statistics == "empirical"
        kept = np.unique(assigned) if prune or empirical else np.arange(mixture.n_components)
        signature = cls(len(kept), data.shape[1], covariance_type, epsilon)
        if empirical:
            weights, means, covariances = empirical_components(data, assigned, kept, covariance_type)
        else:
            weights, means, covariances = mixture.weights_[kept], mixture.means_[kept], mixture.covariances_[kept]
        signature.set_parameters(torch.from_numpy(weights), torch.from_numpy(means), torch.from_numpy(covariances))
        clusters = torch.from_numpy(np.searchsorted(kept, assigned)).to(features.device)
        return signature.to(features.device), MixtureFit(
            len(kept), int(mixture.n_iter_), bool(mixture.converged_), seconds, clusters
        )

    @torch.no_grad()
    def set_parameters(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor) -> None:
        self.weights.copy_(weights)
        self.means.copy_(means)
        self.covariances.copy_(covariances)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Derive the whitening factors and log-normalisers of N(μ_k, Σ_k + εI) in float64.

        Full: W_k = L_k⁻¹ with L_k L_kᵀ = Σ_k + εI, so (x-μ)ᵀ(Σ_k + εI)⁻¹(x-μ) = ‖W_k (x-μ)‖².
        """
        covariances = self.covariances.to(torch.float64)
        if self.covariance_type == "full":
            identity = torch.eye(self.dim, dtype=torch.float64, device=covariances.device)
            cholesky = torch.linalg.cholesky(covariances + self.epsilon * identity)
            whitening = torch.linalg.solve_triangular(cholesky, identity.expand_as(cholesky), upper=False)
            log_det = 2 * torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum(-1)
        else:
            variances = covariances + self.epsilon
            whitening = variances.rsqrt()
            log_det = torch.log(variances).sum(-1)
        self.whitening.copy_(whitening)
        self.log_normalizers.copy_(-0.5 * (self.dim * math.log(2 * math.pi) + log_det))

    def squared_mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K): (x-μ_k)ᵀ(Σ_k + εI)⁻¹(x-μ_k) for every row x, in float32 whatever the autocast."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.float()
            means, whitening = self.means.float(), self.whitening.float()
            if self.covariance_type == "full":
                # W_k x - W_k μ_k for all k in one matmul: (N, d) @ (d, K d).
                whitened = x @ whitening.permute(2, 0, 1).reshape(self.dim, -1)
                shifted = whitened.view(len(x), self.num_components, self.dim) - torch.einsum(
                    "ked,kd->ke", whitening, means
                )
                return shifted.pow(2).sum(-1)
            return ((x.unsqueeze(1) - means) * whitening).pow(2).sum(-1)

    def component_log_densities(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K): log N(x; μ_k, Σ_k + εI)."""
        return self.log_normalizers.float() - 0.5 * self.squared_mahalanobis(features)

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        """(N,): log Σ_k w_k N(x; μ_k, Σ_k + εI)."""
        return torch.logsumexp(self.component_log_densities(features) + self.weights.float().log(), dim=1)

    def best_component_log_density(self, features: torch.Tensor) -> torch.Tensor:
        """(N,): max_k log N(x; μ_k, Σ_k + εI), ignoring the weights."""
        return self.component_log_densities(features).max(dim=1).values

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """(N,): the component of highest posterior for every row (its cluster)."""
        return (self.component_log_densities(features) + self.weights.float().log()).argmax(dim=1)


@dataclass(frozen=True)
class RawComponents:
    """One task's components with their raw (unregularised) covariances, as the bound reads them:
    `means` (K, d), `precisions` (K, d, d) = Σ⁻¹ (NaN where Σ is singular or not finite), `log_dets` (K) =
    log det Σ (-inf there), all float64."""

    means: torch.Tensor
    precisions: torch.Tensor
    log_dets: torch.Tensor

    @classmethod
    def of(cls, signature: GaussianMixtureSignature) -> RawComponents:
        covariances = signature.covariances.to(torch.float64)
        if signature.covariance_type == "diag":
            covariances = torch.diag_embed(covariances)
        # A component no image fell into has a NaN covariance: singular, like a rank-deficient one. Cholesky, not
        # LU: a covariance is symmetric positive (semi-)definite, and batched float64 LU of this torch build's MKL
        # fails ("Parameter 6 was incorrect on entry to DLASWP") or returns wrong determinants once
        # `torch.set_num_threads` has been called in the process.
        finite = torch.isfinite(covariances).all(dim=-1).all(dim=-1)
        identity = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
        factor, info = torch.linalg.cholesky_ex(torch.where(finite[:, None, None], covariances, identity))
        singular = (info != 0) | ~finite
        inverse = torch.cholesky_inverse(factor)
        inverse = torch.where(singular[:, None, None], torch.full_like(inverse, float("nan")), inverse)
        log_dets = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)
        log_dets = torch.where(singular, torch.full_like(log_dets, float("-inf")), log_dets)
        return cls(signature.means.to(torch.float64), inverse, log_dets)


@dataclass(frozen=True)
class ClusterBound:
    """The retrieval bound's terms for one cluster (non-finite values are None in `as_record`)."""

    delta: float
    kappa: float
    sigma_squared: float
    threshold: float

    @property
    def satisfied(self) -> bool:
        return self.delta > self.threshold

    def as_record(self) -> dict:
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "delta": finite(self.delta),
            "kappa": finite(self.kappa),
            "sigma_squared": finite(self.sigma_squared),
            "threshold": finite(self.threshold),
            "satisfied": self.satisfied,
        }


def separation_factors(cluster_views: list[torch.Tensor], others: list[RawComponents]) -> torch.Tensor:
    """δ of one cluster against every component of the other tasks, (x̄ - μ)ᵀ Σ⁻¹ (x̄ - μ) / d - 1, as one
    vector (task after task).

    `theories.py` averages the n x n matrix (x_a - μ)ᵀ Σ⁻¹ (x_b - μ) over the cluster's rows a, b, which is
    this quadratic form at the rows' mean x̄ (the cluster embedded by the other task's model), with the raw
    covariance (NaN where it is singular).
    """
    rows = []
    for view, components in zip(cluster_views, others, strict=True):
        difference = view.to(torch.float64).mean(0) - components.means
        quadratic = torch.einsum("kd,kde,ke->k", difference, components.precisions, difference)
        rows.append(quadratic / view.shape[1] - 1)
    return torch.cat(rows)


def retrieval_bound(
    cluster_views: list[torch.Tensor],
    others: list[RawComponents],
    own_log_det: float,
    num_tasks: int,
    truncations: list[int],
    epsilon: float = 0.01,
) -> ClusterBound:
    """δ, κ, σ² and the Eq. (28) threshold of one cluster, as the precursor's `theories.py` computes them.

    Args:
        cluster_views: per other task i, the cluster's rows (n, d) embedded by task i's model.
        others: per other task i, its components (`RawComponents`).
        own_log_det: log det of the cluster's own raw covariance Λ (-inf if singular).
        num_tasks: T, the stream's task count.
        truncations: τ_i, every task's component truncation (its configured `n_components`).
        epsilon: ε of the bound (0.01).

    δ = min over other tasks and components of the centroid Mahalanobis factor (`separation_factors`);
    κ = min over them of log det Σ_si - log det Λ; σ² = the largest per-dimension variance (unbiased) of the
    cluster's rows under any other task's model (for a one-row cluster `theories.py` takes the row's largest
    value instead, kept here); N = (T - 1) Σ τ + 1; M = 3dσ² - κ;
    threshold = (2/d) max(¼(M + √(M² - 24dσ²κ)) - κ, log((N/ε)(√(1 + 4d/log(N/ε)) + 1))).
    A negative discriminant makes the first term NaN, and `theories.py`'s `max(first, second)` then returns
    NaN: so does this. With no other task every term is NaN.
    """
    if not others:
        nan = float("nan")
        return ClusterBound(nan, nan, nan, nan)
    dim = cluster_views[0].shape[1]
    delta = float(separation_factors(cluster_views, others).min())
    kappa = float(torch.cat([components.log_dets for components in others]).min()) - own_log_det
    spreads = []
    for view in cluster_views:
        view = view.to(torch.float64)
        spreads.append(float(view.max()) if len(view) == 1 else float(view.var(dim=0, unbiased=True).max()))
    sigma_squared = max(spreads)
    count = (num_tasks - 1) * sum(truncations) + 1
    second = math.log((count / epsilon) * (math.sqrt(1 + 4 * dim / math.log(count / epsilon)) + 1))
    m = 3 * dim * sigma_squared - kappa
    discriminant = m * m - 24 * dim * sigma_squared * kappa
    first = 0.25 * (m + math.sqrt(discriminant)) - kappa if discriminant >= 0 else float("nan")
    larger = second if second > first else first  # Python's max(first, second), NaN included
    return ClusterBound(delta, kappa, sigma_squared, 2 * larger / dim)
