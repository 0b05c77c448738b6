"""CODA-Prompt: Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free
Continual Learning", CVPR 2023, arXiv 2211.13218, as the official implementation (GT-RIPL/CODA-Prompt)
computes it.

In each of blocks 0-4 a pool of M = 100 prompt components P_m (8 tokens: 4 key and 4 value tokens of a
prefix-tuning prompt), keys K_m and attention vectors A_m, M / T of each per task of a T-task stream. An
image's prompt in a block is Σ_m α_m P_m with α_m = cos(q ⊙ A_m, K_m), q the frozen model's final-norm CLS
token, over the components of every task so far (no softmax, no top-k: the whole weighting is learned end to
end). At the start of each task its new components, keys and attention vectors are drawn by Gram-Schmidt
against the earlier (trained) rows; the earlier rows are frozen. Loss: cross-entropy over the current task's
classes plus ortho_weight · Σ_blocks Σ_{X ∈ K, A, P} mean((X Xᵀ - I)²) over the rows so far (the official
scripts set the weight to 0 since the Gram-Schmidt re-initialisation; the term is kept as an option). The
head reads the final-norm CLS token. Two backbone passes per image (frozen query pass without autograd,
prompted pass).

Quirks of the official code, kept: the Gram-Schmidt is classical, projecting each new draw on every earlier
row separately although trained rows are no longer orthogonal to each other (`gram_schmidt_rows`); the
components per task are ⌊M / T⌋, so M mod T components are never used. Not kept: its restart when an earlier
row has a squared norm below 1e-8 (trained rows never do here). The presets set the official schedule as the
engine's cosine, with Adam (β = 0.9, 0.999) and no weight decay; the official `CosineSchedule` is a quarter
cosine, base·cos(99π·e / (200(E-1))) at epoch e of E, ending at 1.6% of the rate, where the engine's cosine
anneals to 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from ntkcl.errors import BadInputError
from ntkcl.methods.base import MethodParams, StepOutput, TaskInfo
from ntkcl.methods.dualprompt import check_blocks
from ntkcl.methods.prompting import PromptMethod
from ntkcl.models.backbone import Backbone
from ntkcl.models.prompts import ComponentPool, InsertedPrompts


class CODAPromptParams(MethodParams):
    """Hyper-parameters; defaults are the official scripts' (`--prompt_param 100 8 0.0`)."""

    pool_size: int = Field(100, ge=1, description="prompt components per block over the whole stream (M)")
    length: int = Field(8, ge=2, description="tokens per component: half keys, half values")
    blocks: list[int] = Field([0, 1, 2, 3, 4], description="blocks with prompts")
    ortho_weight: float = Field(0.0, ge=0, description="weight of the orthogonality penalty")

    @field_validator("length")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even (as many key tokens as value tokens)")
        return value


class CODAPrompt(PromptMethod):
    name = "coda-prompt"
    Params = CODAPromptParams
    citation = (
        "@inproceedings{smith2023coda, title={CODA-Prompt: COntinual Decomposed Attention-based Prompting for "
        "Rehearsal-Free Continual Learning}, author={Smith, James Seale and Karlinsky, Leonid and Gutta, Vyshnavi "
        "and Cascante-Bonilla, Paola and Kim, Donghyun and Arbelle, Assaf and Panda, Rameswar and Feris, Rogerio "
        "and Kira, Zsolt}, booktitle={CVPR}, pages={11909--11919}, year={2023}}"
    )

    def __init__(self, backbone: Backbone, params: CODAPromptParams):
        super().__init__(backbone, params)
        if not params.blocks:
            raise BadInputError("method.params.blocks is empty: no prompt anywhere")
        check_blocks(backbone, "blocks", params.blocks)
        dim = backbone.embed_dim
        self.pools = nn.ModuleDict({str(block): ComponentPool(params.length, dim, dim) for block in params.blocks})
        # ⌊pool_size / tasks⌋: known from the stream, or from the shapes of a saved state
        self.components_per_task: int | None = None

    @property
    def prompted_blocks(self) -> list[int]:
        return list(self.params.blocks)

    def begin_stream(self, tasks: Sequence[TaskInfo]) -> None:
        super().begin_stream(tasks)
        if self.params.pool_size < len(tasks):
            raise BadInputError(
                f"coda-prompt gives each task pool_size // tasks components: method.params.pool_size="
                f"{self.params.pool_size} is less than the stream's {len(tasks)} tasks"
            )
        self.components_per_task = self.params.pool_size // len(tasks)
        used = self.components_per_task * len(tasks)
        if used > self.backbone.embed_dim:
            raise BadInputError(
                f"coda-prompt's {used} keys of method.params.pool_size={self.params.pool_size} cannot be "
                f"orthogonal in {self.backbone.name}'s {self.backbone.embed_dim} dimensions"
            )

    def load_learned_state(self, state: dict[str, torch.Tensor], finished: Sequence[TaskInfo]) -> None:
        first_keys = next((value for key, value in state.items() if key.endswith(".keys.0")), None)
        if first_keys is not None:
            self.components_per_task = first_keys.shape[0]
        super().load_learned_state(state, finished)

    def begin_task(self, task: TaskInfo) -> None:
        if self.components_per_task is None:
            raise RuntimeError("coda-prompt needs the stream's tasks (begin_stream) before its first task")
        super().begin_task(task)
        for pool in self.pools.values():
            pool.grow(self.components_per_task, self.device)

    def prompts_for(self, queries: torch.Tensor, batch: int, training: bool) -> tuple[InsertedPrompts, StepOutput]:
        prompts = InsertedPrompts(prefix={int(block): pool(queries) for block, pool in self.pools.items()})
        penalty = queries.new_zeros(())
        if training and self.params.ortho_weight > 0:
            penalty = sum(pool.orthogonality_penalty() for pool in self.pools.values())
            return prompts, StepOutput(self.params.ortho_weight * penalty, {"ortho": penalty.detach()})
        return prompts, StepOutput(penalty)
