"""Classifier heads shared by methods."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CosineLinear(nn.Module):
    """logits = sigma * cos(x, w_k): a cosine classifier with a learnable scale (Hou et al., CVPR 2019).

    Args:
        in_features: feature width.
        out_features: number of classes.
        learn_sigma: whether the scale sigma is trained.
        sigma: its initial value (KeepLoRA+ fixes it at 30).
    """

    def __init__(self, in_features: int, out_features: int, learn_sigma: bool = True, sigma: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        self.sigma = nn.Parameter(torch.full((1,), float(sigma)), requires_grad=learn_sigma)

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


def clip_logits(
    image_features: torch.Tensor, class_embeddings: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's logits: logit_scale · cos(image feature, class embedding), in float32."""
    return logit_scale * F.normalize(image_features.float(), dim=-1) @ class_embeddings.float().T


class TextClassifier(nn.Module):
    """CLIP's zero-shot classifier (Radford et al., arXiv 2103.00020) built from class names and prompt templates.

    The embedding of a class is the normalised mean of its prompts' normalised text features ("a photo of a
    {}." with the class name filled in, one prompt per template). Prompts are tokenised once, when a class is
    added; its embeddings are computed by the text encoder passed in, so they follow whatever the encoder has
    learned (with gradients, when training it). Nothing here is saved: the prompts come from the stream.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("tokens", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("prompt_class", torch.zeros(0, dtype=torch.long), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.prompt_class.max()) + 1 if len(self.prompt_class) else 0

    def has_classes(self, labels: range) -> bool:
        """Whether every label of the range has its prompts registered."""
        registered = set(self.prompt_class.tolist())
        return all(label in registered for label in labels)

    def add_classes(
        self, first_label: int, class_names: Sequence[str], templates: Sequence[str], tokenize: Callable
    ) -> None:
        """Register classes first_label, first_label + 1, ... by name, one prompt per template.

        Args:
            first_label: label of `class_names[0]`.
            class_names: the names a text encoder should read.
            templates: prompt templates with one `{}` each.
            tokenize: list of texts -> (N, context) token ids.
        """
        prompts = [template.format(name) for name in class_names for template in templates]
        rows = tokenize(prompts).to(self.prompt_class.device)
        owners = first_label + torch.arange(len(class_names), device=rows.device).repeat_interleave(len(templates))
        self.tokens = rows if not len(self.tokens) else torch.cat([self.tokens, rows])
        self.prompt_class = torch.cat([self.prompt_class, owners])

    def embeddings(self, encode_text, labels: range) -> torch.Tensor:
        """Normalised (len(labels) x D) class embeddings from `encode_text(tokens) -> features`."""
        selected = (self.prompt_class >= labels.start) & (self.prompt_class < labels.stop)
        features = F.normalize(encode_text(self.tokens[selected]).float(), dim=-1)
        owners = self.prompt_class[selected] - labels.start
        sums = features.new_zeros(len(labels), features.shape[1]).index_add(0, owners, features)
        return F.normalize(sums, dim=-1)
