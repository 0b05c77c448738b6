"""Bottleneck adapters attached in parallel to a ViT block's MLP (AdaptFormer, Chen et al., NeurIPS 2022).

This is also NTK-CL's "channel" branch (arXiv 2407.17120): the adapter reads the block's hidden state after
attention (before the second LayerNorm) and adds `scale * up(dropout(relu(down(h))))` to the block output.
The up-projection starts at zero so an untrained adapter leaves the pre-trained model unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ntkcl.models.backbone import BlockForward


class BottleneckAdapter(nn.Module):
    """Down-project, ReLU, dropout, up-project, scale.

    Args:
        dim: token width of the backbone.
        bottleneck: hidden width (NTK-CL: 16).
        scale: output multiplier (NTK-CL: 0.1).
        dropout: dropout on the bottleneck activations (NTK-CL: 0.1).
    """

    def __init__(self, dim: int, bottleneck: int = 16, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(torch.relu(self.down(hidden))))


def attention_residual(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """First half of a pre-norm timm block: tokens + attention(norm1(tokens))."""
    return tokens + block.drop_path1(block.ls1(block.attn(block.norm1(tokens))))


def mlp_residual(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Second half of a pre-norm timm block: hidden + mlp(norm2(hidden))."""
    return hidden + block.drop_path2(block.ls2(block.mlp(block.norm2(hidden))))


def adapter_block_forward(*adapter_sets: nn.ModuleList | None) -> BlockForward:
    """A block forward that adds `adapters[index](h)` in parallel to the MLP of every block.

    With several sets, the batch is read as equal consecutive chunks, chunk k using set k (None: no adapter),
    so branches that share the frozen backbone run as one batched pass.
    """

    def forward(index: int, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        hidden = attention_residual(block, tokens)
        chunks = hidden.chunk(len(adapter_sets))
        added = [
            torch.zeros_like(chunk) if adapters is None else adapters[index](chunk)
            for adapters, chunk in zip(adapter_sets, chunks, strict=True)
        ]
        return mlp_residual(block, hidden) + (added[0] if len(added) == 1 else torch.cat(added))

    return forward
