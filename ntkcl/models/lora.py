"""Low-rank adaptation (LoRA, Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685)
as the one building block CL-LoRA, KeepLoRA and PROTEUS compose.

A `LoRA` holds a down-projection D (rank x in) and an up-projection U (out x rank) of a frozen weight
W (out x in): the adapted layer computes `W x + scale * U D x`, i.e. ΔW = scale * U D. Papers name the two
factors differently (CL-LoRA's code calls D `lora_B`; KeepLoRA's A is Dᵀ and its B is Uᵀ); here they are
always `down` and `up`.

Two ways to apply updates, both on a stock model:

* activation space, for timm ViTs: `attention_with_qkv_update` is timm's `Attention.forward` with an additive
  term on the fused qkv projection's output, so q, k and v can be adapted separately without splitting or
  replacing `attn.qkv`. `stacked_low_rank` runs T tasks' adapters over T stacked copies of a batch with one
  batched matmul, and `run_blocks_for_tasks` runs a range of ViT blocks that way for T tasks at once
  (multi-task inference without a Python loop of T passes).
* weight space, for any `nn.Linear` or `nn.MultiheadAttention` weight (CLIP): `WeightDelta` is a
  `torch.nn.utils.parametrize` parametrization W -> W + Σ rows(ΔW). `merge_weight_deltas` folds it into
  the weight permanently; `WeightDelta.fold` folds it into a dense `merged` delta beside the untouched
  pre-trained weight instead (KeepLoRA's merge after every task, saved and exported as that delta).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

DownInit = Literal["orthogonal", "kaiming", "zeros"]


def orthogonal_rows(
    rank: int, features: int, generator: torch.Generator | None = None, against: torch.Tensor | None = None
) -> torch.Tensor:
    """A (rank x features) matrix with orthonormal rows: Qᵀ of the QR decomposition of a U[0, 1) matrix.

    This is CL-LoRA's initialisation of every down-projection (He et al., CVPR 2025, arXiv 2505.24816).
    With `against` (k x features), the rows are also orthogonal to the span of its rows: the last `rank`
    columns of Q in the QR decomposition of [againstᵀ, U] (a new LoRA unit orthogonal to earlier ones).
    """
    taken = 0 if against is None else against.shape[0]
    if rank + taken > features:
        raise ValueError(f"rank {rank} plus {taken} earlier rows exceeds the {features} features it projects")
    uniform = torch.rand(features, rank, generator=generator)
    if against is not None:
        uniform = torch.cat([against.detach().T.to(uniform), uniform], dim=1)
    q, _ = torch.linalg.qr(uniform)
    return q[:, taken:].T.contiguous()


class LoRA(nn.Module):
    """One low-rank update ΔW = scale * up @ down of a frozen (out x in) weight; `up` starts at zero.

    Args:
        in_features: input width of the adapted weight.
        out_features: output width of the adapted weight.
        rank: width of the bottleneck.
        scale: multiplier of the update (1 for CL-LoRA, alpha/rank for KeepLoRA).
        down_init: "orthogonal" (`orthogonal_rows`), "kaiming" (the LoRA paper's uniform) or "zeros".
        train_down: whether `down` is a trained parameter (CL-LoRA's shared adapters and KeepLoRA freeze it).
        train_up: whether `up` is trained.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        scale: float = 1.0,
        down_init: DownInit = "orthogonal",
        train_down: bool = True,
        train_up: bool = True,
    ):
        super().__init__()
        self.scale = scale
        if down_init == "orthogonal":
            down = orthogonal_rows(rank, in_features)
        elif down_init == "kaiming":
            down = torch.empty(rank, in_features)
            nn.init.kaiming_uniform_(down, a=5**0.5)
        else:
            down = torch.zeros(rank, in_features)
        self.down = nn.Parameter(down, requires_grad=train_down)
        self.up = nn.Parameter(torch.zeros(out_features, rank), requires_grad=train_up)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """scale * U D x for inputs of shape (..., in)."""
        return self.scale * F.linear(F.linear(inputs, self.down), self.up)

    def delta(self) -> torch.Tensor:
        """The update as a weight, (out x in)."""
        return self.scale * self.up @ self.down

    @torch.no_grad()
    def assign(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Set both factors in place (e.g. from an SVD), keeping their trainability."""
        self.down.copy_(down)
        self.up.copy_(up)


def stacked_low_rank(
    inputs: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """T adapters applied to T stacked inputs in two batched matmuls.

    Args:
        inputs: (T, M, in), chunk t for adapter t.
        down: (T, rank, in).
        up: (T, out, rank).
        scale: a float, or a (T,) tensor of per-adapter multipliers (e.g. CL-LoRA's block weights).

    Returns:
        (T, M, out): `scale_t * U_t D_t x` for every row x of chunk t.
    """
    hidden = torch.bmm(inputs, down.transpose(1, 2))
    output = torch.bmm(hidden, up.transpose(1, 2))
    if isinstance(scale, torch.Tensor):
        return output * scale.view(-1, 1, 1).to(output.dtype)
    return output * scale if scale != 1.0 else output


@dataclass(frozen=True)
class StackedLoRA:
    """T adapters of one projection stacked for `stacked_low_rank`: adapter t acts on input chunk t.

    Attributes:
        down: (T, rank, in).
        up: (T, out, rank).
        scale: (T,) multiplier of each adapter's output.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def stack(cls, loras: Sequence[LoRA], extra_scales: torch.Tensor | None = None) -> StackedLoRA:
        """Stack `loras` (equal shapes); each adapter's scale is its own `scale` times `extra_scales[t]`."""
        down = torch.stack([lora.down for lora in loras])
        up = torch.stack([lora.up for lora in loras])
        scale = torch.tensor([lora.scale for lora in loras], dtype=down.dtype, device=down.device)
        if extra_scales is not None:
            scale = scale * extra_scales.to(scale)
        return cls(down, up, scale)

    @property
    def num_tasks(self) -> int:
        return self.down.shape[0]

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """(T, M, in) -> (T, M, out)."""
        return stacked_low_rank(inputs, self.down, self.up, self.scale)


def pack_qkv(
    dim: int, q: torch.Tensor | None = None, k: torch.Tensor | None = None, v: torch.Tensor | None = None
) -> torch.Tensor:
    """Updates of q, k and v (each (..., dim) or None for no update) as one (..., 3 dim) fused-qkv update."""
    given = next(t for t in (q, k, v) if t is not None)
    parts = [t if t is not None else given.new_zeros(*given.shape[:-1], dim) for t in (q, k, v)]
    return torch.cat(parts, dim=-1)


def attention_with_qkv_update(
    attn: nn.Module,
    inputs: torch.Tensor,
    qkv_update: torch.Tensor | None,
    key_value_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """timm's `Attention.forward` with `qkv_update` (B, N, 3C) added to the fused qkv projection's output.

    `key_value_prefix` ((B, L, C) keys, (B, L, C) values) are extra keys and values that every query also
    attends to, placed before the tokens' own after the projection and the key norm (prefix-tuning, Li and
    Liang, arXiv 2101.00190, as DualPrompt and CODA-Prompt insert prompts). The pre-trained modules (qkv,
    q_norm, k_norm, norm, proj) are the model's own; only the addition and the prefix are new.
    """
    batch, tokens, _ = inputs.shape
    qkv = attn.qkv(inputs)
    if qkv_update is not None:
        qkv = qkv + qkv_update.to(qkv.dtype)
    qkv = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if key_value_prefix is not None:
        key_prefix, value_prefix = (
            part.to(k.dtype).reshape(batch, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
            for part in key_value_prefix
        )
        k, v = torch.cat([key_prefix, k], dim=2), torch.cat([value_prefix, v], dim=2)
    dropout = attn.attn_drop.p if attn.training else 0.0
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    x = x.transpose(1, 2).reshape(batch, tokens, -1)
    x = attn.norm(x)
    return attn.proj_drop(attn.proj(x))


QKVUpdate = Callable[[int, torch.Tensor], torch.Tensor | None]


def lora_block_forward(qkv_update: QKVUpdate) -> Callable[[int, nn.Module, torch.Tensor], torch.Tensor]:
    """A `Backbone` block forward whose attention adds `qkv_update(block_index, norm1(tokens))` to qkv.

    `qkv_update` returns a (B, N, 3C) tensor or None (the block runs unchanged).
    """

    def forward(index: int, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        normed = block.norm1(tokens)
        attended = attention_with_qkv_update(block.attn, normed, qkv_update(index, normed))
        hidden = tokens + block.drop_path1(block.ls1(attended))
        return hidden + block.drop_path2(block.ls2(block.mlp(block.norm2(hidden))))

    return forward


def stacked_qkv_update(updates: Mapping[int, Mapping[str, StackedLoRA]], dim: int) -> QKVUpdate:
    """A `QKVUpdate` for a batch of T equal consecutive chunks, chunk t belonging to task t.

    In block `index`, each of "q", "k", "v" named in `updates[index]` gets adapter t's output on chunk t;
    blocks without an entry run unchanged.
    """

    def update(index: int, normed: torch.Tensor) -> torch.Tensor | None:
        adapters = updates.get(index)
        if not adapters:
            return None
        num_tasks = next(iter(adapters.values())).num_tasks
        chunks = normed.reshape(num_tasks, -1, normed.shape[-1])
        parts = {name: adapter(chunks).reshape(*normed.shape[:-1], -1) for name, adapter in adapters.items()}
        return pack_qkv(dim, **parts)

    return update


def run_blocks_for_tasks(
    blocks: Sequence[nn.Module], tokens: torch.Tensor, updates: Mapping[int, Mapping[str, StackedLoRA]], start: int = 0
) -> torch.Tensor:
    """Blocks `start..` of a ViT for T tasks in one batched pass per block.

    Copy t of the shared input `tokens` (B, N, C) runs with task t's adapters: `updates[block index][name]`
    for name in q, k, v, stacked over the T tasks. This is multi-task inference (CL-LoRA's task-specific
    blocks after a shared prefix, one pass per stored task in retrieval methods) without a loop of T passes.

    Returns:
        (T, B, N, C) tokens after the last block.
    """
    sizes = {adapter.num_tasks for adapters in updates.values() for adapter in adapters.values()}
    if len(sizes) != 1:
        raise ValueError(f"the stacked adapters must all hold the same number of tasks, got {sorted(sizes)}")
    (num_tasks,) = sizes
    batch, rest = tokens.shape[0], tokens.shape[1:]
    hidden = tokens.unsqueeze(0).expand(num_tasks, *tokens.shape).reshape(num_tasks * batch, *rest)
    forward = lora_block_forward(stacked_qkv_update(updates, tokens.shape[-1]))
    for index in range(start, len(blocks)):
        hidden = forward(index, blocks[index], hidden)
    return hidden.view(num_tasks, batch, *rest)


def supports_qkv_update(block: nn.Module) -> bool:
    """Whether a block has the pre-norm timm layout `attention_with_qkv_update` recomposes."""
    attn = getattr(block, "attn", None)
    needed = ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "norm", "proj", "proj_drop", "attn_drop")
    return (
        attn is not None
        and all(hasattr(attn, name) for name in needed)
        and all(hasattr(block, name) for name in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"))
        and getattr(attn, "gate", None) is None
    )


class WeightDelta(nn.Module):
    """Parametrization W -> W + M + Σ rows(ΔW): each LoRA's update added to a block of rows of W.

    M is an optional dense `merged` buffer that collects updates folded in earlier (`fold`), so the original
    weight is never rewritten: a model rebuilt as the pre-trained weights plus saved `merged` tensors computes
    exactly what the trained one did (KeepLoRA's merge after every task, stored as a delta).

    Args:
        loras: the updates.
        row_offsets: first row of W each update covers (e.g. 0, C, 2C for q, k, v of a fused in-projection).
        merged_shape: the shape of W to keep a dense `merged` buffer (None: LoRA updates only).
    """

    def __init__(self, loras: Sequence[LoRA], row_offsets: Sequence[int], merged_shape: Sequence[int] | None = None):
        super().__init__()
        self.loras = nn.ModuleList()
        self.row_offsets: list[int] = []
        self.replace_loras(loras, row_offsets)
        self.merged: torch.Tensor | None
        self.register_buffer("merged", torch.zeros(*merged_shape) if merged_shape is not None else None)

    def replace_loras(self, loras: Sequence[LoRA], row_offsets: Sequence[int]) -> None:
        """Swap in another set of updates (e.g. the next task's)."""
        if len(loras) != len(row_offsets):
            raise ValueError("one row offset per LoRA")
        self.loras = nn.ModuleList(loras)
        self.row_offsets = list(row_offsets)

    def lora_delta(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Σ rows(ΔW) as a full (out x in) matrix like `weight`, or None without updates."""
        if not len(self.loras):
            return None
        blocks = []
        cursor = 0
        for lora, offset in sorted(zip(self.loras, self.row_offsets), key=lambda pair: pair[1]):
            delta = lora.delta().to(weight.dtype)
            if offset > cursor:
                blocks.append(weight.new_zeros(offset - cursor, weight.shape[1]))
            blocks.append(delta)
            cursor = offset + delta.shape[0]
        if cursor < weight.shape[0]:
            blocks.append(weight.new_zeros(weight.shape[0] - cursor, weight.shape[1]))
        return torch.cat(blocks)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            weight = weight + self.merged.to(weight.dtype)
        delta = self.lora_delta(weight)
        return weight if delta is None else weight + delta

    @torch.no_grad()
    def fold(self) -> None:
        """Add the LoRA updates to `merged` and drop them (the function of the layer is unchanged)."""
        if self.merged is None:
            raise ValueError("this WeightDelta keeps no merged buffer (create it with merged_shape)")
        delta = self.lora_delta(self.merged)
        if delta is not None:
            self.merged += delta
        self.replace_loras([], [])


def attach_weight_delta(
    module: nn.Module,
    name: str,
    loras: Sequence[LoRA],
    row_offsets: Sequence[int],
    keep_merged: bool = False,
) -> WeightDelta:
    """Make `module.<name>` read as W + ΔW (the frozen original stays in `parametrizations.<name>.original`).

    With `keep_merged`, the parametrization also holds a dense `merged` buffer (see `WeightDelta`).
    """
    shape = tuple(getattr(module, name).shape) if keep_merged else None
    delta = WeightDelta(loras, row_offsets, shape).to(getattr(module, name).device)
    parametrize.register_parametrization(module, name, delta)
    return delta


def detach_weight_delta(module: nn.Module, name: str) -> None:
    """Drop any parametrization of `module.<name>`, restoring the original weight (a new method on a backbone
    that an earlier one adapted starts from the pre-trained weights)."""
    if parametrize.is_parametrized(module, name):
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def weight_delta_of(module: nn.Module, name: str) -> WeightDelta | None:
    """The `WeightDelta` attached to `module.<name>`, if any."""
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, WeightDelta)), None)


@torch.no_grad()
def merge_weight_deltas(module: nn.Module, name: str) -> None:
    """Fold the attached updates into `module.<name>` for good and drop the parametrization."""
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
