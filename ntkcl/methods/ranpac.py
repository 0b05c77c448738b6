"""RanPAC: McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel, "RanPAC: Random Projections and Pre-trained
Models for Continual Learning", NeurIPS 2023, arXiv 2307.02251.

Two phases. First-session adaptation: on the first task only, a parameter-efficient module (AdaptFormer-style
bottleneck adapters parallel to every block's MLP, as RanPAC's adapter variant) is trained with a cosine
head on that task's classes, then frozen for good. Every task, including the first: the task's training
images are embedded by the (adapted, frozen) backbone, projected by a frozen Gaussian random matrix with
ReLU (M = 10,000), and the ridge read-out is solved in closed form from Gram and cross-correlation sums
accumulated over all tasks (`ntkcl.models.heads.RandomProjectionRidge`), with λ chosen per task on a
random 80/20 split of its images. Nothing trained after the first task, so nothing is forgotten beyond
what the closed form does.

`peft="none"` skips the first phase (the random-projection head on the plain pre-trained backbone, the
paper's ablation without adaptation). On mixed training sets (VTAB-SimS) images of other tasks' classes are
left out of the first-session cross-entropy and enter the ridge head with their own labels.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ntkcl.methods.base import (
    ContinualMethod,
    MethodParams,
    StepOutput,
    TaskData,
    TaskInfo,
    gather_rows,
    indexed_features,
    own_class_cross_entropy,
)
from ntkcl.models.adapters import BottleneckAdapter, adapter_block_forward
from ntkcl.models.backbone import PRE_NORM_BLOCKS, VIT_TOKENS, Backbone, plain_block_forward
from ntkcl.models.heads import CosineLinear, RandomProjectionRidge


class RanPACParams(MethodParams):
    """Defaults follow RanPAC's ViT-B/16 adapter runs."""

    peft: Literal["adapter", "none"] = Field("adapter", description="first-session module; none = plain backbone")
    bottleneck: int = Field(64, ge=1, description="adapter hidden width (RanPAC/APER ffn_num)")
    adapter_scale: float = Field(0.1, description="adapter output multiplier")
    adapter_dropout: float = Field(0.1, ge=0, lt=1)
    projection_dim: int = Field(10_000, ge=1, description="M, width of the random projection")
    train_fraction: float = Field(0.8, gt=0, lt=1, description="fitting share of the split that chooses λ")


class RanPAC(ContinualMethod):
    name = "ranpac"
    Params = RanPACParams
    mixed_task_data = True
    required_backbone_features = (VIT_TOKENS, PRE_NORM_BLOCKS)
    transient = ("train_head",)
    training_only = tuple(f"head.{name}" for name in RandomProjectionRidge.TRAINING_ONLY)
    citation = (
        "@inproceedings{mcdonnell2023ranpac, title={RanPAC: Random Projections and Pre-trained Models for "
        "Continual Learning}, author={McDonnell, Mark D. and Gong, Dong and Parvaneh, Amin and Abbasnejad, "
        "Ehsan and van den Hengel, Anton}, booktitle={NeurIPS}, year={2023}}"
    )

    # the backbone pass (with the first task's adapters, frozen afterwards) serves every task
    compile_targets = ("features",)

    def __init__(self, backbone: Backbone, params: RanPACParams):
        super().__init__(backbone, params)
        dim = backbone.embed_dim
        self.adapters: nn.ModuleList | None = None
        self._block_forward = plain_block_forward
        if params.peft == "adapter":
            self.adapters = nn.ModuleList(
                BottleneckAdapter(dim, params.bottleneck, params.adapter_scale, params.adapter_dropout)
                for _ in backbone.blocks
            )
            self._block_forward = adapter_block_forward(self.adapters)
        self.head = RandomProjectionRidge(dim, params.projection_dim, params.train_fraction)
        self.train_head: CosineLinear | None = None
        self._split_seed = 0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images, self._block_forward)

    def begin_task(self, task: TaskInfo) -> None:
        self.head.grow_to(task.total_classes)
        # Drawn from the engine's per-task seed: the same on every process and on resume.
        self._split_seed = int(torch.randint(2**31 - 1, ()))
        adapting = task.is_first and self.adapters is not None
        if self.adapters is not None:
            self.adapters.requires_grad_(adapting)
        self.train_head = (
            CosineLinear(self.backbone.embed_dim, task.num_new_classes).to(self.device) if adapting else None
        )

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        loss, accuracy = own_class_cross_entropy(self.train_head(self.features(images)), labels, self.seen_classes)
        return StepOutput(loss, {"ce": loss.detach(), "train_acc": accuracy.detach()})

    @torch.no_grad()
    def end_task(self, task: TaskInfo, data: TaskData) -> dict:
        if self.adapters is not None:
            self.adapters.requires_grad_(False)
        self.train_head = None
        features, labels, positions = indexed_features(data, self.features)
        self.head.grow_to(int(gather_rows(data, labels, positions).max()) + 1)  # mixed sets: later tasks' labels
        ridge = self.head.learn(features, labels, positions, self._split_seed, data.all_reduce_sum)
        self.seen_classes = task.total_classes
        return {"ridge": ridge}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))[:, : self.seen_classes]

    def load_learned_state(self, state: dict[str, torch.Tensor], finished) -> None:
        # A mixed stream can have taught the head labels of tasks not reached yet: size it from the state.
        self.head.grow_to(state["head.weight"].shape[0] if "head.weight" in state else 0)
        super().load_learned_state(state, finished)
