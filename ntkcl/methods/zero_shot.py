"""Zero-shot CLIP: nothing is trained; every class is scored by the text embedding of its prompts.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020.
On multi-domain streams (MTIL) it is the lower bound of Last and the upper bound of Transfer: the pre-trained
model never changes, so what it knows of a dataset before training equals what it knows after. The text
classifier is built from each task's class names and prompt templates (`TaskInfo.class_names`,
`TaskInfo.templates`); like ZSCL's and KeepLoRA's MTIL code, only a dataset's first template is used unless
`templates = "all"`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ntkcl.errors import BadInputError
from ntkcl.methods.base import ContinualMethod, MethodParams, StepOutput, TaskInfo
from ntkcl.models.backbone import CLIP_TOWERS, VIT_TOKENS
from ntkcl.models.heads import TextClassifier, clip_logits

CLIP_CITATION = (
    "@inproceedings{radford2021clip, title={Learning Transferable Visual Models From Natural Language Supervision}, "
    "author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and "
    "Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and Krueger, "
    "Gretchen and Sutskever, Ilya}, booktitle={ICML}, year={2021}}"
)


class ZeroShotParams(MethodParams):
    templates: Literal["first", "all"] = Field(
        "first", description="prompt templates per class: the dataset's first (ZSCL/KeepLoRA MTIL) or all, averaged"
    )


class ZeroShot(ContinualMethod):
    """CLIP's text classifier over the classes of the stream, on a frozen CLIP.

    Subclasses that change the encoders call `forget_class_embeddings` whenever the weights change; the
    class embeddings are otherwise computed once and reused by every prediction.

    The image tower's pass (`image_features`) is the heavy work of every training step and prediction and
    does not depend on the task, so it is the compile target; which classes are scored (the text features of
    a task's prompts, KeepLoRA+'s per-dataset classifiers) is decided outside it.
    """

    name = "zero-shot"
    Params = ZeroShotParams
    zero_shot = True
    citation = CLIP_CITATION
    required_backbone_features = (VIT_TOKENS, CLIP_TOWERS)
    compile_targets = ("image_features",)

    def __init__(self, backbone, params: ZeroShotParams):
        super().__init__(backbone, params)
        self.text_classifier = TextClassifier()
        self._class_embeddings: torch.Tensor | None = None

    def begin_stream(self, tasks) -> None:
        super().begin_stream(tasks)
        for task in tasks:
            self.register_classes(task)

    def begin_task(self, task: TaskInfo) -> None:
        self.register_classes(task)

    def register_classes(self, task: TaskInfo) -> None:
        """Tokenise the prompts of the task's classes, once."""
        if self.text_classifier.has_classes(task.classes):
            return
        if len(task.class_names) != task.num_new_classes:
            raise BadInputError(f"{self.name} needs the class names of task {task.index} (the stream gives none)")
        templates = task.templates if self.params.templates == "all" else task.templates[:1]
        self.text_classifier.add_classes(task.known_classes, task.class_names, templates, self.backbone.tokenize)
        self.forget_class_embeddings()

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        raise RuntimeError(
            f"{self.name} has nothing to train; the engine skips training when no parameter is trainable"
        )

    def train(self, mode: bool = True) -> ZeroShot:
        if mode:
            self.forget_class_embeddings()
        return super().train(mode)

    def forget_class_embeddings(self) -> None:
        self._class_embeddings = None

    def class_embeddings(self, labels: range) -> torch.Tensor:
        """Normalised text embeddings of `labels`, through the text encoder as it is now (with gradients)."""
        return self.text_classifier.embeddings(self.backbone.encode_text, labels)

    @torch.no_grad()
    def _cached_embeddings(self, labels: range) -> torch.Tensor:
        """Embeddings of every registered class, computed once until the weights change; rows `labels`."""
        if self._class_embeddings is None:
            self._class_embeddings = self.class_embeddings(range(self.text_classifier.num_classes))
        return self._class_embeddings[labels.start : labels.stop]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's features of `images` in the joint embedding (not normalised)."""
        return self.backbone(images)

    def zero_shot_logits(self, features: torch.Tensor, labels: range) -> torch.Tensor:
        return clip_logits(features, self._cached_embeddings(labels), self.backbone.logit_scale)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.zero_shot_logits(self.image_features(images), range(self.seen_classes))

    @torch.no_grad()
    def predict_task(self, images: torch.Tensor, task: TaskInfo) -> torch.Tensor:
        self.register_classes(task)
        return self.zero_shot_logits(self.image_features(images), task.classes)
