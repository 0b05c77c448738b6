"""CL-LoRA pieces against hand computation and the reference's sizes (shared/reference/peer-methods.md, section A)."""

import copy
import math

import pytest
import torch

from ntkcl.config import OptimConfig
from ntkcl.engine.optim import TaskOptimization
from ntkcl.engine.training import ShardedBatches, train_step
from ntkcl.errors import BadInputError
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.cl_lora import (
    CLLoRA,
    CLLoRAParams,
    block_weight_orthogonality,
    distillation_loss,
    reassignment_weights,
)
from ntkcl.models.backbone import Backbone, create_backbone
from ntkcl.models.heads import PrototypeClassifier
from ntkcl.models.lora import orthogonal_rows
from ntkcl.models.weights import describe_timm_model
from tests.conftest import TINY_BACKBONE, ListData, finish_first_task

TINY_DEPTH_4 = {**TINY_BACKBONE["model_kwargs"], "depth": 4}


def tiny_method(depth: int = 4, **params) -> CLLoRA:
    backbone = create_backbone(
        TINY_BACKBONE["name"], pretrained=False, model_kwargs={**TINY_DEPTH_4, "depth": depth}, init_seed=0
    )
    return CLLoRA(backbone, CLLoRAParams(rank=4, **params))


def perturb(parameters, generator, std=0.1):
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=std)


def second_task_method(**params) -> CLLoRA:
    """A method in its second task whose shared adapters differ from the teacher (every term is active)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    method = tiny_method(**params)
    method.begin_task(TaskInfo(0, 2, 0, 2))
    perturb([p for p in method.parameters() if p.requires_grad], generator)
    method.seen_classes = 2
    method.begin_task(TaskInfo(1, 2, 2, 2))
    perturb([lora.up for lora in method._shared_loras()], generator)
    perturb([p for p in method.tasks[-1].parameters()], generator)
    return method.train()


def test_trainable_parameters_on_vit_base_at_rank_8_are_the_references():
    """221,202 at the first task of the CIFAR-100 config (issue #1's log): built on the meta device, no weights."""
    model, origin = describe_timm_model("vit_base_patch16_224")
    with torch.device("meta"):
        method = CLLoRA(Backbone(model, origin, "meta"), CLLoRAParams(rank=8))
        method.begin_task(TaskInfo(0, 20, 0, 5))
    assert (method.shared_blocks, method.specific_blocks) == ([0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11])

    def count(parameters):
        return sum(p.numel() for p in parameters if p.requires_grad)

    shared_up = count(method.shared.parameters())
    specific = count(p for name, p in method.tasks[0].named_parameters() if name != "block_weights")
    block_weights = count([method.tasks[0].block_weights])
    assert (shared_up, specific, block_weights) == (73_728, 147_456, 18)
    assert count(method.parameters()) - count(method.proxy_head.parameters()) == 221_202
    assert count(method.proxy_head.parameters()) == 768 * 5 + 1  # cosine proxy head and its sigma


def test_down_projections_start_orthogonal_from_qr_of_uniform_and_ups_at_zero():
    torch.manual_seed(7)
    method = tiny_method()
    torch.manual_seed(7)
    expected = orthogonal_rows(4, method.backbone.embed_dim)
    torch.testing.assert_close(method.shared["q"][0].down, expected, rtol=0, atol=0)
    method.begin_task(TaskInfo(0, 1, 0, 2))
    loras = [*method._shared_loras(), *method.tasks[0].q, *method.tasks[0].v]
    for lora in loras:
        torch.testing.assert_close(lora.down @ lora.down.T, torch.eye(4), atol=1e-5, rtol=0)
        assert torch.count_nonzero(lora.up) == 0 and lora.scale == 1.0
    assert not any(lora.down.requires_grad for lora in method._shared_loras())
    assert all(lora.down.requires_grad for lora in (*method.tasks[0].q, *method.tasks[0].v))
    weights = method.tasks[0].block_weights
    assert weights.shape == (3, 2) and bool(((weights >= 0.5) & (weights < 1.5)).all())


def test_distillation_loss_on_constructed_logits():
    # teacher z_T / 2 = (ln 3, 0): softmax (3/4, 1/4); student (0, 0): log softmax (-ln 2, -ln 2) -> ln 2.
    # second row: teacher uniform, student z_s / 2 = (ln 3, 0) -> -(1/2)(ln 3/4 + ln 1/4) = ln 4 - ln 3 / 2.
    teacher = torch.tensor([[2 * math.log(3), 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [2 * math.log(3), 0.0]])
    expected = (math.log(2) + math.log(4) - math.log(3) / 2) / 2
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_term_is_weighted_without_the_temperature_square():
    method = second_task_method()
    images = torch.rand(4, 3, 32, 32)
    output = method.training_step(images, torch.tensor([2, 3, 2, 3]), "kd")
    assert output.loss.item() == pytest.approx(5.0 * output.logs["kd"].item(), rel=1e-6)


def test_reassignment_weights_are_teacher_row_norms_with_mean_one():
    up = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])  # row norms 5, 0, 1; sum 6; three rows
    torch.testing.assert_close(reassignment_weights(up), torch.tensor([2.5, 0.0, 0.5]))
    torch.testing.assert_close(reassignment_weights(torch.zeros(3, 2)), torch.ones(3))


def test_adjust_gradients_rescales_shared_up_rows_and_clears_what_distillation_does_not_reach():
    method = second_task_method()
    for parameter in method.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.ones_like(parameter)
    method.adjust_gradients("kd")
    for lora, teacher in zip(method._shared_loras(), method._teacher_ups(), strict=True):
        expected = reassignment_weights(teacher.up).unsqueeze(1).expand_as(lora.up)
        torch.testing.assert_close(lora.up.grad, expected)
    assert all(p.grad is not None for p in method.proxy_head.parameters())
    assert all(p.grad is None for p in method.tasks[-1].parameters())
    before = method.shared["q"][0].up.grad.clone()
    method.adjust_gradients("ce")  # the second step is not reweighted
    assert torch.equal(method.shared["q"][0].up.grad, before)


def test_block_weight_orthogonality_by_hand():
    current = torch.zeros(3, 6)
    current[0, 0] = 2.0  # direction e1
    first, second = torch.zeros(3, 6), torch.zeros(3, 6)
    first[0, 0], first[0, 1] = 1.0, 1.0  # cos = 1/sqrt 2
    second[0, 0] = -3.0  # |cos| = 1
    value = block_weight_orthogonality(current, [first, second])
    assert value.item() == pytest.approx((1 / math.sqrt(2) + 1) / 2, rel=1e-6)
    assert block_weight_orthogonality(current, []).item() == 0.0


def test_prototype_logits_use_each_tasks_own_feature():
    classifier = PrototypeClassifier(2)
    classifier.grow(3)
    classifier.set_rows(0, torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # task 0: 2 classes, task 1: 1
    features = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]])  # (T=2, B=1, D=2): f_0 = e1, f_1 = 3 e2
    logits = classifier.per_task(features, [2, 1])
    torch.testing.assert_close(logits, torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)]]))


def test_prediction_is_the_argmax_of_prototype_cosines_over_all_seen_classes():
    method = tiny_method().eval()
    images, labels = finish_first_task(method)
    with torch.no_grad():
        feature = method.task_feature(images, method.tasks[0])
    expected = torch.stack([feature[labels == c].mean(0) for c in (0, 1)])
    torch.testing.assert_close(method.prototypes.prototypes, expected, rtol=1e-5, atol=1e-6)
    normalized = torch.nn.functional.normalize
    torch.testing.assert_close(method.predict(images), normalized(feature, dim=1) @ normalized(expected, dim=1).T)
    stored = method.prototypes.prototypes.clone()
    second = TaskInfo(1, 2, 2, 2)
    method.begin_task(second)
    perturb([lora.up for lora in method._shared_loras()], torch.Generator().manual_seed(0))
    method.end_task(second, ListData([(images[:4], labels[:4] + 2)]))
    assert torch.equal(method.prototypes.prototypes[:2], stored)  # old prototypes are never recomputed
    assert method.predict(images).shape == (6, 4)


def test_gradients_reach_only_what_the_reference_trains():
    method = tiny_method()
    method.begin_task(TaskInfo(0, 2, 0, 2))
    assert method.training_stages() == ("ce",)
    method.training_step(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])).loss.backward()
    assert all(p.grad is None for p in method.backbone.parameters())
    assert all(lora.down.grad is None and lora.up.grad.abs().sum() > 0 for lora in method._shared_loras())
    first = method.tasks[0]
    # up starts at zero, so the first gradient of down is zero, yet it is part of the graph
    assert all(lora.down.grad is not None and lora.up.grad.abs().sum() > 0 for lora in (*first.q, *first.v))
    assert torch.count_nonzero(first.block_weights.grad[1]) == 0  # the k row is unused at the first task
    assert method.proxy_head.weight.grad is not None and method.proxy_head.sigma.grad is not None

    method = second_task_method()
    assert method.training_stages() == ("kd", "ce")
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([2, 3, 2, 3])
    trainable = [p for p in method.parameters() if p.requires_grad]
    old, current = method.tasks[0], method.tasks[1]
    assert not any(p.requires_grad for p in (*old.parameters(), *method.teacher.parameters()))
    method.training_step(images, labels, "kd").loss.backward()
    method.adjust_gradients("kd")
    reached = {id(p) for p in trainable if p.grad is not None}
    expected = {id(lora.up) for lora in method._shared_loras()} | {id(p) for p in method.proxy_head.parameters()}
    assert reached == expected
    method.zero_grad(set_to_none=True)
    method.training_step(images, labels, "ce").loss.backward()
    assert all(p.grad is not None for p in trainable)
    assert torch.count_nonzero(current.block_weights.grad[1]) > 0  # the orthogonality term reaches the k row
    assert all(p.grad is None for p in (*old.parameters(), *method.teacher.parameters()))
    assert all(p.grad is None for p in method.backbone.parameters())


SGD = {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01}


def sgd(method):
    return torch.optim.SGD([p for p in method.parameters() if p.requires_grad], **SGD)


def engine_step(method, images, labels, accumulation_steps=1):
    """One training step of the engine (every stage of the method) on one process."""
    settings = OptimConfig(optimizer="sgd", accumulation_steps=accumulation_steps, **SGD)
    optimization = TaskOptimization.build(method, settings, updates_per_epoch=1, epochs=1)
    parts = ShardedBatches(len(labels), len(labels), 1, 0).micro_batches(0, len(labels), accumulation_steps)
    train_step(method, method, optimization, images, labels, parts, images.device, "fp32")
    return optimization


def gradients(method, loss):
    method.zero_grad(set_to_none=True)
    loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in method.named_parameters()}


@pytest.mark.parametrize(
    ("ce_gradient", "accumulation_steps"), [("before_kd_step", 1), ("before_kd_step", 2), ("after_kd_step", 1)]
)
def test_two_steps_per_batch_apply_the_documented_gradients(ce_gradient, accumulation_steps):
    """First update: the reassigned distillation gradient at θ0; second: the cross-entropy + orthogonality
    gradient at θ0 (before_kd_step, the reference's graph) or at θ1 (after_kd_step). With two micro-batches
    each gets its own held graph and the step equals the whole batch's. The schedule counts one step."""
    method = second_task_method(ce_gradient=ce_gradient)
    by_hand = copy.deepcopy(method)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([2, 3, 3, 2])

    assert engine_step(method, images, labels, accumulation_steps).updates == 1
    assert not method._held_cross_entropy

    manual = sgd(by_hand)
    parameters = dict(by_hand.named_parameters())
    first = gradients(by_hand, by_hand._distillation_step(images).loss)
    for lora_name in ("shared.q", "shared.v"):
        for position in range(len(by_hand.shared_blocks)):
            teacher_up = by_hand.teacher[lora_name[-1]][position].up
            first[f"{lora_name}.{position}.up"] *= reassignment_weights(teacher_up).unsqueeze(1)
    if ce_gradient == "before_kd_step":
        second = gradients(by_hand, by_hand._cross_entropy_step(images, labels).loss)
    for name, parameter in parameters.items():
        parameter.grad = first[name]
    manual.step()
    if ce_gradient == "after_kd_step":
        second = gradients(by_hand, by_hand._cross_entropy_step(images, labels).loss)
    for name, parameter in parameters.items():
        parameter.grad = second[name]
    manual.step()
    for name, parameter in method.named_parameters():
        torch.testing.assert_close(parameter, parameters[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_references_stale_graph_order_fails_on_current_pytorch():
    """Why `ce_gradient` exists: back-propagating the pre-step graph after the step is an in-place error."""
    method = second_task_method()
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([2, 3, 3, 2])
    optimizer = sgd(method)
    cross_entropy = method._cross_entropy_step(images, labels).loss
    optimizer.zero_grad()
    method._distillation_step(images).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="inplace operation"):
        cross_entropy.backward()


@pytest.mark.parametrize("rows", [1, 6, 1024])
def test_shared_prefix_inference_equals_one_full_pass_per_task(rows):
    """Three stored tasks with trained-looking adapters; 1 row per pass = one task per pass, 6 = two tasks."""
    torch.manual_seed(3)
    method = tiny_method(inference_rows=rows)
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 32, 32)
    for index in range(3):
        task = TaskInfo(index, 3, 2 * index, 2)
        method.begin_task(task)
        perturb([p for p in method.parameters() if p.requires_grad], generator, std=0.3)
        method.eval()
        method.end_task(task, ListData([(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]) + 2 * index)]))
    shared_prefix = method.predict(images)
    method.params.inference = "per_task"
    per_task = method.predict(images)
    assert shared_prefix.shape == (3, 6)
    torch.testing.assert_close(shared_prefix, per_task, rtol=1e-5, atol=1e-6)
    features = method.stored_task_features(images)
    assert not torch.allclose(features[0], features[1], atol=1e-3)  # the tasks' adapters really differ


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"shared_blocks": [2, 1]}, "shared_blocks=[2, 1] must be increasing"),
        ({"specific_blocks": [3, 4]}, "specific_blocks=[3, 4] must be increasing, distinct block indices"),
        ({"shared_blocks": [0, 2], "specific_blocks": [1, 3]}, "must all come before specific_blocks"),
        ({"specific_blocks": []}, "specific_blocks=[] must be"),
    ],
)
def test_bad_block_split_is_bad_input(params, message):
    with pytest.raises(BadInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny_method(**params)


def test_block_split_with_a_plain_block_between_shared_and_specific():
    method = tiny_method(shared_blocks=[0], specific_blocks=[2, 3])
    task = TaskInfo(0, 1, 0, 2)
    method.begin_task(task)
    assert method.tasks[0].block_weights.shape == (3, 2) and len(method.shared["q"]) == 1
    perturb([p for p in method.parameters() if p.requires_grad], torch.Generator().manual_seed(5), std=0.3)
    method.eval()
    method.end_task(task, ListData([(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))]))
    images = torch.rand(2, 3, 32, 32)
    shared_prefix = method.predict(images)
    method.params.inference = "per_task"
    torch.testing.assert_close(shared_prefix, method.predict(images), rtol=1e-5, atol=1e-6)
