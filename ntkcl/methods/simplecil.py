"""SimpleCIL: a frozen pre-trained backbone with class-mean prototypes and a cosine classifier.

Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need", arXiv 2303.07338. Nothing is trained; after each task the mean backbone
feature of each new class becomes its prototype, and prediction is the nearest prototype by cosine.
"""

from __future__ import annotations

import torch

from ntkcl.methods.base import ContinualMethod, MethodParams, StepOutput, TaskData, TaskInfo, class_means
from ntkcl.models.backbone import Backbone
from ntkcl.models.heads import PrototypeClassifier


class SimpleCIL(ContinualMethod):
    name = "simplecil"
    citation = (
        "@article{zhou2023revisiting, title={Revisiting Class-Incremental Learning with Pre-Trained Models: "
        "Generalizability and Adaptivity are All You Need}, author={Zhou, Da-Wei and Cai, Zi-Wen and "
        "Ye, Han-Jia and Zhan, De-Chuan and Liu, Ziwei}, journal={arXiv:2303.07338}, year={2023}}"
    )

    compile_targets = ("features",)

    def __init__(self, backbone: Backbone, params: MethodParams):
        super().__init__(backbone, params)
        self.classifier = PrototypeClassifier(backbone.feature_dim)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's pooled feature."""
        return self.backbone(images)

    def begin_task(self, task: TaskInfo) -> None:
        self.classifier.grow(task.total_classes - self.classifier.num_classes)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        raise RuntimeError("simplecil has nothing to train; the engine skips training when no parameter is trainable")

    @torch.no_grad()
    def end_task(self, task: TaskInfo, data: TaskData) -> None:
        means = class_means(data, self.features, task.known_classes, task.num_new_classes)
        self.classifier.set_rows(task.known_classes, means)
        self.seen_classes = task.total_classes

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))
