"""Token-mixing prompt generators: NTK-CL's "patch" branch (Liu et al., arXiv 2407.17120).

In every block, after attention, a generator mixes the block's tokens along the token axis into a few prompt
tokens, `G = LayerNorm(W_tok · T)`, adds `carry · P_old` (the previous block's prompts after this block's
attention) and inserts them right after the prefix tokens (CLS) before the MLP. In the first block the prompt
slots receive no residual; later blocks add the residual `h`, whose prompt slots hold `P_old`. W_tok and the
LayerNorm (eps 1e-6, the reference's) start at zero, so an untrained generator emits zero prompts.

The second half is the prompt module of prompt-based continual learning (L2P, DualPrompt, CODA-Prompt,
OVOR), on the stock timm ViT through a block forward:

* `PromptPool`: M prompts with M keys; a query (the frozen model's feature of the image) picks the top-k
  prompts by cosine key-query similarity (`key_query_similarity`, `select_top_k`), per image or by the
  batch's most frequent choices.
* `ComponentPool`: CODA-Prompt's prompt components with keys and attention vectors; an image's prompt is the
  sum of the components weighted by cos(query ⊙ attention, key), new components Gram-Schmidt orthogonal to
  the older ones (`gram_schmidt_rows`).
* `InsertedPrompts` + `prompted_block_forward`: where the prompts go. Prompt-tuning prepends tokens after the
  prefix tokens (CLS) at a block's input, where they join every later block; prefix-tuning gives a block's
  attention extra keys and values (`attention_with_qkv_update`'s `key_value_prefix`) and adds no token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ntkcl.models.adapters import attention_residual, mlp_residual
from ntkcl.models.backbone import BlockForward
from ntkcl.models.lora import attention_with_qkv_update


class PromptGenerator(nn.Module):
    """Args:
    num_tokens: tokens a block sees without prompts (prefix + patches; 197 for ViT-B/16 at 224).
    dim: token width.
    num_prompts: prompt tokens generated per block (NTK-CL: 10).
    """

    def __init__(self, num_tokens: int, dim: int, num_prompts: int = 10):
        super().__init__()
        self.token_mix = nn.Linear(num_tokens, num_prompts)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for tensor in (self.token_mix.weight, self.token_mix.bias, self.norm.weight, self.norm.bias):
            nn.init.zeros_(tensor)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, P, D) prompts."""
        mixed = self.token_mix(tokens.transpose(1, 2)).transpose(1, 2)
        return self.norm(mixed)


def prompt_block_forward(
    generator_sets: list[nn.ModuleList], num_prefix_tokens: int, num_prompts: int, carry: float = 0.1
) -> BlockForward:
    """A block forward that inserts generated prompts after the prefix tokens (see module docstring).

    With several generator sets the batch is read as equal consecutive chunks, chunk k using set k.
    """

    def forward(index: int, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        hidden = attention_residual(block, tokens)
        prefix = hidden[:, :num_prefix_tokens]
        has_prompts = index > 0
        if has_prompts:
            previous = hidden[:, num_prefix_tokens : num_prefix_tokens + num_prompts]
            patches = hidden[:, num_prefix_tokens + num_prompts :]
        else:
            previous = hidden.new_zeros(hidden.shape[0], num_prompts, hidden.shape[2])
            patches = hidden[:, num_prefix_tokens:]
        plain_tokens = torch.cat([prefix, patches], dim=1).chunk(len(generator_sets))
        prompts = torch.cat(
            [generators[index](chunk) for generators, chunk in zip(generator_sets, plain_tokens, strict=True)]
        )
        if has_prompts:
            prompts = prompts + carry * previous
        inserted = torch.cat([prefix, prompts, patches], dim=1)
        residual = torch.cat([prefix, previous, patches], dim=1)
        return residual + block.drop_path2(block.ls2(block.mlp(block.norm2(inserted))))

    return forward


def drop_prompts(tokens: torch.Tensor, num_prefix_tokens: int, num_prompts: int) -> torch.Tensor:
    """The block output without the prompt slots (prompts never reach the pooled feature)."""
    return torch.cat([tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens + num_prompts :]], dim=1)


def key_query_similarity(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, M) cosine similarities between (B, D) queries and (M, D) keys."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T


def select_top_k(similarity: torch.Tensor, k: int, batchwise: bool = False) -> torch.Tensor:
    """(B, k) indices of the k most similar keys of every image, most similar first.

    With `batchwise`, every image gets the batch's k most frequently chosen keys (L2P's batch-wise prompt
    selection; ties go to the lower index).
    """
    chosen = similarity.topk(k, dim=1).indices
    if not batchwise:
        return chosen
    counts = torch.bincount(chosen.flatten(), minlength=similarity.shape[1])
    majority = counts.sort(descending=True, stable=True).indices[:k]
    return majority.unsqueeze(0).expand(len(similarity), k)


def pull_constraint(similarity: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """L2P's surrogate loss: mean over the batch of Σ_chosen (1 - cos(query, key)); it pulls the chosen keys
    towards their queries (the official code subtracts Σ cos / B, which has the same gradient)."""
    return (1 - similarity.gather(1, chosen)).sum(dim=1).mean()


class PromptPool(nn.Module):
    """M prompts of `length` tokens of width `dim`, each with a key of width `key_dim`.

    Args:
        size: M.
        length: tokens per prompt (a prefix-tuning prompt holds its key tokens, then its value tokens).
        dim: token width.
        key_dim: key width (the query's); None: no keys (a pool of one prompt, OVOR's).
        init_scale: prompts and keys start uniform in [0, init_scale).
    """

    def __init__(self, size: int, length: int, dim: int, key_dim: int | None = None, init_scale: float = 1.0):
        super().__init__()
        self.prompts = nn.Parameter(torch.rand(size, length, dim) * init_scale)
        self.keys = None if key_dim is None else nn.Parameter(torch.rand(size, key_dim) * init_scale)

    @property
    def size(self) -> int:
        return self.prompts.shape[0]

    def similarity(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, M) cosine similarity of each (detached) query to each key."""
        return key_query_similarity(queries.detach(), self.keys)

    def gather(self, chosen: torch.Tensor) -> torch.Tensor:
        """(B, k * length, dim): the chosen prompts of every image, concatenated in order."""
        return self.prompts[chosen].flatten(1, 2)


def split_key_value(prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefix-tuning prompt (B, 2L, D) as (B, L, D) keys and (B, L, D) values (first half keys)."""
    half = prompt.shape[1] // 2
    return prompt[:, :half], prompt[:, half:]


@dataclass
class InsertedPrompts:
    """The prompts of one batch, by block index.

    Attributes:
        prepend: (B, P, D) tokens inserted after the prefix tokens at the block's input (prompt-tuning).
        prefix: (B, 2L, D) prefix-tuning prompts of the block's attention: L keys, then L values.
    """

    prepend: dict[int, torch.Tensor] = field(default_factory=dict)
    prefix: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def blocks(self) -> set[int]:
        return set(self.prepend) | set(self.prefix)

    def add_prefix(self, block: int, prompt: torch.Tensor) -> None:
        """Add a (B, 2L, D) prefix-tuning prompt to `block`'s, after the keys and values it already has."""
        if block not in self.prefix:
            self.prefix[block] = prompt
            return
        (keys, values), (new_keys, new_values) = split_key_value(self.prefix[block]), split_key_value(prompt)
        self.prefix[block] = torch.cat([keys, new_keys, values, new_values], dim=1)


def prompted_block_forward(prompts: InsertedPrompts, num_prefix_tokens: int) -> BlockForward:
    """A pre-norm timm block forward with `prompts` inserted (see the module docstring)."""

    def forward(index: int, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if index in prompts.prepend:
            inserted = prompts.prepend[index].to(tokens.dtype)
            tokens = torch.cat([tokens[:, :num_prefix_tokens], inserted, tokens[:, num_prefix_tokens:]], dim=1)
        if index not in prompts.prefix:
            return mlp_residual(block, attention_residual(block, tokens))
        key_values = split_key_value(prompts.prefix[index])
        attended = attention_with_qkv_update(block.attn, block.norm1(tokens), None, key_values)
        return mlp_residual(block, tokens + block.drop_path1(block.ls1(attended)))

    return forward


def gram_schmidt_rows(earlier: torch.Tensor, count: int) -> torch.Tensor:
    """`count` new unit rows from N(0, I) by classical Gram-Schmidt against `earlier` (n x F) and each other.

    CODA-Prompt's initialisation of a task's new components, keys and attention vectors (Smith et al., CVPR
    2023, arXiv 2211.13218, as its code does it): each new draw v loses its projection (v·u / u·u) u onto every
    earlier row u and every new row before it; only the new rows are normalised. The earlier rows are the
    trained ones, no longer orthogonal to each other, so the new rows are orthogonal to each earlier row's
    direction one at a time, exactly as the reference subtracts them.
    """
    earlier = earlier.detach().float()
    basis = list(earlier)
    new = []
    for _ in range(count):
        draw = torch.randn(earlier.shape[1]).to(earlier)
        removed = sum(((draw @ row) / (row @ row)) * row for row in basis) if basis else 0
        row = draw - removed
        basis.append(row)
        new.append(row)
    return torch.stack([row / row.norm() for row in new])


class ComponentPool(nn.Module):
    """CODA-Prompt's decomposed prompt of one block (arXiv 2211.13218): components P (M, L, D), keys K (M, Dk)
    and attention vectors A (M, Dk), added `per_task` at a time; older tasks' rows are frozen.

    The prompt of a query q is Σ_m α_m P_m with α_m = cos(q ⊙ A_m, K_m) over the components of the tasks so
    far (no softmax). Each task's rows are stored as their own parameters, so only the current task's receive
    gradients.
    """

    def __init__(self, length: int, dim: int, key_dim: int):
        super().__init__()
        self.length, self.dim, self.key_dim = length, dim, key_dim
        self.components = nn.ParameterList()
        self.keys = nn.ParameterList()
        self.attention = nn.ParameterList()

    def grow(self, per_task: int, device: torch.device | None = None) -> None:
        """Freeze the rows so far and add `per_task` Gram-Schmidt rows of each of P (flattened), K and A."""
        for parameters, width in (
            (self.components, self.length * self.dim),
            (self.keys, self.key_dim),
            (self.attention, self.key_dim),
        ):
            for parameter in parameters:
                parameter.requires_grad_(False)
            earlier = torch.cat([p.detach().flatten(1).cpu() for p in parameters]) if len(parameters) else None
            rows = gram_schmidt_rows(torch.zeros(0, width) if earlier is None else earlier, per_task)
            shape = (per_task, self.length, self.dim) if parameters is self.components else (per_task, width)
            parameters.append(nn.Parameter(rows.view(shape).to(device)))

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P (M, L, D), K (M, Dk), A (M, Dk) over every task so far."""
        return torch.cat(list(self.components)), torch.cat(list(self.keys)), torch.cat(list(self.attention))

    def weights(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, M) α_m = cos(q ⊙ A_m, K_m) for (detached) queries (B, Dk)."""
        _, keys, attention = self.stacked()
        attended = queries.detach().float().unsqueeze(1) * attention.unsqueeze(0)
        return (F.normalize(attended, dim=2) * F.normalize(keys, dim=1).unsqueeze(0)).sum(dim=2)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, L, D) prompts Σ_m α_m P_m."""
        components = self.stacked()[0]
        return torch.einsum("bm,mld->bld", self.weights(queries), components)

    def orthogonality_penalty(self) -> torch.Tensor:
        """mean((X Xᵀ - I)²) summed over X = K, A and P (rows flattened), over every task's rows."""
        components, keys, attention = self.stacked()
        total = components.new_zeros(())
        for rows in (keys, attention, components.flatten(1)):
            gram = rows @ rows.T
            total = total + ((gram - torch.eye(len(rows), device=rows.device, dtype=rows.dtype)) ** 2).mean()
        return total
