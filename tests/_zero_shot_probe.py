"""A method that classifies any task from its class names, standing in for a CLIP method in engine tests.

Each class name is embedded as a fixed random vector seeded by the name's CRC-32 (the "text encoder");
images are the frozen backbone's features through a trainable square projection (identity at start);
logits are cosine similarities. It predicts tasks it has never trained, like a zero-shot CLIP classifier.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ntkcl.methods.base import ContinualMethod, StepOutput, TaskInfo


class ZeroShotProbe(ContinualMethod):
    name = "zero-shot-probe"
    zero_shot = True
    mixed_task_data = True  # it trains over the whole stream's label space

    def __init__(self, backbone, params):
        super().__init__(backbone, params)
        self.projection = nn.Linear(backbone.embed_dim, backbone.embed_dim, bias=False)
        nn.init.eye_(self.projection.weight)

    def _text(self, task: TaskInfo) -> torch.Tensor:
        rows = []
        for name in task.class_names:
            generator = torch.Generator().manual_seed(zlib.crc32(f"{task.templates[0].format(name)}".encode()))
            rows.append(torch.randn(self.backbone.embed_dim, generator=generator))
        return F.normalize(torch.stack(rows), dim=1).to(self.device)

    def _logits(self, images: torch.Tensor, task: TaskInfo) -> torch.Tensor:
        features = F.normalize(self.projection(self.backbone(images)), dim=1)
        return 10.0 * features @ self._text(task).T

    def begin_task(self, task: TaskInfo) -> None:
        """Nothing grows: every class is known from its name."""

    def training_step(self, images, labels) -> StepOutput:
        logits = torch.cat([self._logits(images, task) for task in self.stream_tasks], dim=1)
        loss = F.cross_entropy(logits.float(), labels)
        return StepOutput(loss, {"loss": loss.detach()})

    def predict_task(self, images: torch.Tensor, task: TaskInfo) -> torch.Tensor:
        return self._logits(images, task)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        seen = [task for task in self.stream_tasks if task.total_classes <= self.seen_classes]
        return torch.cat([self._logits(images, task) for task in seen], dim=1)
