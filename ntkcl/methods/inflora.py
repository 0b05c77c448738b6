"""InfLoRA: Liang and Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024,
arXiv 2404.00228, as the official implementation computes it.

LoRA adapts k and v of every block of a stock timm ViT (the update is part of the fused qkv weight, rows C..3C;
no scaling). Its down-projection A (shared by k and v) is designed before each task and frozen; only the
up-projections B (zero at the start) and the task's linear head are trained, so every update B A of the task
lies in the row space of A. Per task t:

1. feature pass: the covariance R = Σ x xᵀ / n of every block's attention input x = norm1(tokens) over all tokens
   of the task's training images, with the model as the earlier tasks left it;
2. design of A: the projection of R onto the free space of the block's DualGPM basis (R - P Pᵀ R while the
   protected basis P is the smaller one, Q Qᵀ R once the free basis Q is), and A = U[:, :r]ᵀ / √3 from its SVD,
   so A is orthogonal to the directions that earlier tasks' inputs occupy;
3. training of B and the head with cross-entropy over the task's own classes (one head per task);
4. merge: B A is folded into a dense delta of the qkv weight beside the untouched pre-trained weight;
5. feature pass with the trained model and the DualGPM update of every basis (`models.subspace.dual_gpm_update`)
   with R as the representation matrix, at the energy threshold λ_t = (λ_end - λ_start) t / T + λ_start.

Prediction, without task identity: the merged model's CLS feature through every task's head, argmax over all
classes.

Quirks of the reference kept as it computes them: the first task keeps the directions strictly below the
threshold (at least one), later tasks also the one crossing it; and the DualGPM update reads R itself as the
representation matrix, so its energies are the squared eigenvalues of the covariance, which concentrates the
energy on fewer leading directions than the token matrix's own energies (`energies = "squared"`, default;
"eigenvalues" thresholds R's eigenvalues, the energies of the token matrix X with R = X Xᵀ / n, as GPM does).

Departures, each small and named:

* Feature passes run over the task's training images under test-time transforms in fp64 (`TaskData`); the
  reference runs them over its shuffled training loader (training augmentation) in fp32.
* A is projected onto the free space once more after the SVD. This changes nothing unless the projected
  covariance has rank below r (then the reference's surplus singular vectors are arbitrary and may lean into
  the protected space).
* When the first task's protected basis already holds half the dimensions or more, the reference labels it as
  a free basis and then fails its own assertion; here it stays protected and the switch to the free complement
  follows DualGPM's rule.
* Heads are sized by each task's class count (the reference gives every task `init_cls` outputs).
* The reference's end-of-task k-means keys are never read by its prediction and are not computed. Its Adam
  runs with `CosineSchedule` (lr · cos(99 π e / (200 (K - 1)))); the presets use the engine's cosine schedule.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ntkcl.errors import BadInputError
from ntkcl.methods.base import ContinualMethod, MethodParams, StepOutput, TaskData, TaskInfo, own_class_cross_entropy
from ntkcl.models.backbone import FUSED_QKV_ATTENTION, PRE_NORM_BLOCKS, VIT_TOKENS, Backbone
from ntkcl.models.lora import LoRA, attach_weight_delta, detach_weight_delta
from ntkcl.models.subspace import dual_gpm_update, free_component, gram

DOWN_SCALE = 1 / math.sqrt(3)  # the reference's A = U[:, :r]ᵀ / √3
ADAPTED = ("k", "v")  # rows C..2C and 2C..3C of the fused qkv weight


class InfLoRAParams(MethodParams):
    """Hyper-parameters; defaults are the reference's CIFAR-100 configuration."""

    rank: int = Field(10, ge=1, description="LoRA rank r")
    threshold_start: float = Field(0.95, gt=0, le=1, description="λ_start (lamb): DualGPM energy threshold at task 0")
    threshold_end: float = Field(1.0, gt=0, le=1, description="λ_end (lame): the threshold it moves towards")
    energies: Literal["squared", "eigenvalues"] = Field(
        "squared",
        description="squared: DualGPM reads the covariance R as the representation matrix (the reference; energies "
        "are R's squared eigenvalues); eigenvalues: it reads the token matrix X (R = X Xᵀ / n), GPM's usual energies",
    )

    @model_validator(mode="after")
    def _ordered(self) -> InfLoRAParams:
        if self.threshold_end < self.threshold_start:
            raise ValueError("threshold_end must be at least threshold_start")
        return self


class DualBasis(nn.Module):
    """One block's DualGPM state: a (d x k) basis and whether it spans the free directions (else the protected)."""

    def __init__(self, dimension: int):
        super().__init__()
        self.register_buffer("value", torch.zeros(dimension, 0))
        self.register_buffer("free", torch.zeros((), dtype=torch.bool))

    def free_component(self, matrix: torch.Tensor) -> torch.Tensor:
        return free_component(matrix, self.value, bool(self.free))

    def update(self, gram_matrix: torch.Tensor, threshold: float) -> None:
        value, free = dual_gpm_update(self.value, bool(self.free), gram_matrix, threshold)
        self.value = value.to(self.value.device)
        self.free.fill_(free)


class InfLoRA(ContinualMethod):
    name = "inflora"
    Params = InfLoRAParams
    training_only = ("subspaces.",)
    required_backbone_features = (VIT_TOKENS, PRE_NORM_BLOCKS, FUSED_QKV_ATTENTION)
    citation = (
        "@inproceedings{liang2024inflora, title={InfLoRA: Interference-Free Low-Rank Adaptation for Continual "
        "Learning}, author={Liang, Yan-Shuo and Li, Wu-Jun}, booktitle={CVPR}, pages={23638--23647}, year={2024}, "
        "note={arXiv:2404.00228}}"
    )

    def __init__(self, backbone: Backbone, params: InfLoRAParams):
        super().__init__(backbone, params)
        dim = backbone.embed_dim
        if params.rank > dim:
            raise BadInputError(f"method.params.rank={params.rank} exceeds the width {dim} of {backbone.name}")
        self.weight_deltas = nn.ModuleList()
        for block in backbone.blocks:
            # A backbone adapted by an earlier method in this process starts again from the pre-trained weights.
            detach_weight_delta(block.attn.qkv, "weight")
            self.weight_deltas.append(attach_weight_delta(block.attn.qkv, "weight", [], [], keep_merged=True))
        self.subspaces = nn.ModuleList(DualBasis(dim) for _ in backbone.blocks)
        self.heads = nn.ModuleList()
        self._task: TaskInfo | None = None

    # ------------------------------------------------------------------------------------------ subspaces
    @torch.no_grad()
    def input_covariances(self, data: TaskData) -> list[torch.Tensor]:
        """R = Σ x xᵀ / n (float64, d x d) of every block's attention input over all tokens of the task's images."""
        sums: list[torch.Tensor | None] = [None] * len(self.backbone.blocks)

        def recorder(index: int):
            def hook(module, args):
                rows = args[0].reshape(-1, args[0].shape[-1])
                product = gram(rows.T)
                sums[index] = product if sums[index] is None else sums[index] + product

            return hook

        hooks = [block.attn.register_forward_pre_hook(recorder(i)) for i, block in enumerate(self.backbone.blocks)]
        tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for images, _ in data.batches():
                self.backbone(images)
                tokens += images.shape[0] * self.backbone.num_tokens
        finally:
            for hook in hooks:
                hook.remove()
        if sums[0] is None:
            raise RuntimeError("the feature pass saw no images")
        count = data.all_reduce_sum(tokens)
        return [data.all_reduce_sum(total) / count for total in sums]

    def designed_down(self, covariance: torch.Tensor, subspace: DualBasis) -> torch.Tensor:
        """A (rank x d): the leading left singular vectors of R's free component, divided by √3."""
        with torch.autocast(device_type=covariance.device.type, enabled=False):
            left, _, _ = torch.linalg.svd(subspace.free_component(covariance.double()), full_matrices=False)
            directions = subspace.free_component(left[:, : self.params.rank])
        return (directions.T * DOWN_SCALE).float().contiguous()

    # ------------------------------------------------------------------------------------------- hooks
    def begin_task(self, task: TaskInfo) -> None:
        self._task = task
        for head in self.heads:
            head.requires_grad_(False)
        self.heads.append(nn.Linear(self.backbone.feature_dim, task.num_new_classes).to(self.device))

    def prepare_task(self, task: TaskInfo, data: TaskData) -> None:
        """Design this task's A in every block from the inputs of the model the earlier tasks left."""
        covariances = self.input_covariances(data)
        dim, rank = self.backbone.embed_dim, self.params.rank
        for block, delta, subspace, covariance in zip(
            self.backbone.blocks, self.weight_deltas, self.subspaces, covariances, strict=True
        ):
            down = self.designed_down(covariance, subspace)
            loras = []
            for _ in ADAPTED:
                lora = LoRA(dim, dim, rank, down_init="zeros", train_down=False)
                lora.assign(down, torch.zeros(dim, rank))
                loras.append(lora.to(block.attn.qkv.weight.device))
            delta.replace_loras(loras, [dim, 2 * dim])

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        logits = self.heads[-1](self.backbone(images))
        loss, accuracy = own_class_cross_entropy(logits, labels, self._task.known_classes)
        return StepOutput(loss, {"train_acc": accuracy.detach()})

    def threshold(self, task: TaskInfo) -> float:
        """λ_t = (λ_end - λ_start) t / T + λ_start."""
        first, last = self.params.threshold_start, self.params.threshold_end
        return (last - first) * task.index / task.num_tasks + first

    @torch.no_grad()
    def end_task(self, task: TaskInfo, data: TaskData) -> None:
        covariances = self.input_covariances(data)
        threshold = self.threshold(task)
        for delta, subspace, covariance in zip(self.weight_deltas, self.subspaces, covariances, strict=True):
            delta.fold()
            subspace.update(gram(covariance) if self.params.energies == "squared" else covariance, threshold)
        self.seen_classes = task.total_classes

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        return torch.cat([head(features) for head in self.heads], dim=1)[:, : self.seen_classes].float()

    def load_learned_state(self, state: dict[str, torch.Tensor], finished) -> None:
        """As the base method, after giving every basis the width it has in `state` (absent from exports)."""
        for index, subspace in enumerate(self.subspaces):
            saved = state.get(f"subspaces.{index}.value")
            if saved is not None and saved.ndim == 2:
                subspace.value = subspace.value.new_zeros(subspace.value.shape[0], saved.shape[1])
        super().load_learned_state(state, finished)
