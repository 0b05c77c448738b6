"""L2P: Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022, arXiv 2112.08654, as the official
implementation (google-research/l2p, JAX) computes it.

A pool of M prompts (M = 10), each of L tokens (L = 5) with a key. The query of an image is the frozen
model's final-norm CLS token; the k prompts (k = 5) whose keys are most cosine-similar to it are prepended to
the patch tokens at the input (prompt-tuning, after the CLS token), k·L tokens that join every block. The
classifier reads the mean of the final-norm outputs at the prompt positions (the code's `vit_classifier =
"prompt"`). Loss: cross-entropy over the current task's classes (`train_mask`) plus the surrogate pull loss
λ · mean_b Σ_chosen (1 - cos(q_b, key)) with λ = 1 (`pull_constraint_coeff`). Prompts, keys and the linear
head are trained; the backbone is frozen. Two backbone passes per image, in training and prediction: the
frozen query pass (no autograd) and the prompted pass; the patch embedding is computed once for both.

Departures, each an option:

* `batchwise_selection` (default false). The official CIFAR-100 configuration picks, for the whole batch, the
  k prompts chosen most often in it, in training and at test time, so a test image's prediction depends on
  the other images of its batch, and under DDP each process's share of a batch would choose differently.
  Here each image uses its own top-k (the paper's formulation); true applies the batch-wise choice in
  training only.
* `readout` "prompt_mean" (default, the official head) or "cls" (the final-norm CLS token, as CODA-Prompt's
  re-implementation of L2P reads it).

Quirks of the official code, kept: prompts and keys start uniform in [0, 0.01) (flax's `uniform()`); the
pull loss in the code is -Σ cos / B, with the same gradient as the form above. The presets set the official
gradient clipping (`optim.clip_grad = 1.0`), Adam at a constant rate and 5 epochs per task. The repository's
`cifar100_l2p.py` at its latest commit uses length 10 and top-4; the defaults here are the paper's
(length 5, top-5).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ntkcl.errors import BadInputError
from ntkcl.methods.base import MethodParams, StepOutput
from ntkcl.methods.prompting import PromptMethod, no_prompt_loss
from ntkcl.models.backbone import Backbone
from ntkcl.models.prompts import InsertedPrompts, PromptPool, pull_constraint, select_top_k


class L2PParams(MethodParams):
    """Hyper-parameters; defaults are the paper's and the official code's."""

    pool_size: int = Field(10, ge=1, description="prompts in the pool (M)")
    length: int = Field(5, ge=1, description="tokens per prompt (L)")
    top_k: int = Field(5, ge=1, description="prompts chosen per image (N)")
    pull_weight: float = Field(1.0, ge=0, description="weight of the key-query pull loss")
    batchwise_selection: bool = Field(False, description="training batches use their k most frequent prompts")
    readout: Literal["prompt_mean", "cls"] = Field("prompt_mean", description="feature the head reads")
    init_scale: float = Field(0.01, gt=0, description="prompts and keys start uniform in [0, init_scale)")


class L2P(PromptMethod):
    name = "l2p"
    Params = L2PParams
    citation = (
        "@inproceedings{wang2022l2p, title={Learning to Prompt for Continual Learning}, author={Wang, Zifeng and "
        "Zhang, Zizhao and Lee, Chen-Yu and Zhang, Han and Sun, Ruoxi and Ren, Xiaoqi and Su, Guolong and Perot, "
        "Vincent and Dy, Jennifer and Pfister, Tomas}, booktitle={CVPR}, pages={139--149}, year={2022}}"
    )

    def __init__(self, backbone: Backbone, params: L2PParams):
        super().__init__(backbone, params)
        if params.top_k > params.pool_size:
            raise BadInputError(f"method.params.top_k={params.top_k} exceeds pool_size={params.pool_size}")
        dim = backbone.embed_dim
        self.pool = PromptPool(params.pool_size, params.length, dim, dim, params.init_scale)

    @property
    def prompted_blocks(self) -> list[int]:
        return [0]

    def prompts_for(self, queries: torch.Tensor, batch: int, training: bool) -> tuple[InsertedPrompts, StepOutput]:
        params = self.params
        similarity = self.pool.similarity(queries)
        chosen = select_top_k(similarity, params.top_k, batchwise=training and params.batchwise_selection)
        prompts = InsertedPrompts(prepend={0: self.pool.gather(chosen)})
        if not training:
            return prompts, no_prompt_loss(queries)
        pull = pull_constraint(similarity, chosen)
        return prompts, StepOutput(params.pull_weight * pull, {"pull": pull.detach()})

    def readout(self, tokens: torch.Tensor, prompts: InsertedPrompts) -> torch.Tensor:
        if self.params.readout == "cls":
            return self.backbone.pool(tokens)
        start = self.backbone.num_prefix_tokens
        return self.backbone.vit.norm(tokens)[:, start : start + prompts.prepend[0].shape[1]].mean(dim=1)
