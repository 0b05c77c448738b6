"""Sequential LoRA fine-tuning of both CLIP encoders: the forgetting bound of KeepLoRA's comparison.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) on q, k, v and the
out-projection of every attention block of the image and text towers, the placement of KeepLoRA (Luo et al.,
arXiv 2601.19659). Each task trains a fresh LoRA (Kaiming-uniform down-projection, zero up-projection, both
trained) with CLIP's cross-entropy over the task's classes, then folds it into the weights; nothing protects
what earlier tasks learned. The folded updates are kept as one dense delta per weight beside the untouched
pre-trained weight (`models.lora.WeightDelta`), which is all the method saves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ntkcl.methods.base import StepOutput, TaskData, TaskInfo, batch_accuracy
from ntkcl.methods.zero_shot import ZeroShot, ZeroShotParams
from ntkcl.models.heads import clip_logits
from ntkcl.models.lora import LoRA, attach_weight_delta, detach_weight_delta

ROLES = ("q", "k", "v", "o")


class LoRAParams(ZeroShotParams):
    rank: int = Field(16, ge=1, description="LoRA rank r")
    alpha: float = Field(1.0, gt=0, description="LoRA alpha; updates are scaled by alpha / rank")
    towers: list[Literal["visual", "text"]] = Field(
        default_factory=lambda: ["visual", "text"], min_length=1, description="encoders whose attention is adapted"
    )


@dataclass(frozen=True)
class Target:
    """One adapted projection: q, k or v (a block of rows of the fused in-projection) or o (the out-projection)."""

    tower: str
    layer: int
    role: str
    width: int

    @property
    def key(self) -> str:
        return f"{self.tower}_{self.layer}_{self.role}"

    @property
    def weight_key(self) -> str:
        return f"{self.tower}_{self.layer}_{'out_proj' if self.role == 'o' else 'in_proj'}"

    @property
    def rows(self) -> slice:
        """The rows of its weight (PyTorch out x in layout) the projection owns."""
        start = 0 if self.role == "o" else ROLES.index(self.role) * self.width
        return slice(start, start + self.width)


class SequentialLoRA(ZeroShot):
    name = "sequential-lora"
    Params = LoRAParams
    citation = (
        "@inproceedings{hu2022lora, title={LoRA: Low-Rank Adaptation of Large Language Models}, author={Hu, "
        "Edward J. and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li, Yuanzhi and Wang, Shean and "
        "Wang, Lu and Chen, Weizhu}, booktitle={ICLR}, year={2022}}"
    )

    def __init__(self, backbone, params: LoRAParams):
        super().__init__(backbone, params)
        self.scale = params.alpha / params.rank
        self.targets: list[Target] = []
        self.weight_deltas = nn.ModuleDict()
        self._weights: dict[str, nn.Parameter] = {}
        for tower, layers in backbone.attention_layers().items():
            if tower not in params.towers:
                continue
            for layer, attention in enumerate(layers):
                width = attention.embed_dim
                for kind, module, tensor in (
                    ("in_proj", attention, "in_proj_weight"),
                    ("out_proj", attention.out_proj, "weight"),
                ):
                    key = f"{tower}_{layer}_{kind}"
                    detach_weight_delta(module, tensor)
                    self.weight_deltas[key] = attach_weight_delta(module, tensor, [], [], keep_merged=True)
                    self._weights[key] = module.parametrizations[tensor].original
                self.targets += [Target(tower, layer, role, width) for role in ROLES]
        self._task: TaskInfo | None = None

    def pretrained_weight(self, target: Target) -> torch.Tensor:
        """The target's rows of the untouched pre-trained weight (out x in)."""
        return self._weights[target.weight_key][target.rows]

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self._task = task

    def new_loras(self, task: TaskInfo, data: TaskData) -> dict[str, LoRA]:
        """A fresh LoRA per target: Kaiming-uniform down-projection, zero up-projection, both trained."""
        return {
            target.key: LoRA(target.width, target.width, self.params.rank, self.scale, down_init="kaiming")
            for target in self.targets
        }

    def attach_loras(self, loras: Mapping[str, LoRA]) -> None:
        """Put each target's LoRA on its weight (replacing whatever the weight carried)."""
        for weight_key, delta in self.weight_deltas.items():
            members = [target for target in self.targets if target.weight_key == weight_key]
            delta.replace_loras([loras[t.key].to(self.device) for t in members], [t.rows.start for t in members])
        self.forget_class_embeddings()

    def prepare_task(self, task: TaskInfo, data: TaskData) -> None:
        self.attach_loras(self.new_loras(task, data))

    def task_logits(self, features: torch.Tensor, task: TaskInfo) -> torch.Tensor:
        """Training logits over the task's classes, with gradients through both encoders."""
        return clip_logits(features, self.class_embeddings(task.classes), self.backbone.logit_scale)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        task = self._task
        logits = self.task_logits(self.image_features(images), task)
        local = labels - task.known_classes
        loss = F.cross_entropy(logits.float(), local)
        accuracy = batch_accuracy(logits, local)
        return StepOutput(loss, {"train_acc": accuracy.detach()})

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every LoRA into its weight's merged delta (the model's function is unchanged)."""
        for delta in self.weight_deltas.values():
            delta.fold()
        self.forget_class_embeddings()

    @torch.no_grad()
    def end_task(self, task: TaskInfo, data: TaskData) -> None:
        self.merge()
        self.seen_classes = task.total_classes
