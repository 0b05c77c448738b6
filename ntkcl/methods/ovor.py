"""OVOR: Huang et al., "OVOR: OnePrompt with Virtual Outlier Regularization for Rehearsal-Free Class-Incremental
Learning", ICLR 2024, arXiv 2402.04129, as the official implementation (jpmorganchase/ovor) computes it.

OnePrompt: one prefix-tuning prompt per block, shared by all tasks and trained on every task, with no pool,
keys or query: L_g = 5 key and 5 value tokens in blocks 0-1, L_e = 20 key and 20 value tokens in blocks 2-4
(the reference's `--prompt_param 10 40 10`, counted there as keys and values together). One backbone pass
per image, in training and prediction. Training: cross-entropy over the current task's classes; the head
reads the final-norm CLS token.

Virtual outlier regularisation (after the prompt epochs of each task, `outlier_epochs` epochs that train the
current task's head only, on fixed features): the prompted features of the task's images, and virtual
outliers drawn as the reference's NPOS class draws them: `candidates` offsets from N(0, noise² I); among them,
the `per_class` · classes whose squared distance to the K-th nearest (L2-normalised) image feature is largest.
Each outlier epoch reshuffles the images into batches of `id_batch` and pairs them with consecutive outlier
batches of ⌊outliers / batches⌋; its loss is the cross-entropy plus
λ · (huber(relu(-LSE(z_id) - τ_id)) + huber(relu(τ_ood + LSE(z_ood)))), LSE the log-sum-exp of the current
task's logits (the energy score), λ = 0.1, τ_id = -15, τ_ood = -3, Huber with δ = 1, means over the batch.

Quirks of the official code, kept by default: the outliers are not centred on anything. `NPOS._generate`
selects boundary features but builds the candidates from the offsets alone, repeated once per boundary
feature, so the selection keeps ⌊per_class · classes / boundary⌋ distinct points, each `boundary` times.
`outlier_centre = "boundary"` centres candidate copy j on boundary feature j (the paper's description and
NPOS's). Departures, each an option or stated: the outlier epochs use the features of the task's images
under test transforms, computed once (the reference recomputes them every outlier epoch from augmented
training images), and a fresh Adam (β = 0.9, 0.999) at the constant rate `outlier_lr` (the reference
continues the task's optimizer and its quarter-cosine schedule, whose rates in the last 4 of 20 epochs at
1e-3 average 1.4e-4, the default). The outliers' random draws come from a generator seeded in `begin_task`,
so every process and a resumed run draw the same ones; under DDP every process gathers all the task's
features and runs the same head updates.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ntkcl.errors import BadInputError
from ntkcl.methods.base import MethodParams, StepOutput, TaskData, TaskInfo, gather_rows, indexed_features
from ntkcl.methods.dualprompt import check_blocks
from ntkcl.methods.prompting import PromptMethod, no_prompt_loss
from ntkcl.models.backbone import Backbone
from ntkcl.models.prompts import InsertedPrompts


class OVORParams(MethodParams):
    """Hyper-parameters; defaults are the official code's (`configs/common.yaml`, `learners/ood.py`)."""

    g_blocks: list[int] = Field([0, 1], description="blocks with the first prompt")
    g_length: int = Field(5, ge=1, description="its key tokens (and as many value tokens)")
    e_blocks: list[int] = Field([2, 3, 4], description="blocks with the second prompt")
    e_length: int = Field(20, ge=1, description="its key tokens (and as many value tokens)")
    init_scale: float = Field(1.0, gt=0, description="prompts start uniform in [0, init_scale)")
    outlier_epochs: int = Field(4, ge=0, description="head-only epochs with virtual outliers after each task")
    outlier_lr: float = Field(1.4e-4, gt=0, description="Adam rate of those epochs")
    id_batch: int = Field(128, ge=1, description="image features per outlier-epoch batch")
    knn: int = Field(50, ge=1, description="K of the K-th nearest neighbour distance")
    candidates: int = Field(600, ge=1, description="Gaussian offsets drawn per outlier epoch")
    boundary: int = Field(50, ge=1, description="boundary features (copies of the offsets)")
    per_class: int = Field(40, ge=1, description="outliers kept per class of the task")
    noise: float = Field(0.1, gt=0, description="standard deviation of the offsets (the reference's cov)")
    outlier_centre: Literal["none", "boundary"] = Field(
        "none", description="none: offsets alone (the reference code); boundary: around boundary features (NPOS)"
    )
    regularization_weight: float = Field(0.1, ge=0, description="λ")
    id_threshold: float = Field(-15.0, description="τ_id: images' energy -LSE is pushed below it")
    ood_threshold: float = Field(-3.0, description="τ_ood: outliers' energy -LSE is pushed above it")


def kth_neighbour_distance(points: torch.Tensor, reference: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """(N,) squared L2 distance from each point to its k-th nearest row of `reference` (an equal row counts)."""
    k = min(k, len(reference))
    distances = [
        torch.cdist(part, reference).pow(2).topk(k, dim=1, largest=False).values[:, -1] for part in points.split(chunk)
    ]
    return torch.cat(distances)


def virtual_outliers(
    features: torch.Tensor, num_classes: int, params: OVORParams, generator: torch.Generator
) -> torch.Tensor:
    """The virtual outliers of one outlier epoch (see the module docstring), most distant first."""
    normalized = F.normalize(features.float(), dim=1)
    offsets = params.noise * torch.randn(params.candidates, features.shape[1], generator=generator).to(normalized)
    copies = min(params.boundary, len(normalized))
    if params.outlier_centre == "none":
        # every copy of an offset is the same point: measure the distinct ones and tile
        candidates = offsets.repeat(copies, 1)
        distance = kth_neighbour_distance(offsets, normalized, params.knn).repeat(copies)
    else:
        spread = kth_neighbour_distance(normalized, normalized, params.knn)
        centres = features.float()[spread.topk(copies).indices]
        candidates = centres.repeat_interleave(params.candidates, dim=0) + offsets.repeat(copies, 1)
        distance = kth_neighbour_distance(candidates, normalized, params.knn)
    kept = min(len(candidates), params.per_class * num_classes)
    return candidates[distance.topk(kept).indices]


def outlier_regularization(
    id_logits: torch.Tensor, ood_logits: torch.Tensor, params: OVORParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """λ (huber(relu(s_id - τ_id)) + huber(relu(τ_ood - s_ood))) with s = -LSE(logits); and the mean scores."""
    id_score = -torch.logsumexp(id_logits.float(), dim=1)
    ood_score = -torch.logsumexp(ood_logits.float(), dim=1)
    id_excess = F.relu(id_score - params.id_threshold)
    ood_excess = F.relu(params.ood_threshold - ood_score)
    huber = F.huber_loss(id_excess, torch.zeros_like(id_excess)) + F.huber_loss(
        ood_excess, torch.zeros_like(ood_excess)
    )
    return params.regularization_weight * huber, id_score.mean(), ood_score.mean()


class OVOR(PromptMethod):
    name = "ovor"
    Params = OVORParams
    uses_query = False
    citation = (
        "@inproceedings{huang2024ovor, title={OVOR: OnePrompt with Virtual Outlier Regularization for "
        "Rehearsal-Free Class-Incremental Learning}, author={Huang, Wei-Cheng and Chen, Chun-Fu and Hsu, Hsiang}, "
        "booktitle={ICLR}, year={2024}, note={arXiv:2402.04129}}"
    )

    def __init__(self, backbone: Backbone, params: OVORParams):
        super().__init__(backbone, params)
        check_blocks(backbone, "g_blocks", params.g_blocks)
        check_blocks(backbone, "e_blocks", params.e_blocks)
        if set(params.g_blocks) & set(params.e_blocks) or not (params.g_blocks or params.e_blocks):
            raise BadInputError(
                f"method.params.g_blocks={params.g_blocks} and e_blocks={params.e_blocks} must be disjoint and "
                "not both empty"
            )
        dim = backbone.embed_dim
        lengths = {**dict.fromkeys(params.g_blocks, params.g_length), **dict.fromkeys(params.e_blocks, params.e_length)}
        self.prompts = nn.ParameterDict(
            {
                str(block): nn.Parameter(torch.rand(2 * length, dim) * params.init_scale)
                for block, length in sorted(lengths.items())
            }
        )
        self._outlier_seed = 0

    @property
    def prompted_blocks(self) -> list[int]:
        return sorted(int(block) for block in self.prompts)

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        # Drawn from the run's seeded stream, the same in every process and on resume.
        self._outlier_seed = int(torch.randint(2**62, ()))

    def prompts_for(self, queries: None, batch: int, training: bool) -> tuple[InsertedPrompts, StepOutput]:
        prefix = {int(block): prompt.expand(batch, -1, -1) for block, prompt in self.prompts.items()}
        return InsertedPrompts(prefix=prefix), no_prompt_loss(self.prompts[str(self.prompted_blocks[0])])

    def end_task(self, task: TaskInfo, data: TaskData) -> dict | None:
        self.seen_classes = task.total_classes
        if self.params.outlier_epochs == 0:
            return None
        features, labels, positions = indexed_features(data, lambda images: self.features(images)[0])
        features, labels = gather_rows(data, features, positions), gather_rows(data, labels, positions)
        with torch.enable_grad(), torch.autocast(device_type=features.device.type, enabled=False):
            scores = self._regularize_head(features, labels - task.known_classes, task.num_new_classes)
        return {"outlier_id_score": scores[0], "outlier_ood_score": scores[1]}

    def _regularize_head(self, features: torch.Tensor, local: torch.Tensor, num_classes: int) -> tuple[float, float]:
        """The outlier epochs on the current head; returns the last epoch's mean energy scores (images, outliers)."""
        params, head = self.params, self.heads[-1]
        generator = torch.Generator().manual_seed(self._outlier_seed)
        optimizer = torch.optim.Adam(head.parameters(), lr=params.outlier_lr, betas=(0.9, 0.999))
        batches = math.ceil(len(features) / params.id_batch)
        for _ in range(params.outlier_epochs):
            outliers = virtual_outliers(features, num_classes, params, generator)
            order = torch.randperm(len(features), generator=generator).to(features.device)
            per_batch = max(1, len(outliers) // batches)
            id_scores, ood_scores = [], []
            for index, rows in enumerate(order.split(params.id_batch)):
                outlier_rows = outliers[index * per_batch : (index + 1) * per_batch]
                if not len(outlier_rows):
                    break
                id_logits = head(features[rows])
                regularization, id_score, ood_score = outlier_regularization(id_logits, head(outlier_rows), params)
                loss = F.cross_entropy(id_logits, local[rows]) + regularization
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                id_scores.append(id_score.detach())
                ood_scores.append(ood_score.detach())
        return float(torch.stack(id_scores).mean()), float(torch.stack(ood_scores).mean())
