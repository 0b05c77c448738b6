"""Sequential fine-tuning: the forgetting lower bound of parameter-efficient continual learning.

One bottleneck adapter per block (AdaptFormer-style, as NTK-CL's channel branch) and a linear head that
grows by one slice per task are trained with cross-entropy over all seen classes on the current task's data
only: no replay, no regularisation, no prototypes, so old classes are overwritten.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ntkcl.methods.base import ContinualMethod, MethodParams, StepOutput, TaskInfo, batch_accuracy
from ntkcl.models.adapters import BottleneckAdapter, adapter_block_forward
from ntkcl.models.backbone import PRE_NORM_BLOCKS, VIT_TOKENS, Backbone


class FinetuneParams(MethodParams):
    bottleneck: int = Field(default=16, ge=1, description="adapter hidden width")
    adapter_scale: float = Field(default=0.1, description="adapter output multiplier")
    adapter_dropout: float = Field(default=0.1, ge=0, lt=1)


class Finetune(ContinualMethod):
    name = "finetune"
    Params = FinetuneParams
    required_backbone_features = (VIT_TOKENS, PRE_NORM_BLOCKS)
    compile_targets = ("features",)

    def __init__(self, backbone: Backbone, params: FinetuneParams):
        super().__init__(backbone, params)
        dim = backbone.embed_dim
        self.adapters = nn.ModuleList(
            BottleneckAdapter(dim, params.bottleneck, params.adapter_scale, params.adapter_dropout)
            for _ in backbone.blocks
        )
        self.heads = nn.ModuleList()
        self._block_forward = adapter_block_forward(self.adapters)

    def begin_task(self, task: TaskInfo) -> None:
        self.heads.append(nn.Linear(self.backbone.embed_dim, task.num_new_classes).to(self.device))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The adapted backbone's pooled feature."""
        return self.backbone(images, self._block_forward)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)
        return torch.cat([head(features) for head in self.heads], dim=1)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        logits = self._logits(images)
        loss = F.cross_entropy(logits.float(), labels)
        accuracy = batch_accuracy(logits, labels)
        return StepOutput(loss, {"loss": loss.detach(), "train_acc": accuracy.detach()})

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self._logits(images)
