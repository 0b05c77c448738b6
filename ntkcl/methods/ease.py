"""EASE: Zhou, Sun, Ye and Zhan, "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning", CVPR 2024, arXiv 2403.12030, as the official implementation (LAMDA-PILOT's `ease` learner) computes it.

Every task trains its own set of bottleneck adapters (AdaptFormer, parallel to each block's MLP: bottleneck 64,
scale 0.1, dropout 0.1; `models.adapters`) on the frozen backbone, with cross-entropy through a cosine proxy head
(learnable scale, initialised at 1) on the task's classes; the adapters are then frozen. Each adapter set spans a
feature subspace: an image's feature is the concatenation of its CLS features under every adapter set (and,
with `use_init_ptm`, the plain pre-trained model's first).

After task t, the classifier holds one prototype per (class, subspace):

* the task's classes get their class-mean feature (training images, test transforms) in every subspace;
* the classes of an older task i get a prototype in each newer subspace j (i < j ≤ t) by the semantic-guided
  complement: with the "new" classes N_j (those of tasks j..t, which have real prototypes in subspace j),
  p̂_c^(j) = Σ_{n ∈ N_j} softmax_n(cos(p_c^(i), p_n^(i))) p_n^(j), the similarity measured in task i's subspace
  (`complement = "all_later"`, the reference's `recalc_sim`, recomputed after every task). `"latest"` (its other
  branch) fills only the newest subspace from the newest task's classes and keeps the earlier complements.

Prediction, without task identity (`reweight`): the logit of class c of task i is
Σ_s w_s cos(f^(s), p_c^(s)) with w = 1 in task i's own subspace, α / t in the other adapter subspaces (t: the
index of the last trained task) and β in the pre-trained one; the classifier's scale stays at its initial 1
(the reference never trains it). Without `reweight`, one cosine between the concatenated vectors.

The subspaces share the frozen backbone, so every multi-subspace pass (prototypes, prediction) runs the T (+1)
adapter sets as one batched pass over stacked copies of the batch (`adapter_block_forward` with several sets):
T (+1) backbone passes per test image, one per training image.

Departures: heads are sized by each task's class count (the reference assumes `init_cls` then `increment`
classes per task); the reference's exemplar (`use_old_data`), diagonal-only (`use_diagonal`) and single-adapter
(`moni_adam`) variants are not offered, none is used by its benchmark configurations.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ntkcl.methods.base import (
    ContinualMethod,
    MethodParams,
    StepOutput,
    TaskData,
    TaskInfo,
    class_means,
    own_class_cross_entropy,
)
from ntkcl.models.adapters import BottleneckAdapter, adapter_block_forward
from ntkcl.models.backbone import PRE_NORM_BLOCKS, VIT_TOKENS, Backbone
from ntkcl.models.heads import CosineLinear


class EASEParams(MethodParams):
    """Hyper-parameters; defaults are the official CIFAR-100 / ImageNet-R / ImageNet-A configurations."""

    bottleneck: int = Field(64, ge=1, description="adapter hidden width (ffn_num): 64, 16 on VTAB")
    adapter_scale: float = Field(0.1, description="adapter output multiplier")
    adapter_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the adapter bottleneck")
    alpha: float = Field(0.1, ge=0, description="weight of the other tasks' subspaces at inference (divided by t)")
    beta: float = Field(0.0, ge=0, description="weight of the pre-trained model's subspace (with use_init_ptm)")
    use_init_ptm: bool = Field(False, description="add the plain pre-trained model's feature as a subspace")
    complement: Literal["all_later", "latest"] = Field(
        "all_later",
        description="all_later: recompute old classes in every newer subspace (recalc_sim); latest: only the newest",
    )
    reweight: bool = Field(True, description="subspace-weighted logits (use_reweight); false: one plain cosine")
    inference_rows: int = Field(1024, ge=1, description="most (subspace, image) pairs in one batched pass")


def semantic_complement(old_own: torch.Tensor, new_own: torch.Tensor, new_target: torch.Tensor) -> torch.Tensor:
    """Prototypes of old classes in a subspace they were never trained in (EASE's semantic-guided complement).

    Args:
        old_own: (n_old, d) the old classes' prototypes in their own subspace.
        new_own: (n_new, d) the new classes' prototypes in that same subspace.
        new_target: (n_new, d) the new classes' prototypes in the target subspace.

    Returns:
        (n_old, d): softmax over new classes of cos(old, new), times the new classes' target prototypes.
    """
    similarity = F.cosine_similarity(old_own.unsqueeze(1), new_own.unsqueeze(0), dim=-1)
    return F.softmax(similarity, dim=1) @ new_target


def subspace_weights(task_sizes: list[int], use_init_ptm: bool, alpha: float, beta: float) -> torch.Tensor:
    """(classes x subspaces) weights of the reweighted logits: 1 in a class's own subspace, alpha / t in the other
    adapter subspaces (t = number of tasks - 1), beta in the pre-trained one."""
    offset = int(use_init_ptm)
    last = len(task_sizes) - 1
    rows = []
    for task, size in enumerate(task_sizes):
        row = torch.full((offset + len(task_sizes),), alpha / last if last else 0.0, dtype=torch.float64)
        if use_init_ptm:
            row[0] = beta
        row[offset + task] = 1.0
        rows.append(row.expand(size, -1))
    return torch.cat(rows).float()


class EASE(ContinualMethod):
    name = "ease"
    Params = EASEParams
    transient = ("proxy_head",)
    required_backbone_features = (VIT_TOKENS, PRE_NORM_BLOCKS)
    citation = (
        "@inproceedings{zhou2024ease, title={Expandable Subspace Ensemble for Pre-Trained Model-Based "
        "Class-Incremental Learning}, author={Zhou, Da-Wei and Sun, Hai-Long and Ye, Han-Jia and Zhan, De-Chuan}, "
        "booktitle={CVPR}, pages={23554--23564}, year={2024}, note={arXiv:2403.12030}}"
    )

    def __init__(self, backbone: Backbone, params: EASEParams):
        super().__init__(backbone, params)
        self.adapters = nn.ModuleList()
        self.register_buffer("prototypes", torch.zeros(0, 0, backbone.feature_dim))
        self.proxy_head: CosineLinear | None = None
        self._task_sizes: list[int] = []
        self._task: TaskInfo | None = None

    @property
    def num_subspaces(self) -> int:
        return int(self.params.use_init_ptm) + len(self.adapters)

    def _new_adapters(self) -> nn.ModuleList:
        params, dim = self.params, self.backbone.embed_dim
        return nn.ModuleList(
            BottleneckAdapter(dim, params.bottleneck, params.adapter_scale, params.adapter_dropout)
            for _ in self.backbone.blocks
        )

    # ----------------------------------------------------------------------------------------- features
    def subspace_features(self, images: torch.Tensor, tasks: int) -> torch.Tensor:
        """(B, S, D): the CLS feature under the pre-trained model (with `use_init_ptm`) and adapter sets 0..tasks-1,
        computed as batched passes of at most `inference_rows` (subspace, image) pairs."""
        sets = ([None] if self.params.use_init_ptm else []) + list(self.adapters[:tasks])
        tokens = self.backbone.embed(images)
        per_pass = max(1, self.params.inference_rows // len(images))
        features = []
        for start in range(0, len(sets), per_pass):
            chunk = sets[start : start + per_pass]
            stacked = tokens.repeat(len(chunk), 1, 1)
            pooled = self.backbone.pool(self.backbone.run_blocks(stacked, adapter_block_forward(*chunk)))
            features.append(pooled.view(len(chunk), len(images), -1))
        return torch.cat(features).transpose(0, 1)

    # ------------------------------------------------------------------------------------------- hooks
    def begin_task(self, task: TaskInfo) -> None:
        self._task = task
        for adapters in self.adapters:
            adapters.requires_grad_(False)
        self.adapters.append(self._new_adapters().to(self.device))
        self.proxy_head = CosineLinear(self.backbone.feature_dim, task.num_new_classes).to(self.device)
        grown = self.prototypes.new_zeros(task.total_classes, self.num_subspaces, self.prototypes.shape[2])
        grown[: self.prototypes.shape[0], : self.prototypes.shape[1]] = self.prototypes
        self.prototypes = grown
        self._task_sizes.append(task.num_new_classes)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        features = self.backbone(images, adapter_block_forward(self.adapters[-1]))
        loss, accuracy = own_class_cross_entropy(self.proxy_head(features), labels, self._task.known_classes)
        return StepOutput(loss, {"train_acc": accuracy.detach()})

    def _class_ranges(self) -> list[range]:
        starts = [sum(self._task_sizes[:i]) for i in range(len(self._task_sizes))]
        return [range(start, start + size) for start, size in zip(starts, self._task_sizes, strict=True)]

    @torch.no_grad()
    def complement(self, task: TaskInfo) -> None:
        """Prototypes of the older tasks' classes in the newer subspaces (see the module docstring)."""
        offset, ranges, prototypes = int(self.params.use_init_ptm), self._class_ranges(), self.prototypes
        for old in range(task.index):
            own = offset + old
            targets = range(old + 1, task.index + 1) if self.params.complement == "all_later" else [task.index]
            for target in targets:
                new = slice(ranges[target].start, task.total_classes)
                old_classes = slice(ranges[old].start, ranges[old].stop)
                prototypes[old_classes, offset + target] = semantic_complement(
                    prototypes[old_classes, own], prototypes[new, own], prototypes[new, offset + target]
                )

    @torch.no_grad()
    def end_task(self, task: TaskInfo, data: TaskData) -> None:
        tasks = len(self.adapters)
        means = class_means(
            data,
            lambda images: self.subspace_features(images, tasks).flatten(1),
            task.known_classes,
            task.num_new_classes,
        )
        self.prototypes[task.known_classes : task.total_classes] = means.view(
            task.num_new_classes, tasks + int(self.params.use_init_ptm), -1
        ).to(self.prototypes)
        self.complement(task)
        self.seen_classes = task.total_classes

    def _finished_tasks(self) -> int:
        total, count = 0, 0
        for size in self._task_sizes:
            if total + size > self.seen_classes:
                break
            total += size
            count += 1
        return count

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        tasks = self._finished_tasks()
        subspaces = int(self.params.use_init_ptm) + tasks
        features = self.subspace_features(images, tasks).float()
        prototypes = self.prototypes[: self.seen_classes, :subspaces]
        if not self.params.reweight:
            return F.linear(F.normalize(features.flatten(1), dim=-1), F.normalize(prototypes.flatten(1), dim=-1))
        cosines = torch.einsum("bsd,csd->bcs", F.normalize(features, dim=-1), F.normalize(prototypes, dim=-1))
        weights = subspace_weights(
            self._task_sizes[:tasks], self.params.use_init_ptm, self.params.alpha, self.params.beta
        )
        return (cosines * weights.to(cosines)).sum(dim=-1)
