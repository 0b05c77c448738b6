"""KeepLoRA's pieces on a tiny random CLIP against direct computation: gradient estimate, residual-gradient
initialisation, function-preserving offset, updates in span(A), merge, feature statistics and bases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ntkcl.methods.base import TaskInfo
from ntkcl.methods.keeplora import (
    FeatureStatistics,
    KeepLoRA,
    KeepLoRAParams,
    KeepLoRAPlus,
    KeepLoRAPlusParams,
    normalized_class_means,
)
from ntkcl.models.backbone import create_backbone
from ntkcl.models.heads import clip_logits
from ntkcl.models.subspace import project_off, weight_basis
from tests.conftest import TINY_CLIP, FakeData

pytestmark = pytest.mark.usefixtures("one_thread")


def make_task(index: int, known: int, size: int) -> TaskInfo:
    names = tuple(f"thing {known + k}" for k in range(size))
    return TaskInfo(index, 2, known, size, class_names=names, templates=("a photo of a {}.", "a {}."))


@pytest.fixture(scope="module")
def clip():
    settings = {key: value for key, value in TINY_CLIP.items() if key != "name"}
    return create_backbone(TINY_CLIP["name"], **settings)


def task_data(task, count: int = 10, seed: int = 0) -> FakeData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, 32, 32, generator=generator)
    labels = task.known_classes + torch.arange(count) % task.num_new_classes
    return FakeData(images, labels)


def build(clip, cls=KeepLoRA, params=KeepLoRAParams, **options):
    torch.manual_seed(0)
    method = cls(clip, params(rank=4, feature_batch_size=4, **options))
    method.eval()
    return method


def outputs(method, task, images):
    """Image features and the task's class embeddings: everything CLIP's logits are made of."""
    with torch.no_grad():
        return method.backbone(images), method.class_embeddings(task.classes)


def test_gradient_estimate_equals_the_full_batch_gradient(clip):
    method = build(clip)
    task = make_task(0, 0, 3)
    method.begin_task(task)
    data = task_data(task)
    estimated = method.estimate_gradients(task, data)
    weights = {key: method._weights[key] for key in method.weight_deltas}
    for weight in weights.values():
        weight.requires_grad_(True)
    logits = clip_logits(clip(data.images), method.class_embeddings(task.classes), clip.logit_scale)
    F.cross_entropy(logits, data.labels).backward()
    for key, weight in weights.items():
        torch.testing.assert_close(estimated[key], weight.grad, atol=1e-6, rtol=1e-4)
        weight.requires_grad_(False)
        weight.grad = None


def test_initialisation_is_the_residual_gradient_svd_and_preserves_the_function(clip):
    method = build(clip)
    task = make_task(0, 0, 3)
    method.begin_task(task)
    data = task_data(task)
    before = outputs(method, task, data.images)
    gradients = method.estimate_gradients(task, data)
    method.prepare_task(task, data)
    assert method.protected
    for target in method.targets:
        lora = next(
            lora
            for lora, offset in zip(
                method.weight_deltas[target.weight_key].loras, method.weight_deltas[target.weight_key].row_offsets
            )
            if offset == target.rows.start
        )
        basis = method.bases[target.key].value
        threshold = 0.85 if target.tower == "visual" else 0.2
        torch.testing.assert_close(basis, weight_basis(method.pretrained_weight(target), threshold, "input"))
        assert not lora.down.requires_grad and lora.up.requires_grad
        assert (lora.down @ basis).abs().max() < 1e-5  # A ⊥ P
        residual = project_off(gradients[target.weight_key][target.rows].T, basis)
        left, singular, right = torch.linalg.svd(residual)
        best = (left[:, :4] * singular[:4]) @ right[:4]  # the rank-4 truncation of Ĝ (in x out)
        torch.testing.assert_close((lora.up @ lora.down).T, best, atol=1e-4 * singular[0], rtol=0)
    after = outputs(method, task, data.images)
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)


def test_updates_stay_in_span_of_a_orthogonal_to_the_protected_basis_and_merge_exactly(clip):
    method = build(clip)
    task = make_task(0, 0, 3)
    method.begin_task(task)
    data = task_data(task)
    method.prepare_task(task, data)
    effective = {key: method.weight_deltas[key](method._weights[key]).detach() for key in method.weight_deltas}
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert trainable and all(p.shape[1] == 4 for p in trainable)  # only the up-projections (B) train
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    method.train()
    for images, labels in data.batches():
        optimizer.zero_grad()
        method.training_step(images, labels).loss.backward()
        optimizer.step()
    method.eval()
    moved = False
    for target in method.targets:
        key = target.weight_key
        update = (method.weight_deltas[key](method._weights[key]) - effective[key])[target.rows].detach()
        lora = method.weight_deltas[key].loras[[t.key for t in method.targets if t.weight_key == key].index(target.key)]
        down = lora.down.detach()
        assert (update @ method.bases[target.key].value).abs().max() < 1e-5
        torch.testing.assert_close(update @ down.T @ down, update, atol=1e-6, rtol=1e-4)  # rows in span(A)
        moved = moved or update.abs().max() > 0
    assert moved
    adapted = outputs(method, task, data.images)
    method.merge()
    assert all(len(delta.loras) == 0 for delta in method.weight_deltas.values())
    merged = outputs(method, task, data.images)
    for old, new in zip(adapted, merged):
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)


def test_feature_statistics_mean_and_covariance_by_hand():
    first, second = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    data = FakeData(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    mean, covariance = FeatureStatistics("mean"), FeatureStatistics("covariance")
    for statistics in (mean, covariance):
        statistics.add(0, "input", first)
        statistics.add(0, "input", second)
    average = ((first + second) / 2).reshape(6, 5).double()
    torch.testing.assert_close(mean.gram_of(0, "input", data), average.T @ average)
    rows = torch.cat([first.reshape(6, 5), second.reshape(6, 5)]).double()
    torch.testing.assert_close(covariance.gram_of(0, "input", data), rows.T @ rows / 12)


@pytest.mark.parametrize("options", [{}, {"weight_space": "output", "feature_matrix": "covariance"}])
def test_end_task_merges_and_grows_orthonormal_bases(clip, options):
    method = build(clip, **options)
    task = make_task(0, 0, 3)
    method.begin_task(task)
    data = task_data(task)
    method.prepare_task(task, data)
    if options:
        target = method.targets[0]
        torch.testing.assert_close(
            method.bases[target.key].value, weight_basis(method.pretrained_weight(target), 0.85, "output")
        )
    widths = {key: basis.width for key, basis in method.bases.items()}
    method.end_task(task, data)
    assert method.seen_classes == 3
    for key, basis in method.bases.items():
        assert widths[key] < basis.width <= 64
        torch.testing.assert_close(basis.value.T @ basis.value, torch.eye(basis.width), atol=1e-4, rtol=0)
    state = method.learned_state()
    assert {key.split(".")[0] for key in state} == {"weight_deltas", "bases"}
    rebuilt = build(clip, **options)
    rebuilt.load_learned_state(state, [task])
    images = data.images[:3]
    torch.testing.assert_close(rebuilt.predict(images), method.predict(images), atol=0, rtol=0)


def test_keeplora_plus_classifier_starts_at_normalised_class_means_and_adds_to_zero_shot_logits(clip):
    method = build(clip, KeepLoRAPlus, KeepLoRAPlusParams)
    task = make_task(0, 0, 3)
    method.begin_task(task)
    data = task_data(task, count=12)
    method.prepare_task(task, data)
    head = method.classifiers["0"]
    with torch.no_grad():
        features = clip(data.images)
    means = torch.stack([F.normalize(features[data.labels == c], dim=-1).mean(0) for c in range(3)])
    torch.testing.assert_close(head.weight, F.normalize(means, dim=-1), atol=1e-5, rtol=1e-4)
    assert head.sigma.item() == 30.0 and not head.sigma.requires_grad and head.weight.requires_grad
    method.end_task(task, data)
    images = data.images[:4]
    with torch.no_grad():
        features = clip(images)
        expected = (
            clip_logits(features, method.class_embeddings(range(3)), clip.logit_scale)
            + 30 * F.normalize(features, dim=-1) @ F.normalize(head.weight, dim=-1).T
        )
    torch.testing.assert_close(method.predict(images), expected, atol=1e-4, rtol=1e-4)
    untrained = make_task(1, 3, 2)
    torch.testing.assert_close(
        method.predict_task(images, untrained),
        clip_logits(features, method.class_embeddings(untrained.classes), clip.logit_scale),
        atol=1e-4,
        rtol=1e-4,
    )


def test_keeplora_plus_initial_classifier_from_constructed_features():
    # Class 0 holds a long and a short vector: the mean of the normalised features points at 45 degrees,
    # the mean of the raw ones almost along the long vector.
    features = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.0, -3.0], [-1.0, 0.0]])
    labels = torch.tensor([5, 5, 6, 6])
    weight = normalized_class_means(FakeData(features, labels, batch_size=3), lambda rows: rows, 5, 2)
    half = 0.5**0.5
    torch.testing.assert_close(weight, torch.tensor([[half, half], [-half, -half]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["keeplora", "keeplora-plus"])
@pytest.mark.parametrize("stream", ["mtil-order1", "mtil-order2"])
def test_mtil_presets_select_the_mtil_codes_weight_basis(method, stream):
    from ntkcl.methods.registry import get_method, validate_params
    from ntkcl.presets import method_preset

    params = validate_params(get_method(method), method_preset(method, stream).get("method", {}).get("params", {}))
    assert params.weight_space == "output" and params.feature_matrix == "mean"
    assert validate_params(get_method(method), {}).weight_space == "input"  # the paper's form stays an option
