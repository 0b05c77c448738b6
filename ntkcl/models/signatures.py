"""Task signatures for parameter-free task retrieval: a Dirichlet-process Gaussian mixture of a task's features.

PROTEUS (Le, Bui, Hoang, Hoang, "Continual Fine-Tuning with Provably Accurate and Parameter-Free Task
Retrieval", arXiv 2603.13235) fits, after each task, a Dirichlet-process Gaussian mixture (DP-GMM) to the
task's training features as embedded by that task's model, and routes a test image to the task under whose
mixture its embedding is most likely. The fit is scikit-learn's `BayesianGaussianMixture` with a
Dirichlet-process weight prior; the fitted weights, means and covariances are stored as tensors (module
buffers, saved in safetensors) and scored with the covariances regularised by `epsilon * I` (1e-4, as the
authors' precursor code scores `MultivariateNormal(mean, cov + 1e-4 I)`).

The cluster-separation factor δ of the paper's retrieval bound is measured here as in that code: for the
images of one cluster (a component of their own task's mixture) embedded by another task's model, the mean
squared Mahalanobis distance to each of that task's components, divided by the width d, minus 1; δ is the
smallest value over clusters and components. Gaussian data give about 0 for their own component, so δ > 0
means every cluster lies farther from the other tasks' components than their own spread.
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


@dataclass(frozen=True)
class MixtureFit:
    """How a fit went: components kept, EM iterations, convergence and wall time."""

    components: int
    iterations: int
    converged: bool
    seconds: float


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
            epsilon: diagonal regulariser when scoring.
            threads: BLAS/OpenMP threads of the fit (None: the libraries' default). Small fits run faster on
                one thread, which avoids contention with torch's own thread pool.
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
        kept = np.unique(mixture.predict(data)) if prune else np.arange(mixture.n_components)
        signature = cls(len(kept), data.shape[1], covariance_type, epsilon)
        signature.set_parameters(
            torch.from_numpy(mixture.weights_[kept]),
            torch.from_numpy(mixture.means_[kept]),
            torch.from_numpy(mixture.covariances_[kept]),
        )
        return signature.to(features.device), MixtureFit(
            len(kept), int(mixture.n_iter_), bool(mixture.converged_), seconds
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


def cluster_distance_sums(
    distances: torch.Tensor, clusters: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (C, K) of squared Mahalanobis distances (N, K) and image counts (C), in float64.

    Plain sums, so distributed processes add theirs before `separation_factor`.
    """
    sums = torch.zeros(num_clusters, distances.shape[1], dtype=torch.float64, device=distances.device)
    sums.index_add_(0, clusters, distances.to(torch.float64))
    counts = torch.bincount(clusters, minlength=num_clusters).to(torch.float64)
    return sums, counts


def separation_factor(sums: torch.Tensor, counts: torch.Tensor, dim: int) -> float:
    """δ = min over clusters c (with images) and components k of mean_{x∈c} m²(x, k) / d − 1."""
    present = counts > 0
    means = sums[present] / counts[present].unsqueeze(1)
    return float(means.min() / dim - 1)
