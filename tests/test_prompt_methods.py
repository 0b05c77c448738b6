"""The prompt module and the prompt methods (L2P, DualPrompt, CODA-Prompt, OVOR) against hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from ntkcl.errors import BadInputError
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.coda_prompt import CODAPrompt, CODAPromptParams
from ntkcl.methods.dualprompt import DualPrompt, DualPromptParams
from ntkcl.methods.l2p import L2P, L2PParams
from ntkcl.methods.ovor import OVOR, OVORParams, kth_neighbour_distance, outlier_regularization, virtual_outliers
from ntkcl.models.backbone import create_backbone
from ntkcl.models.prompts import (
    ComponentPool,
    InsertedPrompts,
    gram_schmidt_rows,
    key_query_similarity,
    prompted_block_forward,
    pull_constraint,
    select_top_k,
)
from tests.conftest import TINY_BACKBONE


def tiny_backbone():
    return create_backbone(TINY_BACKBONE["name"], pretrained=False, model_kwargs=TINY_BACKBONE["model_kwargs"])


# Every method on the 2-block test ViT, prompts in its two blocks.
METHODS = {
    "l2p": lambda backbone: L2P(backbone, L2PParams(pool_size=4, length=2, top_k=2)),
    "dualprompt": lambda backbone: DualPrompt(
        backbone, DualPromptParams(g_blocks=[0], e_blocks=[1], g_length=2, e_length=3, pool_size=3)
    ),
    "coda-prompt": lambda backbone: CODAPrompt(backbone, CODAPromptParams(pool_size=6, length=4, blocks=[0, 1])),
    "ovor": lambda backbone: OVOR(backbone, OVORParams(g_blocks=[0], e_blocks=[1], g_length=2, e_length=3)),
}


def test_key_query_matching_and_top_k_by_hand():
    queries = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
    keys = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
    half, fifth = 1 / math.sqrt(2), 1 / math.sqrt(5)
    expected = torch.tensor([[1.0, 0.0, half], [2 * fifth, fifth, fifth * half], [0.0, -1.0, half]])
    similarity = key_query_similarity(queries, keys)
    torch.testing.assert_close(similarity, expected)
    assert select_top_k(similarity, 2).tolist() == [[0, 2], [0, 1], [2, 0]]
    # batch-wise: key 0 is chosen 3 times, key 2 twice, key 1 at most once
    chosen = select_top_k(similarity, 2, batchwise=True)
    assert chosen.tolist() == [[0, 2]] * 3
    # pull: mean over images of Σ_chosen (1 - cos)
    per_image = [(1 - expected[b, chosen[b]]).sum() for b in range(3)]
    torch.testing.assert_close(pull_constraint(similarity, chosen), torch.stack(per_image).mean())


def test_batchwise_ties_go_to_the_lower_key():
    similarity = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.0, 0.9, 0.1, 0.8]])
    # top-2 per image: {0, 2} and {1, 3}: every key once, so the lowest two indices win
    assert select_top_k(similarity, 2, batchwise=True).tolist() == [[0, 1], [0, 1]]


def hand_attention(block, tokens, key_prefix=None, value_prefix=None):
    """timm's pre-norm block written out, with optional extra keys and values in front of the tokens' own."""
    attn = block.attn
    batch, count, dim = tokens.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    normed = block.norm1(tokens)
    q, k, v = (normed @ attn.qkv.weight.T + attn.qkv.bias).split(dim, dim=-1)
    if key_prefix is not None:
        k, v = torch.cat([key_prefix, k], dim=1), torch.cat([value_prefix, v], dim=1)

    def split(x):
        return x.reshape(batch, -1, heads, head_dim).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    mixed = (weights @ split(v)).transpose(1, 2).reshape(batch, count, dim)
    hidden = tokens + attn.proj(mixed)
    return hidden + block.mlp(block.norm2(hidden))


def test_prepend_and_prefix_insertion_against_a_hand_computation():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    block = backbone.blocks[0]
    tokens = backbone.embed(torch.rand(2, 3, 32, 32))
    dim, prefix_tokens = backbone.embed_dim, backbone.num_prefix_tokens
    prompt = torch.randn(2, 3, dim)

    prepended = prompted_block_forward(InsertedPrompts(prepend={0: prompt}), prefix_tokens)(0, block, tokens)
    with_prompt = torch.cat([tokens[:, :prefix_tokens], prompt, tokens[:, prefix_tokens:]], dim=1)
    assert prepended.shape[1] == tokens.shape[1] + 3
    torch.testing.assert_close(prepended, hand_attention(block, with_prompt), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prepended, block(with_prompt), rtol=1e-5, atol=1e-5)

    key_value = torch.randn(2, 4, dim)  # 2 key tokens, then 2 value tokens
    prefixed = prompted_block_forward(InsertedPrompts(prefix={0: key_value}), prefix_tokens)(0, block, tokens)
    assert prefixed.shape == tokens.shape
    expected = hand_attention(block, tokens, key_value[:, :2], key_value[:, 2:])
    torch.testing.assert_close(prefixed, expected, rtol=1e-5, atol=1e-5)
    # a block without prompts is the stock block
    untouched = prompted_block_forward(InsertedPrompts(prefix={1: key_value}), prefix_tokens)(0, block, tokens)
    torch.testing.assert_close(untouched, block(tokens), rtol=1e-6, atol=1e-6)


def test_adding_prefixes_keeps_keys_with_keys():
    first, second = torch.arange(4.0).view(1, 4, 1), torch.arange(10.0, 16.0).view(1, 6, 1)
    prompts = InsertedPrompts()
    prompts.add_prefix(0, first)
    prompts.add_prefix(0, second)
    assert prompts.prefix[0].flatten().tolist() == [0, 1, 10, 11, 12, 2, 3, 13, 14, 15]


def test_gram_schmidt_by_hand():
    torch.manual_seed(3)
    first = gram_schmidt_rows(torch.zeros(0, 5), 3)
    torch.testing.assert_close(first @ first.T, torch.eye(3), rtol=0, atol=1e-5)
    # earlier rows that are not orthogonal (trained): each new draw loses its projection on each of them
    earlier = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    torch.manual_seed(4)
    (row,) = gram_schmidt_rows(earlier, 1)
    torch.manual_seed(4)
    draw = torch.randn(3)
    removed = sum((draw @ u) / (u @ u) * u for u in earlier)
    torch.testing.assert_close(row, (draw - removed) / (draw - removed).norm())


def test_coda_attention_weights_and_prompt_by_hand():
    torch.manual_seed(0)
    pool = ComponentPool(length=2, dim=3, key_dim=6)
    pool.grow(2)
    first_rows = [p.detach().clone() for p in pool.stacked()]
    pool.grow(3)
    components, keys, attention = pool.stacked()
    assert components.shape == (5, 2, 3) and keys.shape == (5, 6)
    # earlier rows kept and frozen, new rows trainable and orthonormal to the earlier ones
    for before, now in zip(first_rows, pool.stacked(), strict=True):
        torch.testing.assert_close(now[:2], before)
    assert [p.requires_grad for p in pool.keys] == [False, True]
    torch.testing.assert_close(keys @ keys.T, torch.eye(5), rtol=0, atol=1e-5)
    queries = torch.randn(2, 6)
    alpha = torch.empty(2, 5)
    for b in range(2):
        for m in range(5):
            alpha[b, m] = F.cosine_similarity(queries[b] * attention[m], keys[m], dim=0)
    torch.testing.assert_close(pool.weights(queries), alpha)
    expected = torch.stack([sum(alpha[b, m] * components[m] for m in range(5)) for b in range(2)])
    torch.testing.assert_close(pool(queries), expected)
    penalty = sum(((x @ x.T - torch.eye(5)) ** 2).mean() for x in (keys, attention, components.flatten(1)))
    torch.testing.assert_close(pool.orthogonality_penalty(), penalty)


def test_ovor_outliers_are_the_most_distant_candidates():
    torch.manual_seed(0)
    features = torch.randn(30, 8)
    params = OVORParams(candidates=20, boundary=4, per_class=5, knn=3, noise=0.5)
    generator = torch.Generator().manual_seed(1)
    outliers = virtual_outliers(features, 2, params, generator)
    offsets = 0.5 * torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    # the reference: candidates are the offsets repeated once per boundary feature, not centred anywhere
    normalized = F.normalize(features, dim=1)
    distance = ((offsets[:, None] - normalized[None]) ** 2).sum(-1).sort(dim=1).values[:, 2]
    assert len(outliers) == 10
    assert torch.allclose(kth_neighbour_distance(offsets, normalized, 3), distance, atol=1e-5)
    # 10 kept of 4 copies of each offset: the 3 most distant offsets (4 + 4 + 2 copies)
    most_distant = offsets[distance.topk(3).indices]
    assert all(any(torch.allclose(row, candidate) for candidate in most_distant) for row in outliers)
    assert len(torch.unique(outliers, dim=0)) == 3

    centred = virtual_outliers(features, 2, params.model_copy(update={"outlier_centre": "boundary"}), generator)
    assert len(centred) == 10 and len(torch.unique(centred, dim=0)) == 10


def test_outlier_regularization_by_hand():
    params = OVORParams()
    id_logits = torch.tensor([[10.0, 2.0], [20.0, 1.0]])
    ood_logits = torch.tensor([[4.0, 0.0], [1.0, 1.0]])
    id_excess = F.relu(-torch.logsumexp(id_logits, 1) + 15)  # energy above τ_id = -15
    ood_excess = F.relu(-3 + torch.logsumexp(ood_logits, 1))  # energy below τ_ood = -3

    def huber(x):
        return torch.where(x < 1, 0.5 * x**2, x - 0.5).mean()

    loss, _, _ = outlier_regularization(id_logits, ood_logits, params)
    torch.testing.assert_close(loss, 0.1 * (huber(id_excess) + huber(ood_excess)))


def trainable_gradients(method, images, labels):
    method.zero_grad(set_to_none=True)
    method.training_step(images, labels).loss.backward()
    return {name for name, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradients_reach_exactly_what_each_task_trains(name):
    torch.manual_seed(0)
    method = METHODS[name](tiny_backbone())
    tasks = [TaskInfo(0, 2, 0, 2), TaskInfo(1, 2, 2, 2)]
    method.begin_stream(tasks)
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 0, 1, 1, 0])
    for task in tasks:
        method.begin_task(task)
        method.train()
        reached = trainable_gradients(method, images, labels + task.known_classes)
        trainable = {n for n, p in method.named_parameters() if p.requires_grad}
        assert not any(n.startswith("backbone.") for n in trainable)
        assert reached <= trainable
        head = f"heads.{task.index}"
        assert {f"{head}.weight", f"{head}.bias"} <= reached
        assert not any(n.startswith("heads.") and not n.startswith(head) for n in trainable)
        if name == "l2p":
            assert {"pool.prompts", "pool.keys"} <= reached
        if name == "dualprompt":
            assert {"g_prompts.0", "e_prompts.1", "e_keys"} <= reached
            # only the current task's E-prompt and key move
            for parameter in (method.e_prompts["1"], method.e_keys):
                rows = parameter.grad.flatten(1).abs().sum(1) > 0
                assert rows.tolist() == [index == task.index for index in range(3)]
        if name == "coda-prompt":
            current = {f"pools.{b}.{part}.{task.index}" for b in "01" for part in ("components", "keys", "attention")}
            assert reached == current | {f"{head}.weight", f"{head}.bias"} and trainable == reached
        if name == "ovor":
            assert reached == trainable == {"prompts.0", "prompts.1", f"{head}.weight", f"{head}.bias"}
        method.seen_classes = task.total_classes


def test_query_pass_shares_the_blocks_before_the_first_prompt():
    torch.manual_seed(0)
    backbone = create_backbone(
        TINY_BACKBONE["name"], pretrained=False, model_kwargs={**TINY_BACKBONE["model_kwargs"], "depth": 3}
    )
    method = DualPrompt(backbone, DualPromptParams(g_blocks=[], e_blocks=[2], pool_size=2, e_length=2))
    images = torch.rand(3, 3, 32, 32)
    queries, prefix = method.query_and_prefix(images)
    torch.testing.assert_close(queries, backbone(images))
    torch.testing.assert_close(prefix, backbone.run_blocks(backbone.embed(images), stop=2))
    assert OVOR.uses_query is False


def test_bad_block_lists_and_pool_sizes_are_refused():
    with pytest.raises(BadInputError, match="e_blocks"):
        DualPrompt(tiny_backbone(), DualPromptParams())  # blocks 2-4 on a 2-block ViT
    method = METHODS["dualprompt"](tiny_backbone())
    with pytest.raises(BadInputError, match="4 tasks"):
        method.begin_stream([TaskInfo(i, 4, 2 * i, 2) for i in range(4)])
    with pytest.raises(BadInputError, match="top_k"):
        L2P(tiny_backbone(), L2PParams(pool_size=2, top_k=3))
    with pytest.raises(ValueError, match="even"):
        CODAPromptParams(length=3)
