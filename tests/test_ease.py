"""EASE's pieces on a tiny random ViT against hand computation: the semantic-guided prototype complement, the
reweighted logits, the batched subspace features, and what the gradients reach."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ntkcl.methods.base import TaskInfo
from ntkcl.methods.ease import EASE, EASEParams, semantic_complement, subspace_weights
from ntkcl.models.adapters import adapter_block_forward
from ntkcl.models.backbone import create_backbone
from tests.conftest import TINY_BACKBONE

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = (TaskInfo(0, 3, 0, 2), TaskInfo(1, 3, 2, 3), TaskInfo(2, 3, 5, 2))


@pytest.fixture(scope="module")
def backbone():
    settings = {key: value for key, value in TINY_BACKBONE.items() if key != "name"}
    return create_backbone(TINY_BACKBONE["name"], **settings)


def build(backbone, **options) -> EASE:
    torch.manual_seed(0)
    method = EASE(backbone, EASEParams(bottleneck=8, **options))
    for task in TASKS:
        method.begin_task(task)
    method.eval()
    return method


def test_semantic_complement_by_hand():
    old_own = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    new_own = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    new_target = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    expected = torch.zeros(2, 3)
    for i in range(2):
        cosines = [float(old_own[i] @ new_own[j] / (old_own[i].norm() * new_own[j].norm())) for j in range(3)]
        weights = torch.tensor(cosines).exp() / torch.tensor(cosines).exp().sum()
        for j in range(3):
            expected[i] += weights[j] * new_target[j]
    # old class 0: cosines 1, 1/√2, 0; old class 1: 0, 1/√2, -1
    torch.testing.assert_close(semantic_complement(old_own, new_own, new_target), expected)


@pytest.mark.parametrize("complement", ["all_later", "latest"])
def test_complement_fills_old_classes_in_newer_subspaces(backbone, complement):
    method = build(backbone, complement=complement)
    real = torch.randn(7, 3, backbone.feature_dim, generator=torch.Generator().manual_seed(0))
    # real prototypes: each task's classes in the subspaces of its own and earlier adapters
    known = torch.zeros(7, 3, dtype=torch.bool)
    known[0:2, 0] = known[2:5, :2] = known[5:7, :] = True
    # what task 1 left in subspace 1 for task 0's classes, which "latest" keeps and "all_later" recomputes
    earlier = torch.randn(2, backbone.feature_dim, generator=torch.Generator().manual_seed(1))
    method.prototypes.copy_(real * known.unsqueeze(-1))
    method.prototypes[0:2, 1] = earlier
    method.complement(TASKS[2])
    result = method.prototypes
    torch.testing.assert_close(result[known], real[known])
    # subspace 2 (the newest): old classes complemented from the classes of task 2, measured in their own subspace
    torch.testing.assert_close(result[0:2, 2], semantic_complement(real[0:2, 0], real[5:7, 0], real[5:7, 2]))
    torch.testing.assert_close(result[2:5, 2], semantic_complement(real[2:5, 1], real[5:7, 1], real[5:7, 2]))
    if complement == "all_later":
        # subspace 1 for task 0: every class that has a real prototype there (tasks 1 and 2)
        torch.testing.assert_close(result[0:2, 1], semantic_complement(real[0:2, 0], real[2:7, 0], real[2:7, 1]))
    else:
        torch.testing.assert_close(result[0:2, 1], earlier)


def test_reweighted_logits_by_hand(backbone):
    method = build(backbone, alpha=0.3, beta=0.7, use_init_ptm=True)
    assert method.num_subspaces == 4
    weights = subspace_weights([2, 3, 2], use_init_ptm=True, alpha=0.3, beta=0.7)
    own = {0: 1, 1: 2, 2: 3}
    for row, task in enumerate([0, 0, 1, 1, 1, 2, 2]):
        expected = [0.7] + [1.0 if s == own[task] else 0.3 / 2 for s in (1, 2, 3)]
        torch.testing.assert_close(weights[row], torch.tensor(expected))
    method.prototypes.copy_(torch.randn(7, 4, backbone.feature_dim, generator=torch.Generator().manual_seed(2)))
    method.seen_classes = 7
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = method.subspace_features(images, 3)
    logits = method.predict(images)
    for b in range(3):
        for c in range(7):
            cosines = [F.cosine_similarity(features[b, s], method.prototypes[c, s], dim=0) for s in range(4)]
            expected = sum(float(weights[c, s]) * float(cosines[s]) for s in range(4))
            assert logits[b, c].item() == pytest.approx(expected, abs=1e-5)
    # without reweighting: one cosine between the concatenated feature and the concatenated prototype
    method.params = method.params.model_copy(update={"reweight": False})
    plain = F.cosine_similarity(features.flatten(1)[:, None], method.prototypes.flatten(1)[None], dim=-1)
    torch.testing.assert_close(method.predict(images), plain, atol=1e-5, rtol=0)


def test_batched_subspace_features_equal_one_pass_per_subspace(backbone):
    method = build(backbone, use_init_ptm=True, inference_rows=5)  # two images: two subspaces per pass
    for adapters in method.adapters:  # non-zero adapters, so the subspaces differ
        for adapter in adapters:
            torch.nn.init.normal_(adapter.up.weight, std=0.5)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batched = method.subspace_features(images, 3)
        separate = [backbone(images)] + [backbone(images, adapter_block_forward(a)) for a in method.adapters]
    assert batched.shape == (2, 4, backbone.feature_dim)
    torch.testing.assert_close(batched, torch.stack(separate, dim=1), atol=1e-5, rtol=1e-5)
    assert (batched[:, 1] - batched[:, 2]).abs().max() > 1e-3


def test_each_task_trains_only_its_adapters_and_proxy_head(backbone):
    torch.manual_seed(0)
    method = EASE(backbone, EASEParams(bottleneck=8))
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for task in TASKS[:2]:
        method.begin_task(task)
        method.train()
        method.zero_grad(set_to_none=True)
        labels = task.known_classes + torch.arange(6) % task.num_new_classes
        method.training_step(images, labels).loss.backward()
        reached = {id(p) for p in method.parameters() if p.grad is not None}
        trained = [*method.adapters[task.index].parameters(), *method.proxy_head.parameters()]
        assert reached == {id(p) for p in trained}
        assert {id(p) for p in method.parameters() if p.requires_grad} == reached
        # the up-projections start at zero, so only they and the head move at the first step
        assert all(adapter.up.weight.grad.abs().max() > 0 for adapter in method.adapters[task.index])
        assert "proxy_head.weight" not in method.learned_state()
