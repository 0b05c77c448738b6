"""NTK-CL's feature fusion m = a·A(c, p) + b·c + s·p (Liu et al., arXiv 2407.17120).

The official code writes A as multi-head attention with queries from p and keys/values from c, but each
"sequence" has a single element, so the softmax is exactly 1 and A(c, p) = W_v c + b_v with the attention
dropout acting as a per-head dropout of the value output. `mode="reference"` computes exactly that. The
query and key projections exist and are regularised; the loss's gradient reaches them as exactly 0 in the
reference, where SGD's weight decay and momentum still move them every step (NTK-CL hands them a zero
gradient for that).
`mode="sections"` is the corrected variant: the width-d sections of c and p are the tokens, so the
attention over them is a real softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionFusion(nn.Module):
    """Args:
    dim: width of c and p (k sections of `section_dim`).
    section_dim: backbone width (a section of c / p).
    num_heads: attention heads (NTK-CL: 8).
    dropout: attention dropout (NTK-CL: 0.1).
    weights: (a, b, s) multipliers of A(c, p), c and p (NTK-CL: 0.5, 1.0, 0.1).
    mode: "reference" or "sections" (see module docstring).
    """

    def __init__(
        self,
        dim: int,
        section_dim: int,
        num_heads: int = 8,
        dropout: float = 0.1,
        weights: tuple[float, float, float] = (0.5, 1.0, 0.1),
        mode: str = "reference",
    ):
        super().__init__()
        width = dim if mode == "reference" else section_dim
        if width % num_heads:
            raise ValueError(f"fusion width {width} is not divisible by {num_heads} heads")
        self.mode = mode
        self.num_heads = num_heads
        self.section_dim = section_dim
        self.dropout = dropout
        self.weights = weights
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def attend(self, channel: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        batch = channel.shape[0]
        if self.mode == "reference":
            # softmax over a single key is exactly 1; only its dropout remains (one draw per head).
            values = self.value(channel).view(batch, self.num_heads, -1)
            keep = torch.ones(batch, self.num_heads, 1, device=channel.device, dtype=values.dtype)
            keep = F.dropout(keep, self.dropout, self.training)
            return (keep * values).reshape(batch, -1)
        tokens_c = channel.view(batch, -1, self.section_dim)
        tokens_p = patch.view(batch, -1, self.section_dim)
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split(self.query(tokens_p)),
            split(self.key(tokens_c)),
            split(self.value(tokens_c)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return attended.transpose(1, 2).reshape(batch, -1)

    def forward(self, channel: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        a, b, s = self.weights
        return a * self.attend(channel, patch) + b * channel + s * patch
