"""CL-LoRA: He, Duan and Zhu, "Continual Low-Rank Adaptation for Rehearsal-Free Class-Incremental Learning",
CVPR 2025, arXiv 2505.24816, as the official implementation computes it.

LoRA adapts q and v of a stock timm ViT: the update is added to the fused qkv projection's output (the
reference splits qkv into three layers; the arithmetic is the same), without scaling, with the
down-projection initialised as Qᵀ of the QR of a U[0, 1) matrix and the up-projection at zero. The first
half of the blocks holds task-shared adapters (down frozen, up trained on every task); the second half holds
a fresh set of task-specific adapters per task (both factors trained), whose outputs are multiplied by the
task's learnable block weights w^t (3 x blocks, U(0.5, 1.5); rows q, k, v, the k row unused).

Training task t: cross-entropy through a per-task cosine proxy head on the task's classes and, for t > 0,
* early-exit knowledge distillation: the proxy head on the final-norm CLS token after the last shared block,
  with the current shared adapters (student) and with their copy from the end of task t-1 (teacher):
  soft cross-entropy at temperature 2, weight 5, no T² factor, no detach of the teacher logits;
* gradient reassignment: the distillation gradient of every shared up-projection is scaled row i by
  ω_i = out · ‖U_teacher[i]‖ / Σ_k ‖U_teacher[k]‖ (the teacher's row norms, mean 1);
* the mean |cosine| between w^t and each older w^τ, weight 1e-4.
Each batch takes two optimizer steps (the engine's training stages): one on the reassigned distillation
gradient, one on cross-entropy + orthogonality. After each task, class prototypes (mean final feature of the
task's training images under test transforms) are stored and never recomputed, and the task's adapters and
w^t are frozen. Prediction, without task identity: for every stored task i, the ViT with the latest shared
adapters and task i's adapters × w^i; cosine logits against task i's prototypes; argmax over all classes.

Departures from the reference, each behind a named option:

* `ce_gradient`. The reference builds the cross-entropy graph, steps on the distillation gradient, then
  back-propagates the cross-entropy through the graph built before that step. Current PyTorch refuses this
  (the optimizer step modified saved parameters in place: the RuntimeError of the reference's issues #1 and
  #4; its authors run torch 2.0.1, which accepts it). Our reading of why 2.0.1 accepts it: its foreach SGD
  update did not bump the parameters' version counters, so the second gradient there is taken with the
  activations of the pre-step parameters θ0 but reads, inside the backward, the post-step values θ1 of the
  parameters the graph saved by reference (proxy head weight and sigma, shared up-projections).
  "before_kd_step" (default) builds the cross-entropy graph at θ0 on copies of the parameters, so the step
  cannot touch it: the second step applies ∇(L_ce + L_orth)(θ0), which differs from that arithmetic only in
  those in-backward parameter reads (θ0 instead of θ1, one SGD step apart). "after_kd_step" recomputes the
  forward after the first step and applies ∇(L_ce + L_orth)(θ1): ordinary sequential steps, activations
  included. Both cost the same two forward passes per batch as the reference; "before_kd_step" holds the
  cross-entropy graph over the first step, as the reference does (with gradient accumulation: the graphs
  of all micro-batches of a step).
* `inference`. "shared_prefix" (default) runs the blocks before the first task-specific block once per
  image (they are identical for every task) and the remaining blocks for all stored tasks in batched passes;
  "per_task" runs the whole ViT once per stored task as the reference does. Both give the same logits.

Other differences that do not change the arithmetic: the teacher pass runs without autograd (its adapters
and the backbone are frozen; the proxy head still receives the teacher-side gradient); the prototype
classifier computes only the diagonal blocks the reference reads from its (classes x 768·T) matrix. If the
teacher's up-projection is all zero (nothing trained before), reassignment leaves the gradient unchanged
instead of dividing by zero. Under DDP (the reference uses DataParallel) both steps of a batch are
all-reduced and a run matches one process's.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ntkcl.errors import BadInputError
from ntkcl.methods.base import (
    ContinualMethod,
    MethodParams,
    StepOutput,
    TaskData,
    TaskInfo,
    batch_accuracy,
    class_means,
)
from ntkcl.models.backbone import FUSED_QKV_ATTENTION, PRE_NORM_BLOCKS, VIT_TOKENS, Backbone, BlockForward
from ntkcl.models.heads import CosineLinear, PrototypeClassifier
from ntkcl.models.lora import LoRA, StackedLoRA, lora_block_forward, pack_qkv, run_blocks_for_tasks

DISTILLATION_STAGE = "kd"
CROSS_ENTROPY_STAGE = "ce"
BLOCK_WEIGHT_INIT = (0.5, 1.5)
Q_ROW, V_ROW = 0, 2  # rows of the block weights; the k row (1) is never used by the forward pass


class CLLoRAParams(MethodParams):
    """Hyper-parameters; defaults are the official implementation's (rank: its ImageNet-R/A and VTAB value)."""

    rank: int = Field(10, ge=1, description="LoRA rank (ffn_num): 8 for CIFAR-100, 10 for the other streams")
    shared_blocks: list[int] | None = Field(None, description="blocks with task-shared adapters; default first half")
    specific_blocks: list[int] | None = Field(
        None, description="blocks with task-specific adapters; default second half"
    )
    kd_weight: float = Field(5.0, ge=0, description="weight of the early-exit distillation; 0 drops its step")
    kd_temperature: float = Field(2.0, gt=0)
    gradient_reassignment: bool = Field(True, description="scale the distillation gradient by teacher row norms")
    orth_weight: float = Field(1e-4, ge=0, description="weight of the block-weight orthogonality term")
    ce_gradient: Literal["before_kd_step", "after_kd_step"] = Field(
        "before_kd_step",
        description="parameters the second step's gradient is taken at: those before the distillation step "
        "(the reference's graph, on parameter copies) or after it (forward recomputed)",
    )
    inference: Literal["shared_prefix", "per_task"] = Field(
        "shared_prefix",
        description="shared_prefix: blocks before the specific ones once per image, the rest batched over "
        "tasks; per_task: the whole ViT once per stored task (the reference)",
    )
    inference_rows: int = Field(1024, ge=1, description="most (task, image) pairs in one batched pass")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-(1/B) Σ_b Σ_c softmax(z_T / T)_c · log softmax(z_s / T)_c (no T² factor, teacher not detached)."""
    teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    return -(teacher * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(dim=1).mean()


def reassignment_weights(teacher_up: torch.Tensor) -> torch.Tensor:
    """ω_i = rows · ‖U[i, :]‖ / Σ_k ‖U[k, :]‖ for an (out x rank) up-projection: its row norms, mean 1."""
    norms = teacher_up.detach().float().norm(dim=1)
    total = norms.sum()
    if total == 0:
        return torch.ones_like(norms)
    return norms.numel() * norms / total


def block_weight_orthogonality(current: torch.Tensor, previous: list[torch.Tensor]) -> torch.Tensor:
    """(1/t) Σ_{τ<t} |cos(vec(w^t), vec(w^τ))| over the t older tasks' block weights (0 without any)."""
    if not previous:
        return current.new_zeros(())
    mine = F.normalize(current.flatten(), dim=0)
    older = F.normalize(torch.stack([weights.flatten() for weights in previous]), dim=1)
    return (older @ mine).abs().mean()


def shared_adapters(dim: int, rank: int, num_blocks: int) -> nn.ModuleDict:
    """q and v adapters of the shared blocks: frozen random-orthogonal down, trained up."""
    return nn.ModuleDict(
        {name: nn.ModuleList(LoRA(dim, dim, rank, train_down=False) for _ in range(num_blocks)) for name in "qv"}
    )


class TaskAdapters(nn.Module):
    """One task's specific adapters: q and v LoRA in each specific block, and the block weights w (3 x blocks)."""

    def __init__(self, dim: int, rank: int, num_blocks: int):
        super().__init__()
        self.q = nn.ModuleList(LoRA(dim, dim, rank) for _ in range(num_blocks))
        self.v = nn.ModuleList(LoRA(dim, dim, rank) for _ in range(num_blocks))
        self.block_weights = nn.Parameter(torch.empty(3, num_blocks).uniform_(*BLOCK_WEIGHT_INIT))

    def qkv_update(self, position: int, normed: torch.Tensor) -> dict[str, torch.Tensor]:
        """w[q, j]·Δq(x) and w[v, j]·Δv(x) for the j-th specific block."""
        weights = self.block_weights
        return {
            "q": weights[Q_ROW, position] * self.q[position](normed),
            "v": weights[V_ROW, position] * self.v[position](normed),
        }


def stacked_task_updates(tasks: list[TaskAdapters], specific_blocks: list[int]) -> dict[int, dict[str, StackedLoRA]]:
    """The specific adapters of `tasks`, stacked per block, each scaled by its task's block weight."""
    updates = {}
    for position, block in enumerate(specific_blocks):
        updates[block] = {
            name: StackedLoRA.stack(
                [getattr(task, name)[position] for task in tasks],
                torch.stack([task.block_weights[row, position] for task in tasks]),
            )
            for name, row in (("q", Q_ROW), ("v", V_ROW))
        }
    return updates


class _CrossEntropyStep(nn.Module):
    """The method's cross-entropy step as a module call, so `torch.func.functional_call` can run it on copies."""

    def __init__(self, method: CLLoRA):
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        return self.method._cross_entropy_step(images, labels)


class CLLoRA(ContinualMethod):
    name = "cl-lora"
    Params = CLLoRAParams
    transient = ("proxy_head", "teacher")
    # Backbone passes whose adapters come in as arguments: the same graph for every task's adapters.
    compile_targets = ("task_feature", "early_exit_feature")
    required_backbone_features = (VIT_TOKENS, PRE_NORM_BLOCKS, FUSED_QKV_ATTENTION)
    citation = (
        "@inproceedings{he2025cllora, title={Continual Low-Rank Adaptation for Rehearsal-Free Class-Incremental "
        "Learning}, author={He, Jiangpeng and Duan, Zhihao and Zhu, Fengqing}, booktitle={CVPR}, pages={30534--30544}, "
        "year={2025}, note={arXiv:2505.24816}}"
    )

    def __init__(self, backbone: Backbone, params: CLLoRAParams):
        super().__init__(backbone, params)
        self.shared_blocks, self.specific_blocks = self._block_split(backbone, params)
        dim = backbone.embed_dim
        if params.rank > dim:
            raise BadInputError(f"method.params.rank={params.rank} exceeds the width {dim} of {backbone.name}")
        self.shared = shared_adapters(dim, params.rank, len(self.shared_blocks))
        self.tasks = nn.ModuleList()
        self.prototypes = PrototypeClassifier(dim)
        self.proxy_head: CosineLinear | None = None
        self.teacher: nn.ModuleDict | None = None
        # Per-task values rebuilt exactly by begin_task from the saved state (out of checkpoints and DDP buffers).
        self._reassignment: list[torch.Tensor] = []
        self._task_sizes: list[int] = []
        self._task: TaskInfo | None = None
        # Second-step outputs built during the distillation stage (ce_gradient="before_kd_step"), first in first
        # out, so that micro-batches of one step each get their own.
        self._held_cross_entropy: deque[StepOutput] = deque()

    @staticmethod
    def _block_split(backbone: Backbone, params: CLLoRAParams) -> tuple[list[int], list[int]]:
        depth = len(backbone.blocks)
        shared = list(range(depth // 2)) if params.shared_blocks is None else params.shared_blocks
        specific = list(range(depth // 2, depth)) if params.specific_blocks is None else params.specific_blocks
        for field, blocks in (("shared_blocks", shared), ("specific_blocks", specific)):
            if not blocks or blocks != sorted(set(blocks)) or blocks[0] < 0 or blocks[-1] >= depth:
                raise BadInputError(
                    f"method.params.{field}={blocks} must be increasing, distinct block indices of "
                    f"{backbone.name}'s {depth} blocks"
                )
        if shared[-1] >= specific[0]:
            raise BadInputError(f"method.params.shared_blocks={shared} must all come before specific_blocks={specific}")
        return shared, specific

    # ----------------------------------------------------------------------------------------- features
    def _block_forward(self, shared: nn.ModuleDict, task: TaskAdapters | None) -> BlockForward:
        """Shared blocks with `shared`'s adapters, specific blocks with `task`'s (None: unchanged)."""
        dim = self.backbone.embed_dim
        shared_position = {block: position for position, block in enumerate(self.shared_blocks)}
        specific_position = {block: position for position, block in enumerate(self.specific_blocks)}

        def update(index: int, normed: torch.Tensor) -> torch.Tensor | None:
            if index in shared_position:
                position = shared_position[index]
                return pack_qkv(dim, q=shared["q"][position](normed), v=shared["v"][position](normed))
            if task is not None and index in specific_position:
                return pack_qkv(dim, **task.qkv_update(specific_position[index], normed))
            return None

        return lora_block_forward(update)

    def task_feature(self, images: torch.Tensor, task: TaskAdapters) -> torch.Tensor:
        """f(x): the final-norm CLS token with the current shared adapters and `task`'s specific adapters."""
        return self.backbone(images, self._block_forward(self.shared, task))

    def early_exit_feature(self, images: torch.Tensor, shared: nn.ModuleDict) -> torch.Tensor:
        """h(x; S): the final norm's CLS token after the last shared block, with shared adapters `shared`."""
        tokens = self.backbone.embed(images)
        tokens = self.backbone.run_blocks(tokens, self._block_forward(shared, None), stop=self.shared_blocks[-1] + 1)
        return self.backbone.pool(tokens)

    def stored_task_features(self, images: torch.Tensor) -> torch.Tensor:
        """(T, B, D): f_i(x) for every finished task i (`inference` decides how they are computed)."""
        finished = list(self.tasks[: len(self._finished_sizes())])
        if self.params.inference == "per_task":
            return torch.stack([self.task_feature(images, task) for task in finished])
        first_specific = self.specific_blocks[0]
        prefix = self.backbone.run_blocks(
            self.backbone.embed(images), self._block_forward(self.shared, None), stop=first_specific
        )
        per_pass = max(1, self.params.inference_rows // len(images))
        features = []
        for start in range(0, len(finished), per_pass):
            chunk = finished[start : start + per_pass]
            updates = stacked_task_updates(chunk, self.specific_blocks)
            tokens = run_blocks_for_tasks(self.backbone.blocks, prefix, updates, start=first_specific)
            features.append(self.backbone.pool(tokens.flatten(0, 1)).view(len(chunk), len(images), -1))
        return torch.cat(features)

    # ------------------------------------------------------------------------------------------- hooks
    def begin_task(self, task: TaskInfo) -> None:
        self._task = task
        dim, rank = self.backbone.embed_dim, self.params.rank
        for finished in self.tasks:
            finished.requires_grad_(False)
        self.teacher = None
        self._reassignment = []
        self._held_cross_entropy.clear()
        if not task.is_first:
            # The shared adapters as the previous task left them: the distillation teacher of this task.
            self.teacher = copy.deepcopy(self.shared).requires_grad_(False)
            self._reassignment = [reassignment_weights(lora.up) for lora in self._teacher_ups()]
        self.tasks.append(TaskAdapters(dim, rank, len(self.specific_blocks)).to(self.device))
        self.proxy_head = CosineLinear(dim, task.num_new_classes).to(self.device)
        self.prototypes.grow(task.total_classes - self.prototypes.num_classes)
        self._task_sizes.append(task.num_new_classes)

    def _teacher_ups(self) -> list[LoRA]:
        return [*self.teacher["q"], *self.teacher["v"]]

    def _shared_loras(self) -> list[LoRA]:
        return [*self.shared["q"], *self.shared["v"]]

    def training_stages(self) -> tuple[str, ...]:
        if self._task is None or self._task.is_first or self.params.kd_weight == 0:
            return (CROSS_ENTROPY_STAGE,)
        return (DISTILLATION_STAGE, CROSS_ENTROPY_STAGE)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, stage: str = CROSS_ENTROPY_STAGE) -> StepOutput:
        if stage == DISTILLATION_STAGE:
            if self.params.ce_gradient == "before_kd_step":
                # The second step's graph, built now on copies of the trainable parameters: the distillation
                # step updates the parameters in place and would otherwise invalidate what the graph saved.
                copies = {f"method.{name}": p.clone() for name, p in self.named_parameters() if p.requires_grad}
                held = torch.func.functional_call(_CrossEntropyStep(self), copies, (images, labels))
                self._held_cross_entropy.append(held)
            return self._distillation_step(images)
        if self._held_cross_entropy:
            return self._held_cross_entropy.popleft()
        return self._cross_entropy_step(images, labels)

    def _cross_entropy_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        local = labels - self._task.known_classes
        current = self.tasks[-1]
        logits = self.proxy_head(self.task_feature(images, current))
        cross_entropy = F.cross_entropy(logits.float(), local)
        older = [task.block_weights for task in self.tasks[:-1]]
        orthogonality = block_weight_orthogonality(current.block_weights, older)
        accuracy = batch_accuracy(logits, local)
        logs = {"ce": cross_entropy.detach(), "orth": orthogonality.detach(), "train_acc": accuracy.detach()}
        return StepOutput(cross_entropy + self.params.orth_weight * orthogonality, logs)

    def _distillation_step(self, images: torch.Tensor) -> StepOutput:
        student = self.early_exit_feature(images, self.shared)
        with torch.no_grad():
            teacher = self.early_exit_feature(images, self.teacher)
        kd = distillation_loss(self.proxy_head(student), self.proxy_head(teacher), self.params.kd_temperature)
        return StepOutput(self.params.kd_weight * kd, {"kd": kd.detach()})

    def adjust_gradients(self, stage: str) -> None:
        if stage != DISTILLATION_STAGE:
            return
        reached = {id(lora.up) for lora in self._shared_loras()} | {id(p) for p in self.proxy_head.parameters()}
        for parameter in self.parameters():
            if id(parameter) not in reached:
                # The distillation loss does not reach it; under DDP it may hold an all-reduced zero, which
                # would still move it through momentum and weight decay at this step.
                parameter.grad = None
        if not self.params.gradient_reassignment:
            return
        for lora, weights in zip(self._shared_loras(), self._reassignment, strict=True):
            if lora.up.grad is not None:
                lora.up.grad.mul_(weights.to(lora.up.grad).unsqueeze(1))

    @torch.no_grad()
    def end_task(self, task: TaskInfo, data: TaskData) -> None:
        current = self.tasks[-1]
        means = class_means(
            data, lambda images: self.task_feature(images, current), task.known_classes, task.num_new_classes
        )
        self.prototypes.set_rows(task.known_classes, means)
        self.seen_classes = task.total_classes

    def _finished_sizes(self) -> list[int]:
        """Class counts of the tasks whose prototypes exist (those up to `seen_classes`)."""
        sizes, total = [], 0
        for size in self._task_sizes:
            if total + size > self.seen_classes:
                break
            sizes.append(size)
            total += size
        return sizes

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.prototypes.per_task(self.stored_task_features(images), self._finished_sizes())
