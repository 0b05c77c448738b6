"""DP-GMM task signatures: scoring against torch's Gaussians, retrieval and δ on synthetic task features."""

import pytest
import torch
from torch.distributions import MultivariateNormal

from ntkcl.errors import RunFailedError
from ntkcl.models.signatures import GaussianMixtureSignature, cluster_distance_sums, separation_factor

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


def fitted_tasks(spacing: float, seed: int = 0):
    """Three tasks whose centres are `spacing` apart; signatures from 200 training rows, 100 held-out rows each."""
    generator = torch.Generator().manual_seed(seed)
    centres = [torch.zeros(DIM), torch.zeros(DIM), torch.zeros(DIM)]
    centres[1][1], centres[2][2] = spacing, spacing
    train = [task_features(centre, 200, generator) for centre in centres]
    test = [task_features(centre, 100, generator) for centre in centres]
    signatures = [GaussianMixtureSignature.fit(rows, 5, 0.1, seed=seed, threads=1)[0] for rows in train]
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
        for b, other in enumerate(signatures):
            if a != b:
                sums, counts = cluster_distance_sums(
                    other.squared_mahalanobis(rows), clusters, signatures[a].num_components
                )
                values.append(separation_factor(sums, counts, DIM))
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
    pruned, fit = GaussianMixtureSignature.fit(rows, 8, 1e-3, max_iter=500, seed=0, threads=1)
    full, _ = GaussianMixtureSignature.fit(rows, 8, 1e-3, max_iter=500, seed=0, prune=False, threads=1)
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
    separated = fitted_tasks(spacing=8.0)
    overlapping = fitted_tasks(spacing=1.0)
    assert retrieval_accuracy(separated[0], separated[2]) >= 0.99
    assert retrieval_accuracy(overlapping[0], overlapping[2]) < 0.9
    delta_separated, delta_overlapping = delta(*separated[:2]), delta(*overlapping[:2])
    # Separated clusters sit many times their own spread from other tasks' components; overlapping ones do not.
    assert delta_separated > 2 > delta_overlapping
    own = separated[0][0]
    clusters = own.assign(separated[1][0])
    sums, counts = cluster_distance_sums(own.squared_mahalanobis(separated[1][0]), clusters, own.num_components)
    # Gaussian rows sit at about d squared-Mahalanobis units from their own component: a factor near 0.
    assert abs(float(sums.diagonal().sum() / counts.sum() / DIM - 1)) < 0.3


def test_collapsed_features_fail_the_run_with_one_clear_line():
    rows = torch.randn(3, DIM).repeat_interleave(20, 0)  # three points, no spread
    with pytest.raises(RunFailedError, match="n_components or raise method.params.gmm_reg_covar") as failure:
        GaussianMixtureSignature.fit(rows, 8, 0.1, seed=0, threads=1)
    assert "\n" not in str(failure.value)
