"""Token-mixing prompt generators: NTK-CL's "patch" branch (Liu et al., arXiv 2407.17120).

In every block, after attention, a generator mixes the block's tokens along the token axis into a few prompt
tokens, `G = LayerNorm(W_tok · T)`, adds `carry · P_old` (the previous block's prompts after this block's
attention) and inserts them right after the prefix tokens (CLS) before the MLP. In the first block the prompt
slots receive no residual; later blocks add the residual `h`, whose prompt slots hold `P_old`. W_tok and the
LayerNorm (eps 1e-6, the reference's) start at zero, so an untrained generator emits zero prompts.
"""

from __future__ import annotations

import torch
from torch import nn

from ntkcl.models.adapters import attention_residual
from ntkcl.models.backbone import BlockForward


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
