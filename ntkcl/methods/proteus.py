"""PROTEUS: Le, Bui, Hoang, Hoang, "Continual Fine-Tuning with Provably Accurate and Parameter-Free Task
Retrieval", arXiv 2603.13235 — a reconstruction.

The paper has no public code and its method section could not be read; what is known (the abstract, the
public reviews, and the configurations and code of the authors' precursor, HESTIA's `baselines/RanPAC`) is
gathered in the project's reference notes, §C (§C.7: what the precursor's code pins down). This module
follows the precursor wherever its code decides, and makes every choice it leaves open explicit, with an
option where one is reasonable (defaults first):

1. **Per-task LoRA with adaptive module composition** on q and v of the first `lora_depth` blocks of a
   stock timm ViT. Task k owns `added_units` new rank-one units per block and projection (a `LoRA` of that
   rank) and weights over the earlier tasks' units (the "pool"); its update is

       ΔW_k = s * ( Σ_{u in pool} w_{k,u} U_u D_u  +  U_new D_new ),

   with s = 1 in training and s = `alpha` at evaluation and retrieval, as the precursor (its training call
   passes no α) [`alpha_in_training` scales by α in training too]. New units start with the input factor
   D = 0 and the output factor U ~ N(0, 1) x 0.01, as the precursor [`down_init`: orthogonal_to_pool,
   orthogonal, kaiming down-projections with U = 0]. Facts: pool/new units and per-task composition weights
   W_Q, W_V are what the precursor checkpoints hold; `added_units`, `alpha`, `reg_weight` 0.006,
   `ortho_weight` 0 are its configuration; the reviews describe a learned selective combination with l1/l2
   regularisation plus a new component orthogonal to the previous ones; the precursor has
   `ortho_loss(A, B) = ‖AᵀB‖²_F`. Choices: one weight per earlier rank-one unit, per block and projection,
   initialised at `combination_init` (1.0: a task starts from the sum of the earlier units); the penalty is
   `reg_weight` times the elastic net Σ|w| + Σw² [`combination_penalty`: l1+l2, l1, l2]; the orthogonality
   term is `ortho_weight` Σ‖D_pool D_newᵀ‖²_F on the down-projections (as O-LoRA), zero by default as in
   the precursor; units of finished tasks are frozen.
2. **Training head.** As the precursor: one LayerNorm + linear head (timm's `fc_norm` + `head`) over all
   classes, grown per task and kept across tasks, its logits masked to the task's classes, trained with
   plain cross-entropy (the precursor's `smoothing` field is never read) [`train_head="cosine"`: a fresh
   cosine head per task; `label_smoothing`]. The head serves training only (kept in checkpoints to continue
   training, left out of exports).
3. **Parameter-free task retrieval.** After task k its training images, embedded by task k's model (the
   CLS feature, scaled by α), are fitted with scikit-learn's `BayesianGaussianMixture` (Dirichlet-process
   weight prior, `n_components` truncation per task, `weight_concentration_prior`); as the precursor, each
   component keeps the empirical mean and full covariance of the embeddings assigned to it
   [`signature_statistics="mixture"`: scikit-learn's fitted weights, means and covariances], stored as
   tensors (see `ntkcl.models.signatures`). At test time every stored task's model embeds the image, in one
   backbone pass over the image stacked T times with the T tasks' composed LoRA factors; each embedding is
   scored under its task's components as N(mean, cov + `score_epsilon` I) (1e-4), the best component
   deciding, without weights, as the precursor [`retrieval_score="mixture"`: the weighted mixture
   log-likelihood], and the highest score picks the task. `retrieval_unit="image"` retrieves a task per
   test image (the honest setting); `"batch"` retrieves one task per test batch, each batch holding one
   task's images, by the highest summed score of its images (the precursor's protocol assigns one task to
   a whole batch of 16 images of one task; how it combines them is not in its stored code). The run records
   which (`retrieval_unit` in the task diagnostics and the config). Choices: components owning no training
   image are dropped [`prune_components`, for the mixture statistics]; full covariances
   [`covariance_type`]; scikit-learn's defaults otherwise (`gmm_max_iter` 100, `gmm_reg_covar` 1e-6,
   k-means initialisation seeded per task; `gmm_threads`).
4. **Head.** RanPAC's random projection (M = `projection_dim`) and ridge read-out, accumulated over tasks
   with each task's images embedded by its own model (`ntkcl.models.heads.RandomProjectionRidge`); the
   retrieved task's embedding is classified over all seen classes [`restrict_to_retrieved_task` masks the
   logits to that task's classes].
5. **Mixed training sets** (VTAB-SimS, where a task's images include other tasks' classes): those images are
   left out of the task's cross-entropy but enter the task's signature and the ridge head (with their own
   labels), so each task's LoRA learns its own classes and its signature covers all it was given.
6. **Diagnostics.** After task k, for every cluster (component) of its signature, the retrieval bound's
   terms as the precursor's `theories.py` computes them (`ntkcl.models.signatures.retrieval_bound`): δ, the
   smallest centroid Mahalanobis factor of the cluster's images, embedded by another task's model, to that
   task's components (raw covariances) / d − 1; κ, the smallest log-det ratio of those components'
   covariances to the cluster's; the Eq. (28) threshold with N = (T − 1) Σ τ + 1 and ε = `bound_epsilon`;
   and whether δ > threshold. `theories.py` compares against every other task after the whole stream; a
   rehearsal-free run has task k's images only, so "other" means the earlier tasks here
   (`separation_by_task`, `separation_factor` their minimum, `separation_so_far` over every task so far).
   [`separation_diagnostic` skips the extra embedding passes.] Retrieval accuracy on the test images is
   reported by the engine.

Compilation (`runtime.compile`). The compile target is `task_pass`, one backbone pass of a batch under one
task's composed factors, which come in as arguments. Eagerly, `embed` stacks the listed tasks in one pass
over a pool that grows with every task, so its shapes change from task to task: compiled that way, every
task would recompile (until dynamo's recompile limit sends the pass back to eager execution). Once the
engine has compiled `task_pass`, `embed` instead runs one `task_pass` per listed task, each with its factors
padded to the stream's final pool (the number of tasks, known from `begin_stream`, times `added_units`) by zero
down-rows and up-columns of weight 0: the update is the same, and every pass has the same shapes whatever
the task, so the graphs compiled in the first task (one per batch size and mode: the training step; the
no-grad passes of the end of the task and of evaluation) serve the whole stream. T passes of B images cost
the FLOPs of one stacked pass of T x B (`tasks_per_pass` does not apply there). The padding and the
per-task loop exist on the compiled path only, so eager results are exactly the stacked pass's.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ntkcl.data.scenarios import CLASS_INCREMENTAL
from ntkcl.errors import BadInputError
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
from ntkcl.models.backbone import FUSED_QKV_ATTENTION, PRE_NORM_BLOCKS, VIT_TOKENS, Backbone
from ntkcl.models.heads import CosineLinear, NormLinearHead, RandomProjectionRidge
from ntkcl.models.lora import LoRA, lora_block_forward, orthogonal_rows, pack_qkv, stacked_low_rank
from ntkcl.models.signatures import GaussianMixtureSignature, RawComponents, retrieval_bound, separation_factors

PROJECTIONS = ("q", "v")


class ProteusParams(MethodParams):
    """Defaults are the precursor's (its code, and its CIFAR-100 configuration) where it has a value; see the
    module docstring."""

    added_units: int = Field(4, ge=1, description="rank of each task's new LoRA component")
    alpha: float = Field(0.3, description="LoRA output scale at evaluation and retrieval")
    alpha_in_training: bool = Field(False, description="scale by alpha while training too (the precursor: 1)")
    lora_depth: int | None = Field(None, ge=1, description="adapted blocks from the first; null = all")
    combination_init: float = Field(1.0, description="initial weight of every earlier unit")
    combination_penalty: Literal["l1+l2", "l1", "l2"] = "l1+l2"
    reg_weight: float = Field(0.006, ge=0, description="weight of the combination penalty")
    ortho_weight: float = Field(0.0, ge=0, description="weight of Σ‖D_pool D_newᵀ‖²_F")
    down_init: Literal["zeros", "orthogonal_to_pool", "orthogonal", "kaiming"] = Field(
        "zeros",
        description="zeros: input factor 0 and output factor random x 0.01 (the precursor); otherwise that "
        "down-projection and a zero output factor",
    )
    train_head: Literal["layernorm_linear", "cosine"] = Field(
        "layernorm_linear",
        description="layernorm_linear: one LayerNorm + linear head over all classes, masked to the task's "
        "(the precursor); cosine: a fresh cosine head per task",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="0: plain cross-entropy (the precursor)")
    n_components: int | list[int] = Field(20, description="DP truncation: one value, or one per task")
    weight_concentration_prior: float = Field(0.1, gt=0)
    covariance_type: Literal["full", "diag"] = "full"
    gmm_max_iter: int = Field(100, ge=1)
    gmm_reg_covar: float = Field(1e-6, gt=0)
    gmm_threads: int | None = Field(None, ge=1, description="threads of the scikit-learn fit; null = all")
    prune_components: bool = True
    signature_statistics: Literal["empirical", "mixture"] = Field(
        "empirical",
        description="empirical: each component's mean and covariance of its assigned embeddings (the "
        "precursor); mixture: scikit-learn's fitted weights, means and covariances",
    )
    score_epsilon: float = Field(1e-4, gt=0, description="covariance regulariser when scoring")
    retrieval_score: Literal["mixture", "best_component"] = "best_component"
    retrieval_unit: Literal["image", "batch"] = Field(
        "image",
        description="image: a task retrieved per test image; batch: one task per test batch of one task's "
        "images (the precursor's protocol)",
    )
    restrict_to_retrieved_task: bool = False
    projection_dim: int = Field(10_000, ge=1, description="M, width of the random projection")
    train_fraction: float = Field(0.8, gt=0, lt=1, description="fitting share of the split that chooses λ")
    tasks_per_pass: int = Field(0, ge=0, description="task models per stacked backbone pass; 0 = all at once")
    separation_diagnostic: bool = True
    bound_epsilon: float = Field(0.01, gt=0, lt=1, description="ε of the retrieval bound's threshold")


class TaskUnits(nn.Module):
    """One task's part of the LoRA pool: new units per block and projection, and weights over earlier units.

    `q[b]` / `v[b]` are the task's new LoRA (rank `added_units`) on block b; `combination[p, b, u]` weights
    earlier unit u of projection p (0: q, 1: v) on block b.
    """

    def __init__(self, dim: int, depth: int, rank: int, earlier_units: int, combination_init: float):
        super().__init__()
        self.q = nn.ModuleList(LoRA(dim, dim, rank, down_init="zeros") for _ in range(depth))
        self.v = nn.ModuleList(LoRA(dim, dim, rank, down_init="zeros") for _ in range(depth))
        self.combination = nn.Parameter(torch.full((len(PROJECTIONS), depth, earlier_units), combination_init))

    def lora(self, projection: int, block: int) -> LoRA:
        return (self.q, self.v)[projection][block]


def combination_penalty(weights: torch.Tensor, kind: str) -> torch.Tensor:
    """Σ|w| + Σw² ("l1+l2"), Σ|w| ("l1") or Σw² ("l2") over all weights."""
    l1 = weights.abs().sum() if "l1" in kind else weights.new_zeros(())
    l2 = weights.pow(2).sum() if "l2" in kind else weights.new_zeros(())
    return l1 + l2


class Proteus(ContinualMethod):
    name = "proteus"
    Params = ProteusParams
    # Retrieval is the point of the method: with task identity given (task-incremental) it has nothing to do.
    scenarios = (CLASS_INCREMENTAL,)
    mixed_task_data = True
    required_backbone_features = (VIT_TOKENS, PRE_NORM_BLOCKS, FUSED_QKV_ATTENTION)
    transient = ("train_head",)
    training_only = (*(f"head.{name}" for name in RandomProjectionRidge.TRAINING_ONLY), "task_head.")
    # One task's backbone pass at the final pool size: the same shapes for every task (module docstring).
    compile_targets = ("task_pass",)
    citation = (
        "@article{le2026proteus, title={Continual Fine-Tuning with Provably Accurate and Parameter-Free Task "
        "Retrieval}, author={Le, Hang Thi-Thuy and Bui, Long Minh and Hoang, Minh and Hoang, Trong Nghia}, "
        "journal={arXiv:2603.13235}, year={2026}}"
    )

    def __init__(self, backbone: Backbone, params: ProteusParams):
        super().__init__(backbone, params)
        blocks = len(backbone.blocks)
        if params.lora_depth is not None and params.lora_depth > blocks:
            raise BadInputError(
                f"method.params.lora_depth={params.lora_depth} exceeds the {blocks} blocks of {backbone.name}"
            )
        self.depth = params.lora_depth or blocks
        self.tasks = nn.ModuleList()
        self.signatures = nn.ModuleList()
        self.register_buffer("separation", torch.zeros(0, dtype=torch.float64))
        self.head = RandomProjectionRidge(backbone.embed_dim, params.projection_dim, params.train_fraction)
        self.train_head: CosineLinear | None = None
        # Trained with every task, used by none at prediction: kept to continue training, left out of exports.
        self.task_head = NormLinearHead(backbone.embed_dim) if params.train_head == "layernorm_linear" else None
        self._class_ranges: list[tuple[int, int]] = []
        self._seed = 0

    # ------------------------------------------------------------------------------------------ LoRA
    def _unit_weights(self, task: int, projection: int, block: int, pool_size: int) -> torch.Tensor:
        """Task `task`'s weight on every unit of a pool of `pool_size` units: [w_task, 1 (own), 0 (later)]."""
        earlier = self.tasks[task].combination[projection, block]
        own = earlier.new_ones(self.params.added_units)
        return torch.cat([earlier, own, earlier.new_zeros(pool_size - len(earlier) - len(own))])

    def _composed_factors(
        self, tasks: list[int], pool_units: int | None = None
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per block and projection, the stacked (down (T, U, in), up (T, out, U)) of the tasks' updates.

        Every task's update reads the same pool (all units up to the latest task listed), weighted by the
        task's unit weights; units a task does not use have weight 0, so tasks of different ranks stack.
        With `pool_units`, the pool is padded to that many units by zero down-rows and up-columns.
        """
        pool = self.tasks[: max(tasks) + 1]
        factors = []
        for block in range(self.depth):
            per_projection = []
            for projection in range(len(PROJECTIONS)):
                loras = [units.lora(projection, block) for units in pool]
                down = torch.cat([lora.down for lora in loras])
                up = torch.cat([lora.up for lora in loras], dim=1)
                if pool_units is not None and pool_units > len(down):
                    down = torch.cat([down, down.new_zeros(pool_units - len(down), down.shape[1])])
                    up = torch.cat([up, up.new_zeros(up.shape[0], pool_units - up.shape[1])], dim=1)
                weights = torch.stack([self._unit_weights(t, projection, block, len(down)) for t in tasks])
                per_projection.append((down.expand(len(tasks), -1, -1), up.unsqueeze(0) * weights.unsqueeze(1)))
            factors.append(per_projection)
        return factors

    @property
    def evaluates_per_task_batch(self) -> bool:
        return self.params.retrieval_unit == "batch"

    def _alpha(self) -> float:
        return self.params.alpha if self.params.alpha_in_training or not self.training else 1.0

    def _block_forward(self, factors: list, num_tasks: int):
        dim, alpha = self.backbone.embed_dim, self._alpha()

        def qkv_update(index: int, normed: torch.Tensor) -> torch.Tensor | None:
            if index >= self.depth:
                return None
            stacked = normed.reshape(num_tasks, -1, dim)  # chunk t of the batch is task t's copy
            (q_down, q_up), (v_down, v_up) = factors[index]
            q = stacked_low_rank(stacked, q_down, q_up, alpha)
            v = stacked_low_rank(stacked, v_down, v_up, alpha)
            return pack_qkv(dim, q=q, v=v).reshape(*normed.shape[:-1], 3 * dim)

        return lora_block_forward(qkv_update)

    def task_pass(self, images: torch.Tensor, factors: list) -> torch.Tensor:
        """(B, d): the CLS features of `images` under the model of one task, given its composed factors."""
        return self.backbone(images, self._block_forward(factors, 1))

    def embed(self, images: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """(T, B, d): the CLS features of `images` under each listed task's model.

        One backbone pass over the images stacked T times (or `tasks_per_pass` tasks per pass); once
        `task_pass` is compiled, one pass per task at the final pool size (see the module docstring).
        """
        if "task_pass" in self.compiled_targets:
            pool_units = max(len(self.stream_tasks), len(self.tasks)) * self.params.added_units
            return torch.stack([self.task_pass(images, self._composed_factors([task], pool_units)) for task in tasks])
        per_pass = self.params.tasks_per_pass or len(tasks)
        outputs = []
        for start in range(0, len(tasks), per_pass):
            chunk = tasks[start : start + per_pass]
            batch = images.repeat(len(chunk), 1, 1, 1) if len(chunk) > 1 else images
            features = self.backbone(batch, self._block_forward(self._composed_factors(chunk), len(chunk)))
            outputs.append(features.view(len(chunk), len(images), -1))
        return torch.cat(outputs)

    def _initialise_units(self, units: TaskUnits) -> None:
        """New units: input factor 0 and output factor N(0, 1) x 0.01 (the precursor), or down-projections with
        orthonormal rows orthogonal to the pool's (or plain orthogonal / kaiming) and a zero output factor."""
        mode = self.params.down_init
        with torch.no_grad():
            for projection in range(len(PROJECTIONS)):
                for block in range(self.depth):
                    lora = units.lora(projection, block)
                    if mode == "zeros":
                        lora.up.copy_(0.01 * torch.randn(lora.up.shape))
                        continue
                    if mode == "kaiming":
                        nn.init.kaiming_uniform_(lora.down, a=math.sqrt(5))
                        continue
                    pool = [earlier.lora(projection, block).down for earlier in self.tasks]
                    against = torch.cat(pool) if pool and mode == "orthogonal_to_pool" else None
                    try:
                        rows = orthogonal_rows(lora.rank, lora.down.shape[1], against=against)
                    except ValueError as error:
                        raise BadInputError(
                            f"proteus: {error}; lower method.params.added_units or use down_init=orthogonal"
                        ) from error
                    lora.down.copy_(rows)

    # ----------------------------------------------------------------------------------------- hooks
    def _truncations(self, num_tasks: int) -> list[int]:
        """Every task's component truncation τ (`n_components`, one value or one per task)."""
        value = self.params.n_components
        if isinstance(value, int):
            return [value] * num_tasks
        if len(value) != num_tasks:
            raise BadInputError(
                f"method.params.n_components lists {len(value)} values; the stream has {num_tasks} tasks"
            )
        return list(value)

    def _max_components(self, task: TaskInfo) -> int:
        return self._truncations(task.num_tasks)[task.index]

    def begin_task(self, task: TaskInfo) -> None:
        self._max_components(task)
        self.tasks.requires_grad_(False)
        params, dim = self.params, self.backbone.embed_dim
        units = TaskUnits(
            dim, self.depth, params.added_units, params.added_units * len(self.tasks), params.combination_init
        )
        self._initialise_units(units)
        self.tasks.append(units.to(self.device))
        self.separation = torch.cat([self.separation, self.separation.new_full((1,), float("nan"))])
        self.head.grow_to(task.total_classes)
        self._class_ranges.append((task.known_classes, task.total_classes))
        # Drawn from the engine's per-task seed: the same on every process and on resume.
        self._seed = int(torch.randint(2**31 - 1, ()))
        if self.task_head is not None:
            self.task_head.grow_to(task.total_classes)
        else:
            self.train_head = CosineLinear(dim, task.num_new_classes).to(self.device)

    def _orthogonality(self, units: TaskUnits) -> torch.Tensor:
        """Σ over blocks and projections of ‖D_pool D_newᵀ‖²_F (zero for the first task)."""
        total = units.combination.new_zeros(())
        index = len(self.tasks) - 1
        for projection in range(len(PROJECTIONS)):
            for block in range(self.depth):
                pool = [self.tasks[j].lora(projection, block).down for j in range(index)]
                if pool:
                    total = total + (torch.cat(pool) @ units.lora(projection, block).down.T).pow(2).sum()
        return total

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        params = self.params
        current = len(self.tasks) - 1
        units = self.tasks[current]
        embedding = self.embed(images, [current])[0]
        first_class, last_class = self._class_ranges[current]
        if self.task_head is not None:
            logits = self.task_head(embedding, first_class, last_class)
        else:
            logits = self.train_head(embedding)
        cross_entropy, accuracy = own_class_cross_entropy(logits, labels, first_class, params.label_smoothing)
        penalty = combination_penalty(units.combination, params.combination_penalty)
        orthogonality = self._orthogonality(units)
        loss = cross_entropy + params.reg_weight * penalty + params.ortho_weight * orthogonality
        logs = {"ce": cross_entropy.detach(), "reg": penalty.detach(), "ortho": orthogonality.detach()}
        return StepOutput(loss, {**logs, "train_acc": accuracy.detach()})

    @torch.no_grad()
    def end_task(self, task: TaskInfo, data: TaskData) -> dict:
        params, current = self.params, task.index
        self.tasks[current].requires_grad_(False)
        self.train_head = None
        measure = params.separation_diagnostic and current > 0
        models = list(range(current + 1)) if measure else [current]
        features, labels, positions = indexed_features(data, lambda images: self.embed(images, models).transpose(0, 1))
        own = features[:, -1]
        signature, fit = GaussianMixtureSignature.fit(
            gather_rows(data, own, positions),
            self._max_components(task),
            params.weight_concentration_prior,
            params.covariance_type,
            params.gmm_max_iter,
            params.gmm_reg_covar,
            seed=self._seed,
            prune=params.prune_components,
            epsilon=params.score_epsilon,
            threads=params.gmm_threads,
            statistics=params.signature_statistics,
        )
        self.signatures.append(signature)
        self.head.grow_to(int(gather_rows(data, labels, positions).max()) + 1)  # mixed sets: later tasks' labels
        ridge = self.head.learn(own, labels, positions, self._seed, data.all_reduce_sum)
        self.seen_classes = task.total_classes
        diagnostics = {
            "signature_components": fit.components,
            "gmm_iterations": fit.iterations,
            "gmm_converged": fit.converged,
            "gmm_fit_seconds": fit.seconds,
            "ridge": ridge,
            "retrieval_unit": params.retrieval_unit,
        }
        if params.separation_diagnostic:
            embedded = gather_rows(data, features, positions)
            diagnostics.update(self._separation(task, embedded, fit.clusters, signature))
        return diagnostics

    def _separation(
        self, task: TaskInfo, embedded: torch.Tensor, clusters: torch.Tensor, signature: GaussianMixtureSignature
    ) -> dict:
        """δ, κ and the Eq. (28) threshold of every cluster of the new task against the earlier tasks' components
        (`ntkcl.models.signatures.retrieval_bound`; see the module docstring).

        Args:
            embedded: (N, T', d) every training image of the task under each earlier model and its own (last).
            clusters: (N,) each image's component of the new signature.
        """
        current = task.index
        others = [RawComponents.of(self.signatures[b]) for b in range(current)]
        own_log_dets = RawComponents.of(signature).log_dets
        truncations = self._truncations(task.num_tasks)
        records, by_task = [], [float("nan")] * current
        for cluster in range(signature.num_components):
            members = embedded[clusters == cluster]
            if not len(members):
                continue
            views = [members[:, b] for b in range(current)]
            bound = retrieval_bound(
                views, others, float(own_log_dets[cluster]), task.num_tasks, truncations, self.params.bound_epsilon
            )
            records.append({"cluster": cluster, "images": len(members), **bound.as_record()})
            for b in range(current):
                factor = float(separation_factors([views[b]], [others[b]]).min())
                by_task[b] = factor if math.isnan(by_task[b]) else min(by_task[b], factor)
        finite = [value for value in by_task if math.isfinite(value)]
        if finite:
            self.separation[current] = min(finite)
        known = self.separation[~torch.isnan(self.separation)]
        return {
            "separation_by_task": [value if math.isfinite(value) else None for value in by_task],
            "separation_factor": min(finite) if finite else None,
            "separation_so_far": float(known.min()) if len(known) else None,
            "clusters_satisfying_bound": sum(record["satisfied"] for record in records),
            "clusters": records,
        }

    def _scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(T, B): each task's retrieval score of its own embedding of every image."""
        score = (
            GaussianMixtureSignature.log_likelihood
            if self.params.retrieval_score == "mixture"
            else GaussianMixtureSignature.best_component_log_density
        )
        return torch.stack([score(signature, embeddings[t]) for t, signature in enumerate(self.signatures)])

    def predict_with_task(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.embed(images, list(range(len(self.signatures))))
        scores = self._scores(embeddings)
        if self.params.retrieval_unit == "batch":
            # One task for the whole batch: the highest joint score of its images (their summed log-densities).
            retrieved = scores.sum(dim=1).argmax().expand(len(images))
        else:
            retrieved = scores.argmax(dim=0)
        logits = self.head(embeddings[retrieved, torch.arange(len(images), device=images.device)])
        logits = logits[:, : self.seen_classes]
        if self.params.restrict_to_retrieved_task:
            ranges = torch.tensor(self._class_ranges, device=images.device)[retrieved]
            classes = torch.arange(logits.shape[1], device=images.device)
            outside = (classes < ranges[:, :1]) | (classes >= ranges[:, 1:])
            logits = logits.masked_fill(outside, float("-inf"))
        return logits, retrieved

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict_with_task(images)[0]

    def load_learned_state(self, state: dict[str, torch.Tensor], finished) -> None:
        # Signatures keep as many components as their fit used: size them from the saved state first.
        dim, params = self.backbone.embed_dim, self.params
        for index in range(len(finished)):
            saved = state.get(f"signatures.{index}.means")
            components = 0 if saved is None else saved.shape[0]
            signature = GaussianMixtureSignature(components, dim, params.covariance_type, params.score_epsilon)
            self.signatures.append(signature.to(self.device))
        # A mixed stream can have taught the head labels of tasks not reached yet: size it from the state.
        self.head.grow_to(state["head.weight"].shape[0] if "head.weight" in state else 0)
        super().load_learned_state(state, finished)
