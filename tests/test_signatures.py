"""DP-GMM task signatures: empirical components, scoring against torch's Gaussians, retrieval, and the
retrieval bound's δ, κ and threshold against hand computation."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from ntkcl.errors import RunFailedError
from ntkcl.models.signatures import GaussianMixtureSignature, RawComponents, retrieval_bound, separation_factors

DIM = 6


@pytest.fixture(autouse=True)
def _few_threads():
    # Overrides conftest's: these are many tiny decompositions, which a second thread only slows down.
    torch.set_num_threads(1)


def task_features(centre: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Two Gaussian clusters per task around `centre` (one component would do; two exercise the mixture)."""
    offsets = torch.zeros(2, DIM)
    offsets[0, 0], offsets[1, 0] = 1.5, -1.5
    which = torch.randint(0, 2, (count,), generator=generator)
    return centre + offsets[which] + 0.5 * torch.randn(count, DIM, generator=generator)


def fitted_tasks(spacing: float, seed: int = 0, components: int = 5):
    """Three tasks whose centres are `spacing` apart; signatures from 200 training rows, 100 held-out rows each."""
    generator = torch.Generator().manual_seed(seed)
    centres = [torch.zeros(DIM), torch.zeros(DIM), torch.zeros(DIM)]
    centres[1][1], centres[2][2] = spacing, spacing
    train = [task_features(centre, 200, generator) for centre in centres]
    test = [task_features(centre, 100, generator) for centre in centres]
    signatures = [GaussianMixtureSignature.fit(rows, components, 0.1, seed=seed, threads=1)[0] for rows in train]
    return signatures, train, test


def retrieval_accuracy(signatures, test) -> float:
    # Here every task's "model" is the identity: each signature scores the same rows.
    rows = torch.cat(test)
    truth = torch.cat([torch.full((len(t),), i) for i, t in enumerate(test)])
    scores = torch.stack([signature.log_likelihood(rows) for signature in signatures])
    return (scores.argmax(0) == truth).float().mean().item()


def delta(signatures, train) -> float:
    """δ over every ordered pair of different tasks, from each task's clusters under its own signature."""
    values = []
    for a, rows in enumerate(train):
        clusters = signatures[a].assign(rows)
        others = [RawComponents.of(other) for b, other in enumerate(signatures) if b != a]
        for cluster in clusters.unique():
            members = rows[clusters == cluster]
            values.append(float(separation_factors([members] * len(others), others).min()))
    return min(values)


def test_mixture_log_likelihood_is_the_regularised_gaussian_mixture():
    signatures, train, _ = fitted_tasks(spacing=6.0)
    signature = signatures[0]
    assert 1 <= signature.num_components <= 5
    rows = train[0][:7]
    regularised = signature.covariances.double() + signature.epsilon * torch.eye(DIM, dtype=torch.float64)
    gaussians = MultivariateNormal(signature.means.double(), covariance_matrix=regularised)
    per_component = gaussians.log_prob(rows.double().unsqueeze(1))
    expected = torch.logsumexp(per_component + signature.weights.double().log(), dim=1)
    torch.testing.assert_close(signature.log_likelihood(rows).double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        signature.best_component_log_density(rows).double(), per_component.max(1).values, rtol=1e-5, atol=1e-4
    )
    difference = rows.double().unsqueeze(1) - signature.means.double()
    mahalanobis = torch.einsum("nkd,kde,nke->nk", difference, torch.linalg.inv(regularised), difference)
    torch.testing.assert_close(signature.squared_mahalanobis(rows).double(), mahalanobis, rtol=1e-4, atol=1e-4)


def test_pruning_keeps_the_components_that_own_images_and_restores_bit_identically():
    # Two tight clusters far apart: the Dirichlet process leaves most of 8 components without images.
    generator = torch.Generator().manual_seed(1)
    centres = 10 * torch.randn(2, DIM, generator=generator)
    rows = centres[torch.randint(0, 2, (200,), generator=generator)] + 0.01 * torch.randn(200, DIM, generator=generator)
    options = {"max_iter": 500, "seed": 0, "threads": 1, "statistics": "mixture"}
    pruned, fit = GaussianMixtureSignature.fit(rows, 8, 1e-3, **options)
    full, _ = GaussianMixtureSignature.fit(rows, 8, 1e-3, prune=False, **options)
    assert 2 <= fit.components == pruned.num_components < full.num_components == 8
    kept = [int(torch.nonzero((full.means == mean).all(1))) for mean in pruned.means]
    assert torch.equal(pruned.weights, full.weights[kept]) and torch.equal(pruned.covariances, full.covariances[kept])
    copy = GaussianMixtureSignature(pruned.num_components, DIM)
    copy.load_state_dict(pruned.state_dict())
    assert set(pruned.state_dict()) == {"weights", "means", "covariances"}
    assert torch.equal(copy.log_likelihood(rows), pruned.log_likelihood(rows))


def test_diagonal_covariances_score_like_full_diagonal_ones():
    generator = torch.Generator().manual_seed(2)
    rows = task_features(torch.zeros(DIM), 120, generator)
    diagonal, _ = GaussianMixtureSignature.fit(rows, 3, 0.1, covariance_type="diag", seed=0, threads=1)
    full = GaussianMixtureSignature(diagonal.num_components, DIM)
    full.set_parameters(diagonal.weights, diagonal.means, torch.diag_embed(diagonal.covariances))
    torch.testing.assert_close(diagonal.log_likelihood(rows), full.log_likelihood(rows), rtol=1e-5, atol=1e-4)


def test_retrieval_is_near_perfect_on_separated_tasks_and_delta_tracks_overlap():
    # Two components for the two clusters of each task: every component holds enough rows for a regular raw
    # covariance, which δ inverts unregularised (as theories.py).
    separated = fitted_tasks(spacing=8.0, components=2)
    overlapping = fitted_tasks(spacing=1.0, components=2)
    assert retrieval_accuracy(separated[0], separated[2]) >= 0.99
    assert retrieval_accuracy(overlapping[0], overlapping[2]) < 0.9
    delta_separated, delta_overlapping = delta(*separated[:2]), delta(*overlapping[:2])
    # Separated clusters sit many times their own spread from other tasks' components; overlapping ones do not.
    assert delta_separated > 2 > delta_overlapping


def test_collapsed_features_fail_the_run_with_one_clear_line():
    rows = torch.randn(3, DIM).repeat_interleave(20, 0)  # three points, no spread
    with pytest.raises(RunFailedError, match="n_components or raise method.params.gmm_reg_covar") as failure:
        GaussianMixtureSignature.fit(rows, 8, 0.1, seed=0, threads=1)
    assert "\n" not in str(failure.value)


def test_empirical_components_are_the_assigned_rows_mean_and_covariance_scored_by_the_best_one():
    generator = torch.Generator().manual_seed(3)
    rows = torch.cat([torch.randn(60, DIM, generator=generator), 6 + 0.5 * torch.randn(40, DIM, generator=generator)])
    signature, fit = GaussianMixtureSignature.fit(rows, 4, 0.1, seed=0, threads=1)
    assert len(fit.clusters) == 100 and signature.num_components == fit.components == len(fit.clusters.unique())
    for component in range(signature.num_components):
        members = rows[fit.clusters == component].double().numpy()
        torch.testing.assert_close(signature.means[component].double(), torch.from_numpy(members.mean(0)))
        expected = np.cov(members, rowvar=False) if len(members) > 1 else np.zeros((DIM, DIM))
        torch.testing.assert_close(signature.covariances[component].double(), torch.from_numpy(expected))
        assert signature.weights[component].item() == pytest.approx(len(members) / 100)
    regularised = signature.covariances.double() + 1e-4 * torch.eye(DIM, dtype=torch.float64)
    gaussians = MultivariateNormal(signature.means.double(), covariance_matrix=regularised)
    probes = torch.randn(9, DIM, generator=generator) * 3
    best = gaussians.log_prob(probes.double().unsqueeze(1)).max(1).values
    torch.testing.assert_close(signature.best_component_log_density(probes).double(), best, rtol=1e-5, atol=1e-3)


def test_retrieval_bound_terms_against_hand_computation():
    # d = 2; the cluster seen by two other tasks, one component each, with raw (unregularised) covariances.
    views = [torch.tensor([[4.0, 1.0], [6.0, 3.0], [5.0, 2.0]]), torch.tensor([[1.0, 0.0], [1.0, 2.0]])]
    components = []
    for mean, covariance in (([0.0, 0.0], [[2.0, 0.0], [0.0, 0.5]]), ([1.0, -1.0], [[1.0, 0.5], [0.5, 1.0]])):
        signature = GaussianMixtureSignature(1, 2)
        signature.set_parameters(torch.ones(1), torch.tensor([mean]), torch.tensor([covariance]))
        components.append(RawComponents.of(signature))
    own_log_det = math.log(0.3)
    bound = retrieval_bound(views, components, own_log_det, num_tasks=3, truncations=[2, 1, 1], epsilon=0.01)

    def theories_delta(rows, mean, covariance):
        # theories.py: mean over the n x n matrix (x_a - μ)ᵀ Σ⁻¹ (x_b - μ), divided by d, minus 1.
        inverse = np.linalg.inv(np.array(covariance))
        diff = np.array(rows) - np.array(mean)
        return float(np.mean(diff @ inverse @ diff.T)) / 2 - 1

    deltas = [
        theories_delta([[4, 1], [6, 3], [5, 2]], [0, 0], [[2, 0], [0, 0.5]]),  # centroid (5, 2): (12.5 + 8) / 2 - 1
        theories_delta([[1, 0], [1, 2]], [1, -1], [[1, 0.5], [0.5, 1]]),
    ]
    assert deltas[0] == pytest.approx(9.25)
    assert bound.delta == pytest.approx(min(deltas), rel=1e-12)
    kappa = min(math.log(1.0), math.log(0.75)) - math.log(0.3)
    assert bound.kappa == pytest.approx(kappa, rel=1e-12)
    sigma_squared = max(1.0, 2.0)  # per-dimension unbiased variances: (1, 1) and (0, 2)
    assert bound.sigma_squared == pytest.approx(sigma_squared)
    d, count = 2, (3 - 1) * 4 + 1
    m = 3 * d * sigma_squared - kappa
    first = 0.25 * (m + math.sqrt(m * m - 24 * d * sigma_squared * kappa)) - kappa
    second = math.log((count / 0.01) * (math.sqrt(1 + 4 * d / math.log(count / 0.01)) + 1))
    assert bound.threshold == pytest.approx(2 / d * max(first, second), rel=1e-12)
    assert bound.satisfied == (bound.delta > bound.threshold)
    record = bound.as_record()
    assert record["delta"] == bound.delta and record["satisfied"] is bound.satisfied


def test_retrieval_bound_without_other_tasks_or_with_a_negative_discriminant_is_nan():
    alone = retrieval_bound([], [], 0.0, 2, [1, 1]).as_record()
    assert alone.pop("satisfied") is False and all(value is None for value in alone.values())
    signature = GaussianMixtureSignature(1, 2)
    signature.set_parameters(torch.ones(1), torch.zeros(1, 2), torch.eye(2).unsqueeze(0))
    # σ² = 1 (d = 2) and κ = 0 - (-6) = 6 = 3dσ²: M = 0 and M² - 24dσ²κ < 0; theories.py's max(NaN, x) is NaN.
    view = torch.tensor([[0.0, 0.0], [0.0, math.sqrt(2.0)]])
    bound = retrieval_bound([view], [RawComponents.of(signature)], -6.0, 2, [1, 1])
    assert bound.kappa == pytest.approx(6.0) and bound.sigma_squared == pytest.approx(1.0)
    assert math.isnan(bound.threshold) and not bound.satisfied and bound.as_record()["threshold"] is None
