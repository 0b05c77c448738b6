"""Classifier heads shared by methods."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CosineLinear(nn.Module):
    """logits = sigma * cos(x, w_k): a cosine classifier with a learnable scale (Hou et al., CVPR 2019).

    Args:
        in_features: feature width.
        out_features: number of classes.
        learn_sigma: whether the scale sigma (initialised to 1) is trained.
    """

    def __init__(self, in_features: int, out_features: int, learn_sigma: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        self.sigma = nn.Parameter(torch.ones(1), requires_grad=learn_sigma)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))


class PrototypeClassifier(nn.Module):
    """A growing, frozen cosine classifier whose rows are class prototypes (class-mean features).

    Rows are appended once per task and never recomputed afterwards.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(0, dim))

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def grow(self, num_new: int) -> None:
        extra = self.prototypes.new_zeros(num_new, self.prototypes.shape[1])
        self.prototypes = torch.cat([self.prototypes, extra])

    def set_rows(self, first: int, rows: torch.Tensor) -> None:
        self.prototypes[first : first + rows.shape[0]] = rows.to(self.prototypes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features.float(), dim=-1), F.normalize(self.prototypes, dim=-1))
