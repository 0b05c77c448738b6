"""`ntkcl diagnose`: the empirical NTK against an explicit Jacobian, principal angles against SciPy, the
PROTEUS retrieval bound (`ntkcl.models.signatures.retrieval_bound`) on separated and overlapping Gaussian
clusters against a hand computation, and the command on finished digits runs."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import scipy.linalg
import timm
import torch
from torch import nn
from torch.func import functional_call

from ntkcl.diagnostics import kernels
from ntkcl.models.signatures import RawComponents, retrieval_bound

TRAINABLE = ("blocks.1.attn.proj.weight", "blocks.1.attn.proj.bias", "head.weight", "head.bias")


class TinyViTMethod(nn.Module):
    """A timm ViT (32-pixel images, width 64, 2 blocks, 5 classes) whose last attention projection and head
    (4,485 parameters) are the tuned tensors; `predict` is its forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            depth=2,
            embed_dim=64,
            num_heads=2,
            num_classes=5,
        )
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name in TRAINABLE)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _explicit_ntk(method: TinyViTMethod, images: torch.Tensor, projection=None) -> torch.Tensor:
    names = [f"model.{name}" for name in TRAINABLE]
    owned = dict(method.named_parameters())

    def logits(*values):
        out = functional_call(method.model, dict(zip(TRAINABLE, values)), (images,))
        return out if projection is None else out @ projection.float()

    jacobians = torch.autograd.functional.jacobian(logits, tuple(owned[name].detach() for name in names))
    flat = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jacobians], dim=2)
    return torch.einsum("acp,bep->acbe", flat, flat)


@pytest.mark.parametrize("outputs", [None, 3])
def test_empirical_ntk_matches_the_explicit_jacobian_and_is_symmetric_psd(outputs):
    method = TinyViTMethod().eval()
    names = [f"model.{name}" for name in TRAINABLE]
    assert 2000 < sum(dict(method.named_parameters())[name].numel() for name in names) < 10000
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    projection = None if outputs is None else torch.randn(5, outputs, dtype=torch.float64) / math.sqrt(outputs)
    features = kernels.tangent_features(method, names, images, projection, batch_size=4)
    ntk = kernels.empirical_ntk(features)
    expected = _explicit_ntk(method, images, projection)
    torch.testing.assert_close(ntk, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    square = ntk.reshape(6 * ntk.shape[1], -1).double()
    torch.testing.assert_close(square, square.T)
    eigenvalues = torch.linalg.eigvalsh(square)
    assert float(eigenvalues.min()) >= -1e-6 * float(eigenvalues.max())
    trace = kernels.trace_kernel(features)
    torch.testing.assert_close(
        trace, torch.einsum("acbc->ab", expected.double()), rtol=1e-5, atol=1e-5 * float(trace.max())
    )


def test_kernel_summaries_on_hand_made_kernels():
    labels = torch.tensor([0, 0, 1, 1])
    assert kernels.centred_alignment(kernels.label_kernel(labels), kernels.label_kernel(labels)) == pytest.approx(1)
    assert kernels.effective_rank(torch.eye(4)) == pytest.approx(4)
    assert kernels.effective_rank(torch.ones(4, 4)) == pytest.approx(1)
    block_diagonal = torch.block_diag(torch.ones(2, 2), 2 * torch.ones(2, 2)).double()
    norms = kernels.block_norms(block_diagonal, [torch.arange(2), torch.arange(2, 4)])
    assert norms == [[1.0, 0.0], [0.0, 1.0]]


def _grams(a: np.ndarray, b: np.ndarray):
    a, b = torch.from_numpy(a), torch.from_numpy(b)
    return a @ a.T, a @ b.T, b @ b.T


def test_principal_angles_match_scipy():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((12, 6)))[0]
    # Rows spanning orthogonal subspaces, the same subspace, and two generic ones.
    first = rng.standard_normal((5, 3)) @ basis[:, :3].T
    orthogonal = rng.standard_normal((4, 3)) @ basis[:, 3:].T
    same = rng.standard_normal((7, 3)) @ basis[:, :3].T
    generic_a, generic_b = rng.standard_normal((4, 12)), rng.standard_normal((3, 12))
    angles, k_a, k_b = kernels.principal_angles(*_grams(first, orthogonal), energy=1.0)
    assert (k_a, k_b) == (3, 3)
    np.testing.assert_allclose(np.rad2deg(angles.numpy()), 90.0, atol=1e-6)
    angles, _, _ = kernels.principal_angles(*_grams(first, same), energy=1.0)
    np.testing.assert_allclose(np.rad2deg(angles.numpy()), 0.0, atol=1e-4)
    for a, b in ((first, orthogonal), (first, same), (generic_a, generic_b)):
        angles, _, _ = kernels.principal_angles(*_grams(a, b), energy=1.0)
        expected = np.sort(scipy.linalg.subspace_angles(a.T, b.T))
        np.testing.assert_allclose(angles.numpy(), expected, atol=1e-6)


def test_energy_keeps_the_fewest_directions_holding_the_share():
    gram = torch.diag(torch.tensor([6.0, 3.0, 1.0], dtype=torch.float64))
    assert kernels.energy_basis(gram, 0.9)[1] == 2
    assert kernels.energy_basis(gram, 0.95)[1] == 3
    assert kernels.energy_basis(gram, 0.5)[1] == 1


def _hand_bound(cluster: np.ndarray, mean: np.ndarray, cov: np.ndarray, own_cov: np.ndarray, taus: list[int]):
    """The precursor's loop written out for one other task with one component."""
    d = cluster.shape[1]
    diffs = cluster - mean
    delta = np.mean(diffs @ np.linalg.inv(cov) @ diffs.T) / d - 1
    kappa = np.linalg.slogdet(cov)[1] - np.linalg.slogdet(own_cov)[1]
    sigma2 = np.max(np.var(cluster, axis=0, ddof=1))
    n = (len(taus) - 1) * sum(taus) + 1
    second = math.log((n / 0.01) * (math.sqrt(1 + 4 * d / math.log(n / 0.01)) + 1))
    m = 3 * d * sigma2 - kappa
    first = 0.25 * (m + math.sqrt(m * m - 24 * d * sigma2 * kappa)) - kappa
    return delta, kappa, sigma2, 2 / d * max(first, second)


def _components(mean: np.ndarray, cov: np.ndarray) -> RawComponents:
    cov = torch.from_numpy(cov)[None]
    return RawComponents(torch.from_numpy(mean)[None], torch.linalg.inv(cov), torch.logdet(cov))


@pytest.mark.parametrize(("distance", "satisfied"), [(12.0, True), (0.5, False)])
def test_retrieval_bound_matches_a_hand_computation(distance, satisfied):
    rng = np.random.default_rng(3)
    d, n = 4, 200
    # The other task's component is tighter than the cluster (κ < 0), where the threshold is a real number.
    own = rng.standard_normal((n, d)) * 1.1
    other = rng.standard_normal((n, d)) * 0.8 + distance
    # The cluster of task 0 as task 1's model embeds it (the identity here), against task 1's one component.
    mean, cov = other.mean(0), np.cov(other, rowvar=False)
    own_cov = np.cov(own, rowvar=False)
    own_log_det = float(np.linalg.slogdet(own_cov)[1])
    bound = retrieval_bound([torch.from_numpy(own)], [_components(mean, cov)], own_log_det, 2, [1, 1])
    delta, kappa, sigma2, threshold = _hand_bound(own, mean, cov, own_cov, [1, 1])
    assert bound.delta == pytest.approx(delta, rel=1e-9)
    assert bound.kappa == pytest.approx(kappa, rel=1e-9)
    assert bound.sigma_squared == pytest.approx(sigma2, rel=1e-9)
    assert bound.threshold == pytest.approx(threshold, rel=1e-9)
    assert bound.satisfied is satisfied and bool(delta > threshold) is satisfied


FAST = ["--probe", "2", "--outputs", "2", "--batch-size", "4", "-q", "--json"]


@pytest.mark.parametrize("method", ["ntk-cl", "cl-lora", "proteus"])
def test_diagnose_writes_the_json_and_the_report_section(method, run_of, cli, tmp_path):
    source = run_of(method)
    run = tmp_path / source.name
    shutil.copytree(source, run)
    result = cli("diagnose", run, *FAST)
    assert result.code == 0, result.err
    document = result.json()
    assert document.pop("ok") is True
    assert json.loads((run / "diagnostics.json").read_text()) == document
    assert document["method"] == method and document["probe"]["per_task"] == 2
    assert [len(chosen["test"]) for chosen in document["probe"]["indices"]] == [2, 2]
    assert [step["after_task"] for step in document["ntk"]] == [0, 1]
    last = document["ntk"][-1]
    assert last["block_norms"][0][0] == pytest.approx(1) and 0 <= last["block_norms"][0][1] <= 1 + 1e-9
    assert last["drift_from_previous"][0] is not None and last["parameters"] > 0
    assert len(document["feature_orthogonality"]["mean_angle_deg"]) == 2
    assert all(gap["after_last_task"] is not None for gap in document["generalisation_gap"])
    assert ("retrieval" in document) is (method == "proteus")
    if method == "proteus":
        clusters = document["retrieval"]["clusters"]
        assert clusters and all(cluster["satisfied"] in (True, False) for cluster in clusters)
    report = cli("report", run, "--out", tmp_path / "report", "--json")
    assert report.code == 0, report.err
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>Diagnostics</h2>" in page and "mean principal angle" in page
    assert any("ntk_blocks-" in path for path in report.json()["files"])
    if method == "proteus":
        assert "δ &gt; threshold" in page or "δ > threshold" in page


def test_runs_without_two_checkpoints_exit_2(run_of, cli, tmp_path):
    source = run_of("cl-lora")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "run.json"):
        shutil.copy(source / name, bare / name)
    result = cli("diagnose", bare)
    assert result.code == 2 and "no task checkpoint" in result.err and "Traceback" not in result.err
    (bare / "checkpoints").mkdir()
    shutil.copytree(source / "checkpoints" / "task-00", bare / "checkpoints" / "task-00")
    result = cli("diagnose", bare, "--json")
    assert result.code == 2 and "one finished task" in result.json()["error"]
    result = cli("diagnose", source, "--tasks", "0,7")
    assert result.code == 2 and "--tasks" in result.err
    assert cli("diagnose", tmp_path / "missing").code == 2
