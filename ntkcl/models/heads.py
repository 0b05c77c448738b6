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


class NormLinearHead(nn.Module):
    """logits = W LayerNorm(x) + b over a growing set of classes: a timm ViT's `fc_norm` + `head`.

    Rows are appended per task, initialised as timm initialises a ViT head (truncated normal, std 0.02, zero
    bias); the LayerNorm (eps 1e-6, affine) is shared by every class. `forward(x, first, last)` gives the
    logits of classes first .. last - 1 only, which trains exactly as the full head with the other classes'
    logits masked to -inf (they and their rows get no gradient).

    Args:
        dim: feature width.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.weight = nn.Parameter(torch.zeros(0, dim))
        self.bias = nn.Parameter(torch.zeros(0))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def grow_to(self, num_classes: int) -> None:
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        rows = torch.empty(extra, self.weight.shape[1])
        nn.init.trunc_normal_(rows, std=0.02)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), rows.to(self.weight)]))
        self.bias = nn.Parameter(torch.cat([self.bias.detach(), self.bias.new_zeros(extra)]))

    def forward(self, features: torch.Tensor, first: int = 0, last: int | None = None) -> torch.Tensor:
        return F.linear(self.norm(features), self.weight[first:last], self.bias[first:last])


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

    def per_task(self, features: torch.Tensor, task_sizes: Sequence[int]) -> torch.Tensor:
        """Cosine logits when each task has its own feature: (T, B, D) features, classes in consecutive
        task blocks of `task_sizes`; class c of task t scores cos(features[t], prototype c).

        This is the block diagonal of CL-LoRA's classifier over concatenated per-task features
        (He et al., CVPR 2025, arXiv 2505.24816), without computing the off-diagonal blocks.
        """
        prototypes = F.normalize(self.prototypes[: sum(task_sizes)], dim=-1).split(list(task_sizes))
        normalized = F.normalize(features.float(), dim=-1)
        return torch.cat([F.linear(normalized[t], rows) for t, rows in enumerate(prototypes)], dim=1)


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


RIDGE_EXPONENTS = tuple(range(-8, 9))


def validation_split(positions: torch.Tensor, count: int, train_fraction: float, seed: int) -> torch.Tensor:
    """Which images (by their position in the task, 0..count-1) form the validation part of a random split.

    A seeded permutation of the task's images puts the first floor(train_fraction * count) in the fitting
    part, so the split is the same for any number of processes and any batch order.
    """
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    rank_in_order = torch.empty_like(order)
    rank_in_order[order] = torch.arange(count)
    return rank_in_order.to(positions.device)[positions] >= int(train_fraction * count)


class RidgeSums:
    """One task's float64 sums for the ridge head, kept apart for the fitting and validation images.

    Gram matrices Φᵀ Φ, cross-correlations Φᵀ Y with one-hot targets Y, and Σ‖y‖² of the validation part;
    they are plain sums, so processes add theirs with one all-reduce each.
    """

    def __init__(self, dim: int, num_classes: int, device: torch.device):
        zeros = {"dtype": torch.float64, "device": device}
        self.fit_gram = torch.zeros(dim, dim, **zeros)
        self.fit_cross = torch.zeros(dim, num_classes, **zeros)
        self.val_gram = torch.zeros(dim, dim, **zeros)
        self.val_cross = torch.zeros(dim, num_classes, **zeros)
        self.val_targets = torch.zeros((), **zeros)

    def add(self, features: torch.Tensor, labels: torch.Tensor, validation: torch.Tensor) -> None:
        """Add a batch of projected features with their labels; `validation` marks the validation images."""
        features = features.to(torch.float64)
        targets = F.one_hot(labels, self.fit_cross.shape[1]).to(torch.float64)
        for part, gram, cross in (
            (~validation, self.fit_gram, self.fit_cross),
            (validation, self.val_gram, self.val_cross),
        ):
            gram.addmm_(features[part].T, features[part])
            cross.addmm_(features[part].T, targets[part])
        self.val_targets += targets[validation].sum()

    def reduce(self, all_reduce_sum) -> RidgeSums:
        for tensor in (self.fit_gram, self.fit_cross, self.val_gram, self.val_cross, self.val_targets):
            all_reduce_sum(tensor)
        return self


def ridge_validation_errors(sums: RidgeSums, ridges: torch.Tensor) -> torch.Tensor:
    """Validation sum of squared errors of W(λ) = (G_fit + λI)⁻¹ Q_fit for every λ in `ridges`.

    One eigendecomposition G_fit = V diag(s) Vᵀ serves every λ (W(λ) = V diag(1/(s+λ)) Vᵀ Q_fit), and the
    error comes from the validation sums alone: ‖Φ_v W − Y_v‖² = tr(Wᵀ G_v W) − 2 tr(Wᵀ Q_v) + ‖Y_v‖².
    Round-off can leave tiny negative eigenvalues of the positive semi-definite G_fit; they are set to 0.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(sums.fit_gram)
    eigenvalues = eigenvalues.clamp_min(0)
    rotated = eigenvectors.T @ sums.fit_cross
    errors = []
    for ridge in ridges.tolist():
        weights = eigenvectors @ (rotated / (eigenvalues + ridge).unsqueeze(1))
        errors.append(
            (sums.val_gram @ weights * weights).sum() - 2 * (sums.val_cross * weights).sum() + sums.val_targets
        )
    return torch.stack(errors)


class RandomProjectionRidge(nn.Module):
    """RanPAC's head: a frozen random projection with ReLU and a ridge-regression read-out, in closed form.

    McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual Learning", NeurIPS
    2023, arXiv 2307.02251. Features h (d) become φ = ReLU(h W_rand) (M; W_rand ~ N(0, 1), d x M, drawn
    once), and logits are φ W_o with W_o = (G + λI)⁻¹ Q, where G = Σ φφᵀ and Q = Σ φyᵀ (one-hot y) are
    accumulated in float64 over every task so far. After each task λ is chosen from 10^-8 .. 10^8 by the
    validation error of a fit on a random 80/20 split of that task's images (RanPAC's rule), then W_o is
    solved with the accumulated sums.

    Args:
        in_features: feature width d.
        projection_dim: M (RanPAC: 10,000).
        train_fraction: fitting share of the split that chooses λ.
        ridge_exponents: λ candidates are 10^e for e in this list.

    G and Q are only needed to continue learning (`TRAINING_ONLY` names them); prediction uses the
    projection and W_o.
    """

    TRAINING_ONLY = ("gram", "cross")

    def __init__(
        self,
        in_features: int,
        projection_dim: int = 10_000,
        train_fraction: float = 0.8,
        ridge_exponents: tuple[int, ...] = RIDGE_EXPONENTS,
    ):
        super().__init__()
        self.train_fraction = train_fraction
        self.register_buffer("ridges", 10.0 ** torch.tensor(ridge_exponents, dtype=torch.float64), persistent=False)
        self.register_buffer("projection", torch.randn(in_features, projection_dim))
        self.register_buffer("weight", torch.zeros(0, projection_dim))
        self.register_buffer("ridge", torch.zeros((), dtype=torch.float64))
        self.register_buffer("gram", torch.zeros(projection_dim, projection_dim, dtype=torch.float64))
        self.register_buffer("cross", torch.zeros(projection_dim, 0, dtype=torch.float64))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def projection_dim(self) -> int:
        return self.projection.shape[1]

    def grow_to(self, num_classes: int) -> None:
        """Cover labels 0 .. num_classes-1 (new classes get zero read-out rows until the next solve)."""
        extra = max(0, num_classes - self.num_classes)
        self.weight = torch.cat([self.weight, self.weight.new_zeros(extra, self.projection_dim)])
        self.cross = torch.cat([self.cross, self.cross.new_zeros(self.projection_dim, extra)], dim=1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """φ = ReLU(h W_rand), in float32 whatever the autocast."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return torch.relu(features.float() @ self.projection)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.project(features) @ self.weight.T

    def new_sums(self) -> RidgeSums:
        return RidgeSums(self.projection_dim, self.num_classes, self.gram.device)

    @torch.no_grad()
    def learn(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor,
        split_seed: int,
        all_reduce_sum=lambda tensor: tensor,
        chunk: int = 1024,
    ) -> float:
        """Add one task: this process's features (N, d), labels and task positions; returns the chosen λ.

        Every process must call it with its shard; the sums go through `all_reduce_sum`.
        """
        count = int(all_reduce_sum(torch.tensor(len(positions), device=positions.device)))
        validation = validation_split(positions, count, self.train_fraction, split_seed)
        sums = self.new_sums()
        with torch.autocast(device_type=features.device.type, enabled=False):
            for start in range(0, len(features), chunk):
                rows = slice(start, start + chunk)
                sums.add(self.project(features[rows]), labels[rows], validation[rows])
        return self.update(sums.reduce(all_reduce_sum))

    @torch.no_grad()
    def update(self, sums: RidgeSums) -> float:
        """Choose λ on the task's split, add the task's sums to G and Q, solve W_o; returns λ."""
        with torch.autocast(device_type=self.gram.device.type, enabled=False):
            errors = ridge_validation_errors(sums, self.ridges)
            self.ridge.copy_(self.ridges[int(torch.argmin(errors))])
            self.gram += sums.fit_gram + sums.val_gram
            self.cross += sums.fit_cross + sums.val_cross
            identity = torch.eye(self.projection_dim, dtype=torch.float64, device=self.gram.device)
            solution = torch.linalg.solve(self.gram + self.ridge * identity, self.cross)
            self.weight.copy_(solution.T.float())
        return float(self.ridge)
