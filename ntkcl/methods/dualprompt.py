"""DualPrompt: Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning",
ECCV 2022, arXiv 2204.04799, as the official implementation (google-research/l2p, JAX) computes it.

Prefix-tuning prompts (keys and values added to a block's attention, no new tokens):

* G-prompt, shared by all tasks: one prompt of L_g key and L_g value tokens (L_g = 5) in blocks 0 and 1,
  trained on every task.
* E-prompt: a pool of M prompts (M = 10) of L_e key and L_e value tokens (L_e = 5 in the official CIFAR-100
  configuration, 20 in its ImageNet-R one) in blocks 2, 3 and 4, with one key per pool entry shared by the
  three blocks. Training task t uses entry t (`use_prompt_mask`: the task identity picks it) and pulls key t
  towards the queries, λ · mean_b (1 - cos(q_b, k_t)) with λ = 1; at test time each image takes the entry
  whose key is most cosine-similar to its query (the frozen model's final-norm CLS token).

Loss: cross-entropy over the current task's classes (`train_mask`) plus the pull loss; the head reads the
final-norm CLS token. Two backbone passes per image (frozen query pass without autograd, prompted pass).
The stream may have at most M tasks.

Departures, each an option: `match_trained_keys` (default false) restricts test-time matching to the keys
of tasks trained so far; the official code, as here by default, matches against the whole pool, untrained
keys included. Quirks kept: prompts and keys start uniform in [0, 0.01) (flax's `uniform()`); the presets
set the official gradient clipping at norm 1, Adam at a constant rate. CODA-Prompt's re-implementation
differs (one key per block, lengths 20 and 6 counted as keys and values together); this follows the
original.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from ntkcl.errors import BadInputError
from ntkcl.methods.base import MethodParams, StepOutput, TaskInfo
from ntkcl.methods.prompting import PromptMethod, no_prompt_loss
from ntkcl.models.backbone import Backbone
from ntkcl.models.prompts import InsertedPrompts, key_query_similarity


class DualPromptParams(MethodParams):
    """Hyper-parameters; defaults are the official ImageNet-R configuration's (`imr_dualprompt.py`)."""

    g_blocks: list[int] = Field([0, 1], description="blocks with the G-prompt")
    g_length: int = Field(5, ge=1, description="G-prompt key tokens (and as many value tokens)")
    e_blocks: list[int] = Field([2, 3, 4], description="blocks with the E-prompt")
    e_length: int = Field(20, ge=1, description="E-prompt key tokens (and as many value tokens)")
    pool_size: int = Field(10, ge=1, description="E-prompts in the pool: at least the number of tasks")
    pull_weight: float = Field(1.0, ge=0, description="weight of the key-query pull loss")
    match_trained_keys: bool = Field(False, description="test-time matching only among trained tasks' keys")
    init_scale: float = Field(0.01, gt=0, description="prompts and keys start uniform in [0, init_scale)")


def check_blocks(backbone: Backbone, field: str, blocks: Sequence[int]) -> None:
    """Refuse block lists that are not increasing, distinct indices of the backbone's blocks."""
    depth = len(backbone.blocks)
    if list(blocks) != sorted(set(blocks)) or (blocks and (blocks[0] < 0 or blocks[-1] >= depth)):
        raise BadInputError(
            f"method.params.{field}={list(blocks)} must be increasing, distinct block indices of "
            f"{backbone.name}'s {depth} blocks"
        )


class DualPrompt(PromptMethod):
    name = "dualprompt"
    Params = DualPromptParams
    citation = (
        "@inproceedings{wang2022dualprompt, title={DualPrompt: Complementary Prompting for Rehearsal-free "
        "Continual Learning}, author={Wang, Zifeng and Zhang, Zizhao and Ebrahimi, Sayna and Sun, Ruoxi and Zhang, "
        "Han and Lee, Chen-Yu and Ren, Xiaoqi and Su, Guolong and Perot, Vincent and Dy, Jennifer and Pfister, "
        "Tomas}, booktitle={ECCV}, pages={631--648}, year={2022}}"
    )

    def __init__(self, backbone: Backbone, params: DualPromptParams):
        super().__init__(backbone, params)
        check_blocks(backbone, "g_blocks", params.g_blocks)
        check_blocks(backbone, "e_blocks", params.e_blocks)
        if not params.g_blocks and not params.e_blocks:
            raise BadInputError("method.params.g_blocks and e_blocks are both empty: no prompt anywhere")
        dim, scale = backbone.embed_dim, params.init_scale
        self.g_prompts = nn.ParameterDict(
            {str(block): nn.Parameter(torch.rand(2 * params.g_length, dim) * scale) for block in params.g_blocks}
        )
        self.e_prompts = nn.ParameterDict(
            {
                str(block): nn.Parameter(torch.rand(params.pool_size, 2 * params.e_length, dim) * scale)
                for block in params.e_blocks
            }
        )
        self.e_keys = nn.Parameter(torch.rand(params.pool_size, dim) * scale) if params.e_blocks else None

    @property
    def prompted_blocks(self) -> list[int]:
        return sorted({*self.params.g_blocks, *self.params.e_blocks})

    def begin_stream(self, tasks: Sequence[TaskInfo]) -> None:
        super().begin_stream(tasks)
        if self.params.e_blocks and len(tasks) > self.params.pool_size:
            raise BadInputError(
                f"dualprompt keeps one E-prompt per task: the stream has {len(tasks)} tasks, "
                f"method.params.pool_size={self.params.pool_size}"
            )

    def prompts_for(self, queries: torch.Tensor, batch: int, training: bool) -> tuple[InsertedPrompts, StepOutput]:
        prompts = InsertedPrompts()
        loss = no_prompt_loss(queries)
        if self.params.e_blocks:
            similarity = key_query_similarity(queries.detach(), self.e_keys)
            if training:
                chosen = torch.full((batch,), self.task_index, dtype=torch.long, device=queries.device)
                pull = (1 - similarity[:, self.task_index]).mean()
                loss = StepOutput(self.params.pull_weight * pull, {"pull": pull.detach()})
            else:
                searched = similarity[:, : len(self.heads)] if self.params.match_trained_keys else similarity
                chosen = searched.argmax(dim=1)
            # E before G in the keys and values of a block holding both, as the official code concatenates them
            for block, pool in self.e_prompts.items():
                prompts.add_prefix(int(block), pool[chosen])
        for block, prompt in self.g_prompts.items():
            prompts.add_prefix(int(block), prompt.expand(batch, -1, -1))
        return prompts, loss
