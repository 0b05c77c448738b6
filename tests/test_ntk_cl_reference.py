"""NTK-CL details that only the reference's code fixes: task-0 InfoNCE, the optimizer's parameter set, the
prompt LayerNorm's eps and the proxy head's width on a remainder task (shared/reference/ntk-cl.md)."""

import math

import torch
import torch.nn.functional as F

from ntkcl.config import OptimConfig
from ntkcl.engine.optim import TaskOptimization
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.ntk_cl import NTKCL, NTKCLParams
from ntkcl.models.backbone import create_backbone
from ntkcl.models.prompts import PromptGenerator
from tests.conftest import TINY_BACKBONE


def tiny_method(**params) -> NTKCL:
    backbone = create_backbone(
        TINY_BACKBONE["name"], pretrained=False, model_kwargs=TINY_BACKBONE["model_kwargs"], init_seed=0
    )
    return NTKCL(backbone, NTKCLParams(fusion_heads=4, **params))


def hand_nce(vectors: list[list[float]], labels: list[int], temperature: float = 0.1) -> float:
    """-log Σ_{same label, i≠j} e^{s_ij} + mean_i log Σ_{j≠i} e^{s_ij}, s = cos / τ, written out."""

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    n = len(vectors)
    s = [[cosine(vectors[i], vectors[j]) / temperature for j in range(n)] for i in range(n)]
    positive = sum(math.exp(s[i][j]) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j])
    rows = [math.log(sum(math.exp(s[i][j]) for j in range(n) if j != i)) for i in range(n)]
    return -math.log(positive) + sum(rows) / n


def padded(rows: list[list[float]], width: int) -> torch.Tensor:
    return F.pad(torch.tensor(rows), (0, width - len(rows[0])))


def test_task_zero_infonce_runs_over_the_batch_alone():
    # Task 0 has no old prototypes: the reference's InfoNCE is over the batch, non-zero as label 0 repeats.
    method = tiny_method()
    method.begin_task(TaskInfo(0, 2, 0, 2, increment=2))
    batch = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    fused = padded(batch, method.feature_dim)
    value = method._mutual_information(fused, torch.tensor([0, 0, 1]))
    expected = -hand_nce(batch, [0, 0, 1])  # mi_sign="reference": the negated quantity
    assert abs(value.item() - expected) < 1e-4
    assert abs(expected) > 1.0


def test_partial_batch_samples_the_configured_batch_size_of_old_prototypes():
    # Task 1 of a 4+2 split: the 4 old prototypes are the rows before the last `increment` (2). The run's
    # batch is 4, the last batch holds 2 images: the reference still samples 4 prototypes, i.e. all of them.
    method = tiny_method()
    method.train_batch_size = 4
    method.begin_task(TaskInfo(0, 2, 0, 4, increment=2))
    old = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    with torch.no_grad():
        method.prototypes.prototypes.copy_(padded(old, method.feature_dim))
    method.begin_task(TaskInfo(1, 2, 4, 2, increment=2))
    batch = [[1.0, 0.5, 0.0], [0.2, 0.0, 1.0]]
    labels = torch.tensor([4, 4])
    torch.manual_seed(0)
    value = method._mutual_information(padded(batch, method.feature_dim), labels)
    assert abs(value.item() + hand_nce(batch + old, [4, 4, 0, 1, 2, 3])) < 1e-4
    method.train_batch_size = None  # outside a run: as many as the step's images (2 of the 4)
    torch.manual_seed(0)
    fewer = method._mutual_information(padded(batch, method.feature_dim), labels)
    assert abs(fewer.item() - value.item()) > 1e-3


def test_fusion_query_and_key_biases_decay_as_under_the_reference_sgd():
    # The reference's SGD (momentum 0.9, weight decay 0.005) holds every trainable tensor; the query and key
    # biases get gradient 0 from the single-key softmax, so the first step moves them by -lr * wd * b.
    method = tiny_method()
    method.begin_task(TaskInfo(0, 1, 0, 2))
    with torch.no_grad():
        method.fusion.query.bias.fill_(2.0)
        method.fusion.key.bias.fill_(-1.0)
    settings = OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.005)
    optimization = TaskOptimization.build(method, settings, updates_per_epoch=1, epochs=1)
    optimized = {id(p) for group in optimization.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in method.parameters() if p.requires_grad}
    method.train()
    output = method.training_step(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    optimization.optimizer.zero_grad(set_to_none=True)
    output.total().backward()
    method.adjust_gradients("loss")
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)
    optimization.update()
    torch.testing.assert_close(
        method.fusion.query.bias, torch.full_like(method.fusion.query.bias, 2.0 - 0.1 * 0.005 * 2)
    )
    torch.testing.assert_close(method.fusion.key.bias, torch.full_like(method.fusion.key.bias, -1.0 + 0.1 * 0.005))


def test_prompt_layernorm_uses_the_reference_eps():
    generator = PromptGenerator(num_tokens=5, dim=4, num_prompts=2)
    assert generator.norm.eps == 1e-6
    with torch.no_grad():  # loaded (non-zero) weights: the eps shows in the output
        generator.token_mix.weight.normal_(generator=torch.Generator().manual_seed(0))
        generator.norm.weight.fill_(1.0)
    tokens = 1e-3 * torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(1))
    mixed = generator.token_mix(tokens.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(generator(tokens), F.layer_norm(mixed, (4,), eps=1e-6), rtol=0, atol=0)


def test_proxy_head_width_on_a_two_three_two_split():
    tasks = [TaskInfo(0, 3, 0, 2, increment=3), TaskInfo(1, 3, 2, 3, increment=3), TaskInfo(2, 3, 5, 2, increment=3)]
    method = tiny_method()
    widths = []
    for task in tasks:
        method.begin_task(task)
        widths.append(method.proxy_head.weight.shape[0])
    assert widths == [2, 3, 3]  # the reference: increment outputs after task 0, one unused on the last task
    method.train()
    loss = method.training_step(torch.rand(2, 3, 32, 32), torch.tensor([5, 6])).loss
    assert torch.isfinite(loss)
    method.params.proxy_head_width = "task"
    assert [method.proxy_head_width(task) for task in tasks] == [2, 3, 2]
