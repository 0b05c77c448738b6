"""What the prompt-based methods (L2P, DualPrompt, CODA-Prompt, OVOR) share: the passes over the frozen
backbone, the growing linear head and the masked cross-entropy.

Forward pass of a batch: the images are embedded once; the blocks before the first prompted block run once
(without autograd) and serve both the query pass and the prompted pass; the query is the frozen model's
final-norm CLS token; the prompts chosen for it (`method.prompts_for`) are inserted by
`ntkcl.models.prompts.prompted_block_forward` in the remaining blocks. The query needs the whole frozen
model before the first prompted block can run, so a method that queries costs two backbone passes per image
(one without autograd) in training and in prediction; a method without a query (OVOR) costs one.

The head is one linear layer per task (the reference's single linear layer over all classes, whose columns
of other tasks get no gradient under its mask): training takes the cross-entropy over the current task's
classes only (the official codes' `train_mask`, logits of other classes at -inf), prediction the argmax over
every class seen.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from ntkcl.methods.base import ContinualMethod, MethodParams, StepOutput, TaskInfo, own_class_cross_entropy
from ntkcl.models.backbone import FUSED_QKV_ATTENTION, PRE_NORM_BLOCKS, VIT_TOKENS, Backbone
from ntkcl.models.prompts import InsertedPrompts, prompted_block_forward


class PromptMethod(ContinualMethod):
    """Base of the prompt methods: subclasses say which prompts a batch gets and how the feature is read."""

    required_backbone_features = (VIT_TOKENS, PRE_NORM_BLOCKS, FUSED_QKV_ATTENTION)
    uses_query = True
    compile_targets = ("query_and_prefix",)

    def __init__(self, backbone: Backbone, params: MethodParams):
        super().__init__(backbone, params)
        self.heads = nn.ModuleList()
        self._task: TaskInfo | None = None

    @property
    def task_index(self) -> int:
        """Index of the task being trained (the last one begun)."""
        return len(self.heads) - 1

    @property
    @abstractmethod
    def prompted_blocks(self) -> list[int]:
        """The block indices that receive prompts (fixed for the whole stream)."""

    @abstractmethod
    def prompts_for(
        self, queries: torch.Tensor | None, batch: int, training: bool
    ) -> tuple[InsertedPrompts, StepOutput]:
        """The prompts of a batch of `batch` images from their queries (None for a method without a query), and
        the prompt loss with its logged scalars (0 at prediction)."""

    def readout(self, tokens: torch.Tensor, prompts: InsertedPrompts) -> torch.Tensor:
        """The feature the head reads from the last block's tokens (default: the final-norm CLS token)."""
        return self.backbone.pool(tokens)

    def begin_task(self, task: TaskInfo) -> None:
        self._task = task
        for head in self.heads:
            head.requires_grad_(False)
        self.heads.append(nn.Linear(self.backbone.embed_dim, task.num_new_classes).to(self.device))

    @torch.no_grad()
    def query_and_prefix(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The frozen model's query (None without one) and the tokens entering the first prompted block."""
        first = min(self.prompted_blocks)
        prefix = self.backbone.run_blocks(self.backbone.embed(images), stop=first)
        queries = self.backbone.pool(self.backbone.run_blocks(prefix, start=first)) if self.uses_query else None
        return queries, prefix

    def features(self, images: torch.Tensor, training: bool = False) -> tuple[torch.Tensor, StepOutput]:
        """The prompted feature of every image and the prompt loss."""
        queries, prefix = self.query_and_prefix(images)
        prompts, prompt_loss = self.prompts_for(queries, len(images), training)
        forward = prompted_block_forward(prompts, self.backbone.num_prefix_tokens)
        tokens = self.backbone.run_blocks(prefix, forward, start=min(self.prompted_blocks))
        return self.readout(tokens, prompts), prompt_loss

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over every class of the tasks begun so far."""
        return torch.cat([head(features) for head in self.heads], dim=1)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        features, prompt_loss = self.features(images, training=True)
        logits = self.heads[-1](features)
        cross_entropy, accuracy = own_class_cross_entropy(logits, labels, self._task.known_classes)
        logs = {"ce": cross_entropy.detach(), **prompt_loss.logs, "train_acc": accuracy.detach()}
        return StepOutput(cross_entropy + prompt_loss.loss, logs)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(images)[0])


def no_prompt_loss(reference: torch.Tensor) -> StepOutput:
    """A zero prompt loss (on `reference`'s device) with nothing to log."""
    return StepOutput(reference.new_zeros(()))
