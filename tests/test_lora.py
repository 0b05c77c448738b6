"""The shared LoRA building block against plain arithmetic on a tiny timm ViT."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from ntkcl.models.lora import (
    LoRA,
    StackedLoRA,
    attach_weight_delta,
    attention_with_qkv_update,
    lora_block_forward,
    merge_weight_deltas,
    orthogonal_rows,
    pack_qkv,
    run_blocks_for_tasks,
    stacked_low_rank,
    supports_qkv_update,
    weight_delta_of,
)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2).eval()


def test_orthogonal_rows_are_orthonormal_and_follow_qr_of_uniform():
    generator = torch.Generator().manual_seed(3)
    rows = orthogonal_rows(4, 16, generator)
    assert rows.shape == (4, 16)
    torch.testing.assert_close(rows @ rows.T, torch.eye(4), atol=1e-6, rtol=0)
    q, _ = torch.linalg.qr(torch.rand(16, 4, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(rows, q.T)
    with pytest.raises(ValueError):
        orthogonal_rows(17, 16)


def test_lora_starts_as_identity_update_and_matches_its_weight_form():
    lora = LoRA(8, 6, rank=2, scale=0.5)
    x = torch.randn(3, 8)
    assert torch.count_nonzero(lora(x)) == 0
    nn.init.normal_(lora.up)
    torch.testing.assert_close(lora(x), x @ lora.delta().T)
    torch.testing.assert_close(lora.delta(), 0.5 * lora.up @ lora.down)
    frozen = LoRA(8, 6, rank=2, train_down=False)
    assert not frozen.down.requires_grad and frozen.up.requires_grad


def test_zero_update_block_equals_timm_block(vit):
    tokens = torch.randn(2, 17, vit.embed_dim)
    block = vit.blocks[0]
    assert supports_qkv_update(block)
    forward = lora_block_forward(lambda index, normed: None)
    torch.testing.assert_close(forward(0, block, tokens), block(tokens), atol=1e-5, rtol=1e-5)


def test_qkv_update_equals_adding_delta_to_the_fused_weight(vit):
    torch.manual_seed(1)
    attn = vit.blocks[1].attn
    dim = vit.embed_dim
    q_lora, v_lora = LoRA(dim, dim, 4), LoRA(dim, dim, 4)
    for lora in (q_lora, v_lora):
        nn.init.normal_(lora.up, std=0.1)
    x = torch.randn(2, 17, dim)
    adapted = attention_with_qkv_update(attn, x, pack_qkv(dim, q=q_lora(x), v=v_lora(x)))
    reference = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2)
    reference.load_state_dict(vit.state_dict())
    reference.eval()
    with torch.no_grad():
        reference.blocks[1].attn.qkv.weight[:dim] += q_lora.delta()
        reference.blocks[1].attn.qkv.weight[2 * dim :] += v_lora.delta()
    torch.testing.assert_close(adapted, reference.blocks[1].attn(x), atol=1e-5, rtol=1e-5)


def test_stacked_low_rank_equals_a_loop_with_per_adapter_scales():
    inputs, down, up = torch.randn(3, 5, 8), torch.randn(3, 2, 8), torch.randn(3, 6, 2)
    scales = torch.tensor([0.5, 1.0, 2.0])
    stacked = stacked_low_rank(inputs, down, up, scales)
    for t in range(3):
        torch.testing.assert_close(stacked[t], scales[t] * inputs[t] @ down[t].T @ up[t].T)


def test_stacked_lora_multiplies_each_adapters_scale_by_its_extra_factor():
    loras = [LoRA(8, 6, 2, scale=s) for s in (0.5, 2.0)]
    for lora in loras:
        nn.init.normal_(lora.up)
    stacked = StackedLoRA.stack(loras, torch.tensor([3.0, -1.0]))
    torch.testing.assert_close(stacked.scale, torch.tensor([1.5, -2.0]))
    inputs = torch.randn(2, 4, 8)
    outputs = stacked(inputs)
    torch.testing.assert_close(outputs[0], 3.0 * loras[0](inputs[0]))
    torch.testing.assert_close(outputs[1], -1.0 * loras[1](inputs[1]))


def test_blocks_for_stacked_tasks_equal_one_pass_per_task(vit):
    """Blocks 1.. for three tasks (q and v adapted in block 1, k in none) in one pass, against three passes."""
    torch.manual_seed(4)
    dim, tasks = vit.embed_dim, 3
    per_task = [{"q": LoRA(dim, dim, 2), "v": LoRA(dim, dim, 2)} for _ in range(tasks)]
    for adapters in per_task:
        for lora in adapters.values():
            nn.init.normal_(lora.up, std=0.2)
    weights = torch.tensor([0.5, 1.0, 1.5])
    updates = {1: {name: StackedLoRA.stack([a[name] for a in per_task], weights) for name in ("q", "v")}}
    tokens = torch.randn(2, 17, dim)
    with torch.no_grad():
        stacked = run_blocks_for_tasks(vit.blocks, tokens, updates, start=1)
    assert stacked.shape == (tasks, 2, 17, dim)
    for t, adapters in enumerate(per_task):
        forward = lora_block_forward(
            lambda index, normed, a=adapters, w=weights[t]: pack_qkv(dim, q=w * a["q"](normed), v=w * a["v"](normed))
        )
        with torch.no_grad():
            expected = forward(1, vit.blocks[1], tokens)
        torch.testing.assert_close(stacked[t], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same number of tasks"):
        short = StackedLoRA.stack([per_task[0]["q"]])
        run_blocks_for_tasks(vit.blocks, tokens, {0: {"q": short}, 1: updates[1]})


def test_weight_delta_parametrization_trains_lora_and_merges():
    torch.manual_seed(2)
    linear = nn.Linear(8, 12)
    linear.requires_grad_(False)
    original = linear.weight.clone()
    q, v = LoRA(8, 4, 2), LoRA(8, 4, 2)
    nn.init.normal_(q.up)
    nn.init.normal_(v.up)
    attach_weight_delta(linear, "weight", [q, v], [0, 8])
    expected = original.clone()
    expected[:4] += q.delta().detach()
    expected[8:] += v.delta().detach()
    torch.testing.assert_close(linear.weight, expected)
    linear(torch.randn(3, 8)).sum().backward()
    assert q.up.grad is not None and linear.parametrizations.weight.original.grad is None
    merge_weight_deltas(linear, "weight")
    torch.testing.assert_close(linear.weight, expected)
    assert not linear.weight.requires_grad and isinstance(linear.weight, nn.Parameter)


def test_weight_delta_folds_into_a_merged_delta_beside_the_untouched_weight():
    torch.manual_seed(3)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    attention.requires_grad_(False)
    pretrained = attention.in_proj_weight.clone()
    x = torch.randn(2, 5, 8)
    q, v = LoRA(8, 8, 2, scale=0.25), LoRA(8, 8, 2, scale=0.25)
    for lora in (q, v):
        nn.init.normal_(lora.up)
    delta = attach_weight_delta(attention, "in_proj_weight", [q, v], [0, 16], keep_merged=True)
    assert weight_delta_of(attention, "in_proj_weight") is delta
    with torch.no_grad():
        adapted = attention(x, x, x, need_weights=False)[0]
    delta.fold()
    assert len(delta.loras) == 0
    expected = torch.zeros(24, 8)
    expected[:8], expected[16:] = q.delta(), v.delta()
    torch.testing.assert_close(delta.merged, expected)
    torch.testing.assert_close(attention.parametrizations.in_proj_weight.original, pretrained, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(attention(x, x, x, need_weights=False)[0], adapted, atol=1e-6, rtol=1e-6)
    k = LoRA(8, 8, 2)
    nn.init.normal_(k.up)
    delta.replace_loras([k], [8])
    expected[8:16] += k.delta().detach()
    torch.testing.assert_close(attention.in_proj_weight, pretrained + expected)
    with pytest.raises(ValueError):
        attach_weight_delta(nn.Linear(4, 4), "weight", [], []).fold()


def test_orthogonal_rows_against_earlier_rows_span_their_complement():
    earlier = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    rows = orthogonal_rows(4, 16, torch.Generator().manual_seed(5), against=earlier)
    torch.testing.assert_close(rows @ rows.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(earlier @ rows.T, torch.zeros(6, 4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        orthogonal_rows(11, 16, against=earlier)
