"""NTK-CL: Liu et al., "Parameter-Efficient Fine-Tuning for Continual Learning: A Neural Tangent Kernel
Perspective", arXiv 2407.17120, as the official implementation computes it.

Two PEFT families sit on a frozen timm ViT: a bottleneck adapter parallel to every block's MLP (channel
branch) and a token-mixing prompt generator in every block (patch branch). Each family has a trainable
current copy, carried over between tasks, and a frozen averaged copy, the running mean of the end-of-task
current copies. The CLS features of the averaged and current passes are concatenated per family
(c and p, optionally prefixed by the plain pre-trained feature), fused into m, and trained with
cross-entropy on c, p and m through a per-task cosine proxy head, plus a contrastive term against old
prototypes, an orthogonality term against the old-prototype subspace and an L2 pull towards the previous
task's parameters. Prediction is a section-weighted cosine similarity between m and class prototypes
(class means of m, frozen once computed); no task identity is used.

The reference has behaviours that look like mistakes; each is reproduced by default and has a named option
for the corrected variant: `orth_loss` (signed sum of residuals vs the squared projection onto the old
subspace), `orth_basis` (SVD of the partly or wholly zero prototype matrix vs old prototypes only),
`mi_sign` (the reference maximises its InfoNCE quantity), `average_after_last_task`, `fusion`
(degenerate single-token attention vs attention over feature sections) and `proxy_head_width` (after task 0
the reference's proxy head has `increment` outputs, more than a smaller remainder task has classes).

The contrastive term stacks the batch's fused features with up to `batch_size` (the run's global batch, not
the step's image count, so a task's last partial batch draws as many) randomly chosen old prototypes, the
prototype rows except the last `increment`; where there are none (task 0) it is the InfoNCE over the batch
alone, non-zero whenever a label repeats in the batch. The fusion's query and key never reach the loss
(single-key softmax), yet the reference's SGD still applies weight decay and momentum to them: they get a
zero gradient before every step (`adjust_gradients`), so they decay as there.

Under DDP every term equals the one-process step except the contrastive one: its negatives are the rank's
own images and sampled prototypes (the reference's DataParallel gathers the whole batch first).
"""

from __future__ import annotations

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
from ntkcl.models.adapters import BottleneckAdapter, adapter_block_forward
from ntkcl.models.backbone import PRE_NORM_BLOCKS, VIT_TOKENS, Backbone
from ntkcl.models.fusion import AttentionFusion
from ntkcl.models.heads import CosineLinear, PrototypeClassifier
from ntkcl.models.prompts import PromptGenerator, drop_prompts, prompt_block_forward


class NTKCLParams(MethodParams):
    """Hyper-parameters; defaults are the official implementation's."""

    model_name: Literal["both", "channel", "patch"] = Field("both", description="losses and feature used")
    bottleneck: int = Field(16, ge=1, description="adapter hidden width (ffn_num)")
    adapter_scale: float = 0.1
    adapter_dropout: float = Field(0.1, ge=0, lt=1)
    num_prompts: int = Field(10, ge=1, description="prompt tokens per block")
    prompt_carry: float = Field(0.1, description="weight of the previous block's prompts")
    use_init_ptm: bool = Field(False, description="prepend the plain pre-trained feature to c and p")
    fusion_heads: int = Field(8, ge=1)
    fusion_dropout: float = Field(0.1, ge=0, lt=1)
    fusion_weights: tuple[float, float, float] = Field((0.5, 1.0, 0.1), description="A(c,p), c, p")
    alpha: float = Field(0.1, description="test weight of the current section")
    beta: float = Field(1.0, description="test weight of the pre-trained section (use_init_ptm)")
    gamma: float = Field(0.3, description="test weight of the averaged section")
    nce_weight: float = Field(0.2, ge=0, description="lambda of the mutual-information term (nce_temp)")
    nce_temperature: float = Field(0.1, gt=0)
    orth_weight: float = Field(1e-4, ge=0, description="lambda of the orthogonality term (dis_temp)")
    orth_rank: int = Field(40, ge=1, description="left singular vectors kept")
    reg_weight: float = Field(1e-3, ge=0, description="lambda of the L2 pull to the previous task (reg_temp)")
    orth_loss: Literal["signed_sum", "projection"] = "signed_sum"
    orth_basis: Literal["reference", "old_prototypes"] = "reference"
    mi_sign: Literal["reference", "contrastive"] = "reference"
    average_after_last_task: bool = False
    fusion: Literal["reference", "sections"] = "reference"
    proxy_head_width: Literal["increment", "task"] = Field(
        "increment",
        description="outputs of the per-task proxy head after task 0. increment: the stream's increment, as the "
        "reference (a smaller remainder task keeps the extra logits); task: the task's own class count",
    )
    execution: Literal["fast", "sequential"] = Field(
        "fast",
        description="how the same features and loss are computed. fast: frozen passes without autograd, "
        "branches that share the frozen backbone stacked into one batch, the orthogonality basis once per "
        "task; sequential: the reference's order, every pass with autograd and the basis recomputed every batch",
    )


def averaging_coefficients(task_index: int) -> tuple[float, float]:
    """(a_t, b_t) of θ_avg ← a_t·θ_avg + b_t·θ_cur after task t: (0, 1), then (t/(t+1), 1/(t+1))."""
    if task_index == 0:
        return 0.0, 1.0
    return task_index / (task_index + 1), 1.0 / (task_index + 1)


def finite_or_zero(value: torch.Tensor) -> torch.Tensor:
    """The reference's guard: a NaN or infinite loss term counts as zero."""
    return torch.where(torch.isfinite(value), value, torch.zeros_like(value))


def info_nce(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """NCE = -log Σ_{positive pairs} exp(s_ij) + mean_i logsumexp_{j≠i} s_ij, s = cos / temperature.

    Positives are same-label pairs i≠j anywhere in the stacked batch; with none, NCE = +inf.
    """
    normalized = F.normalize(features.float(), dim=1)
    similarity = normalized @ normalized.T / temperature
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=features.device)
    positives = (labels[:, None] == labels[None, :]) & off_diagonal
    positive_term = -torch.logsumexp(similarity.masked_fill(~positives, float("-inf")).flatten(), dim=0)
    denominator = torch.logsumexp(similarity.masked_fill(~off_diagonal, float("-inf")), dim=1).mean()
    return positive_term + denominator


def orthogonality_basis(prototypes: torch.Tensor, rank: int, old_classes: int, mode: str) -> torch.Tensor | None:
    """Left singular vectors of the column-normalised prototype matrix (D x C), in fp32.

    "reference" keeps the first `rank` of the full SVD even where the matrix is zero (task 0) or has fewer
    columns than `rank`; "old_prototypes" uses only the old classes' non-degenerate directions.
    """
    matrix = F.normalize(prototypes.float(), dim=1).T
    if mode == "old_prototypes":
        matrix = matrix[:, :old_classes]
        if old_classes == 0:
            return None
    with torch.autocast(device_type=matrix.device.type, enabled=False):
        left, singular, _ = torch.linalg.svd(matrix, full_matrices=True)
    if mode == "old_prototypes":
        rank = min(rank, int((singular > singular.max() * 1e-6).sum()))
    return left[:, :rank]


def orthogonality_loss(features: torch.Tensor, basis: torch.Tensor, mode: str) -> torch.Tensor:
    """`signed_sum`: Σ entries of r = f̂ − f̂BBᵀ (reference); `projection`: mean ‖f̂B‖² (corrected)."""
    normalized = F.normalize(features.float(), dim=1)
    projected = normalized @ basis
    if mode == "projection":
        return projected.pow(2).sum(dim=1).mean()
    return (normalized - projected @ basis.T).sum()


def section_logits(
    features: torch.Tensor, prototypes: torch.Tensor, weights: list[float] | torch.Tensor
) -> torch.Tensor:
    """Σ_s w_s · cos(f_s, proto_s) over the width-d sections of the features (the reference's test logits)."""
    sections = len(weights)
    batch, classes = features.shape[0], prototypes.shape[0]
    f = F.normalize(features.float().view(batch, sections, -1), dim=2)
    p = F.normalize(prototypes.float().view(classes, sections, -1), dim=2)
    per_section = torch.einsum("bsd,csd->bcs", f, p)
    return per_section @ torch.as_tensor(weights, device=features.device, dtype=per_section.dtype)


class NTKCL(ContinualMethod):
    name = "ntk-cl"
    Params = NTKCLParams
    transient = ("proxy_head",)
    compile_targets = ("features",)
    citation = (
        "@article{liu2024ntkcl, title={Parameter-Efficient Fine-Tuning for Continual Learning: A Neural Tangent "
        "Kernel Perspective}, author={Liu, Jingren and Ji, Zhong and Yu, YunLong and Cao, Jiale and Pang, Yanwei "
        "and Han, Jungong and Li, Xuelong}, journal={arXiv:2407.17120}, year={2024}}"
    )
    required_backbone_features = (VIT_TOKENS, PRE_NORM_BLOCKS)

    def __init__(self, backbone: Backbone, params: NTKCLParams):
        super().__init__(backbone, params)
        dim = backbone.embed_dim
        self.current = self._peft_copy()
        self.averaged = self._peft_copy()
        self.averaged.requires_grad_(False)
        sections = 3 if params.use_init_ptm else 2
        self.feature_dim = sections * dim
        weights = ([params.beta] if params.use_init_ptm else []) + [params.gamma, params.alpha]
        # a buffer on the model's device, so prediction copies nothing from the host
        self.register_buffer("section_weights", torch.tensor(weights), persistent=False)
        attended_width = self.feature_dim if params.fusion == "reference" else dim
        if attended_width % params.fusion_heads:
            raise BadInputError(
                f"method.params.fusion_heads={params.fusion_heads} does not divide the fusion width "
                f"{attended_width} of {backbone.name}"
            )
        self.fusion = AttentionFusion(
            self.feature_dim, dim, params.fusion_heads, params.fusion_dropout, params.fusion_weights, params.fusion
        )
        self.prototypes = PrototypeClassifier(self.feature_dim)
        self.proxy_head: CosineLinear | None = None
        # Per-task tensors kept out of the state dict and out of DDP's buffer broadcast; both are rebuilt
        # exactly by begin_task from the saved state, so resuming after a task needs neither.
        self._anchor: torch.Tensor | None = None
        self._basis: torch.Tensor | None = None
        self._task: TaskInfo | None = None
        modules = nn.ModuleDict({"current": self.current, "fusion": self.fusion})
        self._regularised = [parameter for name, parameter in modules.named_parameters() if "weight" in name]

    def _peft_copy(self) -> nn.ModuleDict:
        backbone, params = self.backbone, self.params
        blocks = range(len(backbone.blocks))
        return nn.ModuleDict(
            {
                "channel": nn.ModuleList(
                    BottleneckAdapter(
                        backbone.embed_dim, params.bottleneck, params.adapter_scale, params.adapter_dropout
                    )
                    for _ in blocks
                ),
                "patch": nn.ModuleList(
                    PromptGenerator(backbone.num_tokens, backbone.embed_dim, params.num_prompts) for _ in blocks
                ),
            }
        )

    # ----------------------------------------------------------------------------------------- features
    def _channel_pass(self, images: torch.Tensor, *copies: nn.ModuleDict | None) -> list[torch.Tensor]:
        """One backbone pass over `len(copies)` stacked copies of the batch; None = the plain model."""
        sets = [None if copy_ is None else copy_["channel"] for copy_ in copies]
        batch = images if len(copies) == 1 else images.repeat(len(copies), 1, 1, 1)
        return list(self.backbone(batch, adapter_block_forward(*sets)).chunk(len(copies)))

    def _patch_pass(self, images: torch.Tensor, *copies: nn.ModuleDict) -> list[torch.Tensor]:
        prefix, prompts = self.backbone.num_prefix_tokens, self.params.num_prompts
        sets = [copy_["patch"] for copy_ in copies]
        block_forward = prompt_block_forward(sets, prefix, prompts, self.params.prompt_carry)
        tokens = self.backbone.embed(images if len(copies) == 1 else images.repeat(len(copies), 1, 1, 1))
        for index, block in enumerate(self.backbone.blocks):
            tokens = block_forward(index, block, tokens)
        return list(self.backbone.pool(drop_prompts(tokens, prefix, prompts)).chunk(len(copies)))

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c, p, m): channel and patch features ([plain ‖] averaged ‖ current) and their fusion.

        "sequential" runs the 4-5 passes one after another with autograd, as the reference does. "fast"
        computes the same features: frozen passes without autograd, and branches that share the frozen
        backbone stacked into one batch (all of them when nothing needs gradients).
        The current copy is not stacked with the frozen ones in training: back-propagating through the
        frozen rows costs more than the launches it saves (measured on an H100: equal at batch 16, 30%
        slower at batch 96 with the plain pass).
        """
        use_plain = self.params.use_init_ptm
        plain_copy = [None] if use_plain else []
        if self.params.execution == "sequential":
            (c_avg,), (c_cur,) = self._channel_pass(images, self.averaged), self._channel_pass(images, self.current)
            (p_avg,), (p_cur,) = self._patch_pass(images, self.averaged), self._patch_pass(images, self.current)
            plain = self._channel_pass(images, None) if use_plain else []
        elif torch.is_grad_enabled():
            with torch.no_grad():
                c_avg, *plain = self._channel_pass(images, self.averaged, *plain_copy)
                (p_avg,) = self._patch_pass(images, self.averaged)
            (c_cur,) = self._channel_pass(images, self.current)
            (p_cur,) = self._patch_pass(images, self.current)
        else:
            c_avg, c_cur, *plain = self._channel_pass(images, self.averaged, self.current, *plain_copy)
            p_avg, p_cur = self._patch_pass(images, self.averaged, self.current)
        channel = torch.cat([*plain, c_avg, c_cur], dim=1)
        patch = torch.cat([*plain, p_avg, p_cur], dim=1)
        return channel, patch, self.fusion(channel, patch)

    def _feature_for_prototypes(self, images: torch.Tensor) -> torch.Tensor:
        channel, patch, fused = self.features(images)
        return {"both": fused, "channel": channel, "patch": patch}[self.params.model_name]

    # ------------------------------------------------------------------------------------------- hooks
    def begin_task(self, task: TaskInfo) -> None:
        self._task = task
        self.prototypes.grow(task.total_classes - self.prototypes.num_classes)
        self.proxy_head = CosineLinear(self.feature_dim, self.proxy_head_width(task)).to(self.device)
        # The L2 anchor is the current copy and fusion as they stand when the task starts, i.e. at the end of
        # the previous task (at task 0: the initial values), flattened so the pull is a handful of kernels.
        self._anchor = torch.cat([weight.detach().reshape(-1).float() for weight in self._regularised])
        self._basis = None if self.params.execution == "sequential" else self._orthogonality_basis()

    def proxy_head_width(self, task: TaskInfo) -> int:
        """Task 0: its classes; later: the stream's increment (at least the task's classes), or the task's
        classes with `proxy_head_width="task"`."""
        if task.is_first or self.params.proxy_head_width == "task" or task.increment is None:
            return task.num_new_classes
        return max(task.increment, task.num_new_classes)

    def _orthogonality_basis(self) -> torch.Tensor | None:
        old = self._task.known_classes if self._task is not None else 0
        return orthogonality_basis(self.prototypes.prototypes, self.params.orth_rank, old, self.params.orth_basis)

    def _regularisation(self) -> torch.Tensor:
        """Σ ‖θ − θ_anchor‖² over the regularised weights (a plain sum of squares, as the reference)."""
        live = torch.cat([weight.reshape(-1) for weight in self._regularised]).float()
        return (live - self._anchor.to(live.device)).pow(2).sum()

    def _mutual_information(self, fused: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        task = self._task
        increment = task.increment or task.num_new_classes
        old_rows = max(self.prototypes.num_classes - increment, 0)
        sampled = self.train_batch_size or len(labels)
        chosen = torch.randperm(old_rows, device=fused.device)[:sampled]
        stacked = torch.cat([fused.float(), self.prototypes.prototypes[chosen]])
        stacked_labels = torch.cat([labels, chosen])
        nce = info_nce(stacked, stacked_labels, self.params.nce_temperature)
        return -nce if self.params.mi_sign == "reference" else nce

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        params = self.params
        local = labels - self._task.known_classes
        channel, patch, fused = self.features(images)
        head = self.proxy_head
        logits = {"channel": head(channel), "patch": head(patch), "fused": head(fused)}
        if params.model_name != "both":
            key = params.model_name
            loss = F.cross_entropy(logits[key].float(), local)
            accuracy = batch_accuracy(logits[key], local)
            return StepOutput(loss, {"ce": loss.detach(), "train_acc": accuracy.detach()})
        cross_entropy = sum(F.cross_entropy(value.float(), local) for value in logits.values())
        mutual_information = finite_or_zero(self._mutual_information(fused, labels))
        basis = self._orthogonality_basis() if params.execution == "sequential" else self._basis
        orthogonality = torch.zeros((), device=images.device)
        if basis is not None:
            basis = basis.to(images.device)
            orthogonality = finite_or_zero(
                orthogonality_loss(channel, basis, params.orth_loss)
                + orthogonality_loss(patch, basis, params.orth_loss)
            )
        regularisation = finite_or_zero(self._regularisation())
        loss = cross_entropy + params.nce_weight * mutual_information + params.reg_weight * regularisation
        accuracy = batch_accuracy(logits["fused"], local)
        logs = {
            "ce": cross_entropy.detach(),
            "mi": mutual_information.detach(),
            "reg": regularisation.detach(),
            "train_acc": accuracy.detach(),
        }
        if params.orth_loss == "projection":
            logs["orth"] = orthogonality.detach()
            return StepOutput(loss + params.orth_weight * orthogonality, logs)
        # The reference's signed sum grows with the batch: logged per image, back-propagated as a batch sum.
        logs["orth"] = orthogonality.detach() / len(labels)
        return StepOutput(loss, logs, batch_sum=params.orth_weight * orthogonality)

    def adjust_gradients(self, stage: str) -> None:
        """A zero gradient for the fusion's query and key where the loss does not reach them, so that SGD's
        weight decay and momentum update them as the reference's (whose graph reaches them with gradient 0)."""
        if self.params.model_name != "both":
            return
        for parameter in (*self.fusion.query.parameters(), *self.fusion.key.parameters()):
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)

    @torch.no_grad()
    def average_copies(self, task_index: int) -> None:
        """θ_avg ← a_t·θ_avg + b_t·θ_cur for every tensor of the adapters and generators (fp32)."""
        a, b = averaging_coefficients(task_index)
        for averaged, current in zip(self.averaged.parameters(), self.current.parameters()):
            averaged.copy_((a * averaged.float() + b * current.float()).to(averaged.dtype))

    @torch.no_grad()
    def end_task(self, task: TaskInfo, data: TaskData) -> None:
        # Reference order: average the copies (skipped after the last task), then the new prototypes.
        if not task.is_last or self.params.average_after_last_task:
            self.average_copies(task.index)
        means = class_means(data, self._feature_for_prototypes, task.known_classes, task.num_new_classes)
        self.prototypes.set_rows(task.known_classes, means)
        self.seen_classes = task.total_classes

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        feature = self._feature_for_prototypes(images)
        return section_logits(feature, self.prototypes.prototypes[: self.seen_classes], self.section_weights)

    def load_learned_state(self, state, finished) -> None:
        super().load_learned_state(state, finished)
        self._task = finished[-1] if finished else None
