"""KeepLoRA and KeepLoRA+: Luo et al., "KeepLoRA: Continual Learning with Residual Gradient Adaptation",
ICLR 2026, arXiv 2601.19659, as its MTIL code computes them.

LoRA sits on q, k, v and the out-projection of every attention block of both CLIP encoders (rank 16, alpha 1).
Every adapted weight W has a protected basis P (input space, d_in x k): before the first task the principal
directions of the pre-trained W holding 85 % (image) / 20 % (text) of its energy, then after each task the
GPM-style growth by the new directions of the features entering the weight (99 % energy). Per task:

1. gradient estimate: G = mean gradient of CLIP's cross-entropy over the task's training images w.r.t. the
   merged W, in (in x out) layout;
2. residual gradient Ĝ = G - P Pᵀ G;
3. initialisation from its low-rank SVD (`torch.svd_lowrank`, q = 4r, 4 iterations): A = U[:, :r],
   B = diag(S[:r]) V[:, :r]ᵀ, and the function-preserving offset W ← W - (alpha/r) (A B)ᵀ;
4. training of B only (A frozen), so every update (alpha/r) A ΔB stays in span(A), orthogonal to P;
5. merge W ← W + (alpha/r) (A B)ᵀ;
6. feature pass over the training images (q, k, v: the block's LayerNorm-1 output; o: the attention output
   before the out-projection; text: the task's class prompts) and the GPM update of every P.

Options for the places where the reference and the paper differ, or where the reference is unusual, each
named; the defaults are marked:

* `weight_space`: "input" (the default: the paper's formula and the reference's LLaVA code, the left
  singular vectors of Wᵀ; mathematically consistent and defined for any weight shape) or "output" (the MTIL
  code: the left singular vectors of PyTorch's (out x in) W, used as an input-space projector; the shapes
  only agree because CLIP's attention weights are square). The `mtil-order1` / `mtil-order2` presets select
  "output" with `feature_matrix="mean"`, the published MTIL setting.
* `feature_matrix`: "mean" (default; the reference keeps the element-wise running mean over batches of the
  per-batch token matrices, d_in x (batch x tokens), so the batch size `feature_batch_size` shapes it) or
  "covariance" (Σ x xᵀ over every token / their number).

The gradient estimate averages over every training image of the task, once each (test-time transforms). The
reference's estimate runs a shuffled loader with `drop_last`, so a random remainder of fewer than a batch of
images is skipped and the estimate depends on the shuffle; using all images is deterministic, and the two
differ only by that remainder.

KeepLoRA+ adds, per dataset, a cosine classifier (scale 30) over normalised image features, initialised with
the class means of the task's L2-normalised image features, normalised again, after the LoRA initialisation
(the reference's order) and trained with B; its logits are added to the zero-shot logits of the datasets
already trained.

Saved per run: the merged deltas of the adapted weights and the protected bases (and KeepLoRA+'s classifiers);
a model is rebuilt as the pre-trained CLIP plus these deltas.

Compilation: the image tower's pass of the training step, of prediction and of KeepLoRA+'s class means is
the compile target (`ZeroShot.image_features`); a task's LoRAs reach it as parameters of the same graph. The
once-per-task passes that record more than features (the gradient estimate w.r.t. the weights, the hooked
feature pass) run eagerly.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ntkcl.methods.base import TaskData, TaskInfo, class_means
from ntkcl.methods.sequential_lora import LoRAParams, SequentialLoRA
from ntkcl.models.clip import attention_context
from ntkcl.models.heads import CosineLinear, clip_logits
from ntkcl.models.lora import LoRA
from ntkcl.models.subspace import gpm_update, gram, project_off, weight_basis

KEEPLORA_CITATION = (
    "@inproceedings{luo2026keeplora, title={KeepLoRA: Continual Learning with Residual Gradient Adaptation}, "
    "author={Luo, Maolin and Zhou, Zhen and Zhang, Yiming and Wan, Tong and Zhang, Min-Ling and Wei, Tong}, "
    "booktitle={ICLR}, year={2026}, note={arXiv:2601.19659}}"
)


class KeepLoRAParams(LoRAParams):
    """Hyper-parameters; defaults are the reference's MTIL configuration."""

    visual_weight_threshold: float = Field(0.85, gt=0, le=1, description="ε_w of the image encoder's weights")
    text_weight_threshold: float = Field(0.2, gt=0, le=1, description="ε_w of the text encoder's weights")
    feature_threshold: float = Field(0.99, gt=0, le=1, description="ε_f of the GPM update")
    weight_space: Literal["input", "output"] = Field(
        "input", description="input: the paper and LLaVA code; output: the MTIL code (the mtil-order presets)"
    )
    feature_matrix: Literal["mean", "covariance"] = Field(
        "mean", description="mean: the reference's running mean of per-batch token matrices; covariance: Σ x xᵀ / n"
    )
    feature_batch_size: int = Field(64, ge=1, description="images per token matrix of the mean form (the batch size)")
    svd_oversampling: int = Field(4, ge=1, description="torch.svd_lowrank's q = svd_oversampling x rank")
    svd_iterations: int = Field(4, ge=0, description="torch.svd_lowrank's niter")


class Basis(nn.Module):
    """A protected basis (d x k, orthonormal columns) as a buffer whose width grows between tasks."""

    def __init__(self, dimension: int):
        super().__init__()
        self.register_buffer("value", torch.zeros(dimension, 0))

    @property
    def width(self) -> int:
        return self.value.shape[1]


class FeatureStatistics:
    """The input matrices of every adapted weight of one tower over a feature pass, as Gram matrices.

    "mean": the element-wise sum of per-pass token matrices (tokens x d) and their count (the reference's
    running mean, with the image batches re-cut to exactly `feature_batch_size`); "covariance": Σ x xᵀ and
    the token count. Both are reduced across processes before `gram_of` divides.
    """

    def __init__(self, form: str):
        self.form = form
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.counts: dict[tuple[int, str], float] = defaultdict(float)

    def add(self, layer: int, kind: str, tokens: torch.Tensor) -> None:
        rows = tokens.reshape(-1, tokens.shape[-1]).float()
        if self.form == "mean":
            value, count = rows, 1.0
        else:
            value, count = gram(rows.T), float(rows.shape[0])
        key = (layer, kind)
        self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.counts[key] += count

    def gram_of(self, layer: int, kind: str, data: TaskData) -> torch.Tensor:
        key = (layer, kind)
        total = data.all_reduce_sum(self.sums[key].clone())
        count = data.all_reduce_sum(torch.tensor(self.counts[key], dtype=torch.float64, device=total.device))
        if self.form == "mean":
            return gram((total / count.to(total.dtype)).T)
        return total / count


def _chunks(data: TaskData, size: int):
    """The task's images re-cut into batches of exactly `size` (the remainder is dropped, as with drop_last,
    unless no full batch exists)."""
    pending: list[torch.Tensor] = []
    held = 0
    yielded = False
    for images, _ in data.batches():
        pending.append(images)
        held += len(images)
        while held >= size:
            joined = torch.cat(pending)
            yield joined[:size]
            yielded = True
            pending, held = [joined[size:]], held - size
    if not yielded and held:
        yield torch.cat(pending)


class KeepLoRA(SequentialLoRA):
    name = "keeplora"
    Params = KeepLoRAParams
    citation = KEEPLORA_CITATION

    def __init__(self, backbone, params: KeepLoRAParams):
        super().__init__(backbone, params)
        self.bases = nn.ModuleDict({target.key: Basis(target.width) for target in self.targets})

    # Protected subspaces.

    @property
    def protected(self) -> bool:
        return all(basis.width > 0 for basis in self.bases.values())

    @torch.no_grad()
    def protect_pretrained_weights(self) -> None:
        """P ← the energy-threshold principal directions of every pre-trained weight (before the first task)."""
        thresholds = {"visual": self.params.visual_weight_threshold, "text": self.params.text_weight_threshold}
        for target in self.targets:
            basis = weight_basis(self.pretrained_weight(target), thresholds[target.tower], self.params.weight_space)
            self.bases[target.key].value = basis.to(self.device)

    # Initialisation from the residual gradient.

    def estimate_gradients(self, task: TaskInfo, data: TaskData) -> dict[str, torch.Tensor]:
        """Mean gradient of CLIP's cross-entropy over the task's images w.r.t. every adapted weight (out x in).

        The text embeddings of the task's classes do not depend on the image, so the text encoder runs once:
        the gradient reaching the embeddings is summed over all batches, then sent back through it in one pass.
        """
        weights = list(self.weight_deltas)
        originals = [self._weights[key] for key in weights]
        for weight in originals:
            weight.requires_grad_(True)
            weight.grad = None
        try:
            with torch.enable_grad():
                embeddings = self.class_embeddings(task.classes)
                detached = embeddings.detach().requires_grad_(True)
                images_seen = torch.zeros((), dtype=torch.float64, device=self.device)
                for images, labels in data.batches():
                    logits = clip_logits(self.backbone(images), detached, self.backbone.logit_scale)
                    F.cross_entropy(logits, labels - task.known_classes, reduction="sum").backward()
                    images_seen += len(labels)
                embeddings.backward(detached.grad)
            count = data.all_reduce_sum(images_seen)
            return {
                key: data.all_reduce_sum(weight.grad.float()) / count.float() for key, weight in zip(weights, originals)
            }
        finally:
            for weight in originals:
                weight.requires_grad_(False)
                weight.grad = None

    def lora_from_gradient(self, gradient: torch.Tensor, basis: torch.Tensor) -> LoRA:
        """A, B from the residual gradient's low-rank SVD; A frozen (down = Aᵀ), B trained (up = Bᵀ).

        A = U[:, :r] and B = AᵀĜ, which is the reference's diag(S[:r]) V[:, :r]ᵀ. Where Ĝ has rank below r
        (a tiny task), svd_lowrank's surplus columns of U are arbitrary and may lean into the protected
        subspace, so A is projected off P (twice, to working precision) and re-orthonormalised; otherwise
        this changes nothing.

        Args:
            gradient: the target's (out x in) gradient in PyTorch layout; G is its transpose.
            basis: the protected (in x k) basis.
        """
        rank = self.params.rank
        with torch.autocast(device_type=gradient.device.type, enabled=False):
            residual = project_off(gradient.T.float(), basis.float())
            oversampled = min(self.params.svd_oversampling * rank, *residual.shape)
            left, _, _ = torch.svd_lowrank(residual, q=oversampled, niter=self.params.svd_iterations)
            directions, triangular = torch.linalg.qr(project_off(project_off(left[:, :rank], basis), basis))
            directions = directions * torch.sign(torch.diagonal(triangular)).where(torch.diagonal(triangular) != 0, 1.0)
            lora = LoRA(residual.shape[0], residual.shape[1], rank, self.scale, down_init="zeros", train_down=False)
            lora.assign(directions.T, residual.T @ directions)
        return lora.to(self.device)

    def new_loras(self, task: TaskInfo, data: TaskData) -> dict[str, LoRA]:
        if not self.protected:
            self.protect_pretrained_weights()
        return self.loras_from_gradients(self.estimate_gradients(task, data))

    @torch.no_grad()
    def loras_from_gradients(self, gradients: dict[str, torch.Tensor]) -> dict[str, LoRA]:
        """Every target's LoRA from its residual gradient, with the function-preserving offset applied: the
        merged delta loses (alpha/r) (A B₀)ᵀ, so the adapted model equals the merged one before the first step."""
        loras = {}
        for target in self.targets:
            lora = self.lora_from_gradient(gradients[target.weight_key][target.rows], self.bases[target.key].value)
            self.weight_deltas[target.weight_key].merged[target.rows] -= lora.delta()
            loras[target.key] = lora
        return loras

    # Feature accumulation and the GPM update.

    def _feature_hooks(self, tower: str, statistics: FeatureStatistics) -> list:
        """Forward hooks recording each attention's input (q, k, v) and output before out_proj (o)."""

        def hook_for(layer: int):
            def hook(module, args, kwargs, output):
                inputs = args[0]
                statistics.add(layer, "input", inputs)
                statistics.add(layer, "context", attention_context(module, inputs, kwargs.get("attn_mask")))

            return hook

        layers = self.backbone.attention_layers()[tower]
        return [attn.register_forward_hook(hook_for(layer), with_kwargs=True) for layer, attn in enumerate(layers)]

    @torch.no_grad()
    def accumulate_features(self, task: TaskInfo, data: TaskData) -> dict[str, FeatureStatistics]:
        """One pass of the task's images through the image tower and of its class prompts through the text
        tower, recording every adapted weight's input."""
        towers = {tower: FeatureStatistics(self.params.feature_matrix) for tower in self.params.towers}
        for tower, statistics in towers.items():
            hooks = self._feature_hooks(tower, statistics)
            try:
                if tower == "visual":
                    for images in _chunks(data, self.params.feature_batch_size):
                        self.backbone(images)
                else:
                    selected = self.text_classifier.prompt_class
                    in_task = (selected >= task.known_classes) & (selected < task.total_classes)
                    self.backbone.encode_text(self.text_classifier.tokens[in_task])
            finally:
                for hook in hooks:
                    hook.remove()
        return towers

    @torch.no_grad()
    def grow_bases(self, statistics: dict[str, FeatureStatistics], data: TaskData) -> None:
        """The GPM update of every protected basis with the Gram matrix of its weight's inputs."""
        grams: dict[tuple[str, int, str], torch.Tensor] = {}
        for target in self.targets:
            kind = "context" if target.role == "o" else "input"
            key = (target.tower, target.layer, kind)
            if key not in grams:
                grams[key] = statistics[target.tower].gram_of(target.layer, kind, data)
            basis = self.bases[target.key]
            basis.value = gpm_update(basis.value, grams[key], self.params.feature_threshold).to(self.device)

    @torch.no_grad()
    def end_task(self, task: TaskInfo, data: TaskData) -> None:
        super().end_task(task, data)
        self.grow_bases(self.accumulate_features(task, data), data)

    def load_learned_state(self, state: dict[str, torch.Tensor], finished) -> None:
        """As the base method, after giving every basis the width it has in `state`."""
        for key, basis in self.bases.items():
            saved = state.get(f"bases.{key}.value")
            if saved is not None and saved.ndim == 2:
                basis.value = basis.value.new_zeros(basis.value.shape[0], saved.shape[1])
        super().load_learned_state(state, finished)


def normalized_class_means(data: TaskData, feature_fn, first_class: int, num_classes: int) -> torch.Tensor:
    """KeepLoRA+'s initial classifier: per class, the mean of the L2-normalised features, normalised again."""
    means = class_means(data, lambda images: F.normalize(feature_fn(images).float(), dim=-1), first_class, num_classes)
    return F.normalize(means, dim=-1)


class KeepLoRAPlusParams(KeepLoRAParams):
    classifier_scale: float = Field(30.0, gt=0, description="scale of the per-dataset cosine classifier")


class KeepLoRAPlus(KeepLoRA):
    """KeepLoRA with a per-dataset cosine classifier added to the zero-shot logits of trained datasets."""

    name = "keeplora-plus"
    Params = KeepLoRAPlusParams

    def __init__(self, backbone, params: KeepLoRAPlusParams):
        super().__init__(backbone, params)
        self.classifiers = nn.ModuleDict()

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        if str(task.index) not in self.classifiers:
            head = CosineLinear(
                self.backbone.feature_dim, task.num_new_classes, learn_sigma=False, sigma=self.params.classifier_scale
            )
            self.classifiers[str(task.index)] = head.to(self.device)

    def prepare_task(self, task: TaskInfo, data: TaskData) -> None:
        super().prepare_task(task, data)
        with torch.no_grad():
            means = normalized_class_means(data, self.image_features, task.known_classes, task.num_new_classes)
            self.classifiers[str(task.index)].weight.copy_(means)

    def task_logits(self, features: torch.Tensor, task: TaskInfo) -> torch.Tensor:
        return super().task_logits(features, task) + self.classifiers[str(task.index)](features).float()

    def classifier_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The classifiers of every trained task side by side: one column per seen class."""
        return torch.cat([head(features).float() for head in self.classifiers.values()], dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        features = self.image_features(images)
        logits = self.zero_shot_logits(features, range(self.seen_classes))
        return logits + self.classifier_logits(features) if len(self.classifiers) else logits

    @torch.no_grad()
    def predict_task(self, images: torch.Tensor, task: TaskInfo) -> torch.Tensor:
        self.register_classes(task)
        features = self.image_features(images)
        logits = self.zero_shot_logits(features, task.classes)
        if task.total_classes <= self.seen_classes and str(task.index) in self.classifiers:
            logits = logits + self.classifiers[str(task.index)](features).float()
        return logits
