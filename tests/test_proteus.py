"""PROTEUS's pieces on constructed tensors and the tiny ViT: composition, orthogonality, the stacked T-task pass."""

import pytest
import timm
import torch
import torch.nn.functional as F

from ntkcl.methods.base import TaskInfo, own_class_cross_entropy
from ntkcl.methods.proteus import PROJECTIONS, Proteus, ProteusParams, combination_penalty
from ntkcl.models.backbone import create_backbone
from tests.conftest import TINY_BACKBONE

RANK, ALPHA = 2, 0.3


def tiny_proteus(num_tasks=3, **params) -> Proteus:
    """A PROTEUS on the tiny ViT (width 64, 2 blocks) after `begin_task` of `num_tasks` tasks of 2 classes,
    with random up-projections and combination weights (a trained model's shape, not its values)."""
    backbone = create_backbone(
        TINY_BACKBONE["name"], pretrained=False, model_kwargs=TINY_BACKBONE["model_kwargs"], init_seed=0
    )
    torch.manual_seed(0)
    # Orthogonal down-projections, so that every unit (not only the trained ones) shapes the update.
    params.setdefault("down_init", "orthogonal_to_pool")
    method = Proteus(backbone, ProteusParams(added_units=RANK, alpha=ALPHA, projection_dim=16, **params))
    generator = torch.Generator().manual_seed(1)
    for index in range(num_tasks):
        method.begin_task(TaskInfo(index, num_tasks, 2 * index, 2))
        with torch.no_grad():
            for lora in [*method.tasks[index].q, *method.tasks[index].v]:
                lora.up.copy_(0.2 * torch.randn(lora.up.shape, generator=generator))
            method.tasks[index].combination.copy_(
                torch.randn(method.tasks[index].combination.shape, generator=generator)
            )
    return method.eval()


def update_by_hand(method: Proteus, task: int, projection: int, block: int) -> torch.Tensor:
    """α (Σ_{j<task} Σ_u w_{task,u} U_j[:, u] D_j[u] + U_task D_task) from the stored tensors."""
    weights = method.tasks[task].combination[projection, block]
    total = method.tasks[task].lora(projection, block).up @ method.tasks[task].lora(projection, block).down
    for earlier in range(task):
        lora = method.tasks[earlier].lora(projection, block)
        for unit in range(RANK):
            weight = weights[earlier * RANK + unit]
            total = total + weight * torch.outer(lora.up[:, unit], lora.down[unit])
    return ALPHA * total


def test_composed_factors_give_the_weighted_pool_plus_the_new_units():
    method = tiny_proteus()
    factors = method._composed_factors([0, 1, 2])
    for block in range(method.depth):
        for projection in range(len(PROJECTIONS)):
            down, up = factors[block][projection]
            assert down.shape == (3, 3 * RANK, 64) and up.shape == (3, 64, 3 * RANK)
            for task in range(3):
                expected = update_by_hand(method, task, projection, block)
                torch.testing.assert_close(ALPHA * up[task] @ down[task], expected, atol=1e-6, rtol=1e-5)


def reference_embedding(method: Proteus, task: int, images: torch.Tensor, scale: float) -> torch.Tensor:
    """The stock timm ViT with `scale` x task's composed update added to its q and v weights."""
    reference = timm.create_model(TINY_BACKBONE["name"], num_classes=0, **TINY_BACKBONE["model_kwargs"])
    reference.load_state_dict(method.backbone.vit.state_dict())
    reference.eval()
    dim = 64
    with torch.no_grad():
        for block in range(method.depth):
            reference.blocks[block].attn.qkv.weight[:dim] += scale / ALPHA * update_by_hand(method, task, 0, block)
            reference.blocks[block].attn.qkv.weight[2 * dim :] += scale / ALPHA * update_by_hand(method, task, 1, block)
        return reference.forward_head(reference.forward_features(images), pre_logits=True)


def test_a_task_model_is_the_vit_with_its_update_on_q_and_v_scaled_by_alpha_at_evaluation_only():
    method = tiny_proteus()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        evaluated = method.eval().embed(images, [1])[0]
        trained = method.train().embed(images, [1])[0]  # the tiny ViT has no dropout: train mode is deterministic
    torch.testing.assert_close(evaluated, reference_embedding(method, 1, images, ALPHA), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained, reference_embedding(method, 1, images, 1.0), atol=1e-5, rtol=1e-5)
    method.params.alpha_in_training = True
    with torch.no_grad():
        torch.testing.assert_close(method.embed(images, [1])[0], evaluated, atol=1e-6, rtol=1e-6)


def test_training_head_is_layernorm_and_linear_masked_to_the_task_with_plain_cross_entropy():
    method = tiny_proteus().train()
    head = method.task_head
    assert head.weight.shape == (6, 64) and head.norm.eps == 1e-6 and method.train_head is None
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([4, 5, 5, 4])
    output = method.training_step(images, labels)
    embedding = method.embed(images, [2])[0]
    full = F.linear(F.layer_norm(embedding, (64,), head.norm.weight, head.norm.bias, 1e-6), head.weight, head.bias)
    masked = full.masked_fill(torch.arange(6) < 4, float("-inf"))
    torch.testing.assert_close(output.logs["ce"], F.cross_entropy(masked, labels), atol=1e-6, rtol=1e-5)
    output.loss.backward()
    assert torch.count_nonzero(head.weight.grad[:4]) == 0 and torch.count_nonzero(head.weight.grad[4:]) > 0


def test_new_units_start_with_a_zero_input_factor_and_a_small_random_output_factor():
    backbone = create_backbone(
        TINY_BACKBONE["name"], pretrained=False, model_kwargs=TINY_BACKBONE["model_kwargs"], init_seed=0
    )
    method = Proteus(backbone, ProteusParams(added_units=RANK, projection_dim=16))
    torch.manual_seed(7)
    method.begin_task(TaskInfo(0, 2, 0, 2))
    torch.manual_seed(7)
    units = method.tasks[0]
    for projection in range(len(PROJECTIONS)):
        for block in range(method.depth):
            lora = units.lora(projection, block)
            assert torch.count_nonzero(lora.down) == 0
            torch.testing.assert_close(lora.up, 0.01 * torch.randn(64, RANK), rtol=0, atol=0)


def test_stacked_task_forward_equals_one_pass_per_task():
    method = tiny_proteus()
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        stacked = method.embed(images, [0, 1, 2])
        method.params.tasks_per_pass = 1
        looped = method.embed(images, [0, 1, 2])
        separate = torch.stack([method.embed(images, [task])[0] for task in range(3)])
    assert stacked.shape == (3, 4, 64)
    torch.testing.assert_close(stacked, separate, atol=1e-5, rtol=1e-5)
    assert torch.equal(looped, separate)


def test_new_units_start_orthogonal_to_the_pool_and_the_regularisers_by_hand():
    method = tiny_proteus()
    newest = method.tasks[2]
    for projection in range(len(PROJECTIONS)):
        for block in range(method.depth):
            pool = torch.cat([method.tasks[j].lora(projection, block).down for j in range(2)])
            torch.testing.assert_close(
                pool @ newest.lora(projection, block).down.T, torch.zeros(2 * RANK, RANK), atol=1e-5, rtol=0
            )
    assert method._orthogonality(newest).item() == pytest.approx(0.0, abs=1e-8)
    with torch.no_grad():
        newest.q[0].down[0] += method.tasks[0].q[0].down[1]  # one unit leans on an earlier one by 1
    assert method._orthogonality(newest).item() == pytest.approx(1.0, rel=1e-4)

    weights = torch.tensor([1.0, -2.0, 0.5])
    assert combination_penalty(weights, "l1+l2").item() == pytest.approx(3.5 + 5.25)
    assert combination_penalty(weights, "l1").item() == pytest.approx(3.5)
    assert combination_penalty(weights, "l2").item() == pytest.approx(5.25)


def test_training_reaches_only_the_current_task_and_its_head():
    method = tiny_proteus(ortho_weight=0.5).train()
    method.training_step(torch.rand(4, 3, 32, 32), torch.tensor([4, 5, 4, 5])).loss.backward()
    trained = {name for name, parameter in method.named_parameters() if parameter.grad is not None}
    assert trained == {name for name, parameter in method.named_parameters() if parameter.requires_grad}
    assert all(name.startswith(("tasks.2.", "task_head.")) for name in trained)
    assert "tasks.2.combination" in trained and "tasks.2.q.0.down" in trained and "tasks.2.v.1.up" in trained


def test_first_task_has_no_pool_and_a_too_narrow_width_is_bad_input():
    method = tiny_proteus(num_tasks=1)
    assert method.tasks[0].combination.shape == (2, 2, 0)
    assert method._orthogonality(method.tasks[0]).item() == 0.0
    from ntkcl.errors import BadInputError

    wide = tiny_proteus(num_tasks=1)
    wide.params.added_units = 63  # 63 new rows + the 2 of task 0 > width 64
    with pytest.raises(BadInputError, match="added_units"):
        wide.begin_task(TaskInfo(1, 3, 2, 2))
    with pytest.raises(BadInputError, match="n_components"):
        tiny_proteus(num_tasks=1, n_components=[3, 3])


def test_predict_retrieves_per_image_and_can_restrict_to_the_retrieved_task():
    method = tiny_proteus(num_tasks=2, restrict_to_retrieved_task=True)
    from ntkcl.models.signatures import GaussianMixtureSignature

    for task in range(2):
        signature = GaussianMixtureSignature(1, 64)
        signature.set_parameters(torch.ones(1), torch.full((1, 64), float(task)), torch.eye(64).unsqueeze(0))
        method.signatures.append(signature)
    method.head.grow_to(4)
    method.seen_classes = 4
    with torch.no_grad():
        method.head.weight.normal_()
    images = torch.rand(5, 3, 32, 32)
    embeddings = method.embed(images, [0, 1])
    logits, retrieved = method.predict_with_task(images)
    distances = torch.stack([(embeddings[t] - t).pow(2).sum(1) for t in range(2)])
    assert torch.equal(retrieved, distances.argmin(0))
    chosen = embeddings[retrieved, torch.arange(5)]
    for row, task in enumerate(retrieved.tolist()):
        allowed = slice(2 * task, 2 * task + 2)
        torch.testing.assert_close(logits[row, allowed], method.head(chosen[row : row + 1])[0, allowed])
        assert torch.isinf(logits[row]).sum() == 2


def test_own_class_cross_entropy_ignores_other_tasks_images():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0], [1.0, 1.0]])
    labels = torch.tensor([3, 4, 0, 9])  # the task's classes are 3 and 4; labels 0 and 9 belong to others
    loss, accuracy = own_class_cross_entropy(logits, labels, first_class=3)
    expected = (F.cross_entropy(logits[:2], torch.tensor([0, 1]), reduction="sum") / 4).item()
    assert loss.item() == pytest.approx(expected) and accuracy.item() == 100.0
    none, _ = own_class_cross_entropy(logits, torch.tensor([0, 1, 2, 9]), first_class=3)
    assert none.item() == 0.0


def test_batch_retrieval_picks_one_task_per_batch_on_constructed_gaussians():
    from ntkcl.models.signatures import GaussianMixtureSignature

    method = tiny_proteus(num_tasks=2, retrieval_unit="batch")
    assert method.evaluates_per_task_batch
    for centre in (0.0, 3.0):  # two unit Gaussians, each task's "model" the identity
        signature = GaussianMixtureSignature(1, 64)
        signature.set_parameters(torch.ones(1), torch.full((1, 64), centre), torch.eye(64).unsqueeze(0))
        method.signatures.append(signature)
    method.head.grow_to(4)
    method.seen_classes = 4
    rows = torch.zeros(4, 64)
    rows[3] = 2.9  # one image nearer task 1, three at task 0's centre
    method.embed = lambda images, tasks: rows.expand(len(tasks), -1, -1)
    _, retrieved = method.predict_with_task(torch.zeros(4, 3, 32, 32))
    assert retrieved.tolist() == [0, 0, 0, 0]
    method.params.retrieval_unit = "image"
    assert method.predict_with_task(torch.zeros(4, 3, 32, 32))[1].tolist() == [0, 0, 0, 1]
