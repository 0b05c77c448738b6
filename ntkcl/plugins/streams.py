"""The built-in composite streams: MTIL orders I and II, VTAB5T-large, and VTAB-Sim25/50/75.

* `mtil-order1`, `mtil-order2`: the eleven MTIL datasets in ZSCL's two orders (Zheng et al., "Preventing
  Zero-Shot Transfer Degradation in Continual Learning of Vision-Language Models", ICCV 2023, arXiv
  2303.06628; KeepLoRA, arXiv 2601.19659), task-incremental: each dataset is classified among its own classes,
  every dataset is scored before it is trained, so only zero-shot methods run them.
* `vtab5t-large`: EuroSAT, Flowers102, Oxford Pets, PatchCamelyon, RESISC45 on their full splits, one dataset
  per task, class-incremental over the 196 classes of the union (the PROTEUS authors' precursor code).
* `vtab-sim25`, `vtab-sim50`, `vtab-sim75`: the same five tasks with AdaPromptCL's VTAB-SimS mixing
  (Kim et al., ICML 2024, arXiv 2310.12244): S% of each task's training images are replaced by images of the
  other members of its VTAB group (EuroSAT, PatchCamelyon and RESISC45 are "specialized", Flowers and Pets
  "natural"), drawn with seed 0; the resulting file list is written to the run folder.
"""

from __future__ import annotations

from ntkcl.data.composite import Member, SimilarityMixing, StreamDefinition
from ntkcl.data.scenarios import TASK_INCREMENTAL

MTIL_CITATION = (
    "@inproceedings{zheng2023preventing, title={Preventing Zero-Shot Transfer Degradation in Continual Learning "
    "of Vision-Language Models}, author={Zheng, Zangwei and Ma, Mingyuan and Wang, Kai and Qin, Ziheng and Yue, "
    "Xiangyu and You, Yang}, booktitle={ICCV}, year={2023}}"
)
SIMS_CITATION = (
    "@inproceedings{kim2024one, title={One Size Fits All for Semantic Shifts: Adaptive Prompt Tuning for "
    "Continual Learning}, author={Kim, Doyoung and Yoon, Susik and Park, Dongmin and Lee, Youngjun and Song, "
    "Hwanjun and Bang, Jihwan and Lee, Jae-Gil}, booktitle={ICML}, year={2024}}"
)
MTIL_ORDER_1 = (
    "fgvc-aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers102", "food101", "mnist", "oxford-pets",
    "stanford-cars", "sun397",
)  # fmt: skip
MTIL_ORDER_2 = (
    "stanford-cars", "food101", "mnist", "oxford-pets", "flowers102", "sun397", "fgvc-aircraft", "caltech101",
    "dtd", "eurosat", "cifar100",
)  # fmt: skip
VTAB5T = ("eurosat", "flowers102", "oxford-pets", "patch-camelyon", "resisc45")
SIMS_SEED = 0


def _members(names: tuple[str, ...]) -> tuple[Member, ...]:
    return tuple(Member(name) for name in names)


def _mtil(name: str, order: tuple[str, ...], label: str) -> StreamDefinition:
    return StreamDefinition(
        name,
        _members(order),
        scenario=TASK_INCREMENTAL,
        requires_zero_shot=True,
        description=f"MTIL order {label}: eleven datasets, task-incremental, zero-shot scored (Transfer/Avg/Last)",
        citation=MTIL_CITATION,
    )


def _sims(similarity: int) -> StreamDefinition:
    return StreamDefinition(
        f"vtab-sim{similarity}",
        _members(VTAB5T),
        mixing=SimilarityMixing(similarity, seed=SIMS_SEED),
        description=f"VTAB5T with {similarity}% of each task's training images from its VTAB group (VTAB-SimS)",
        citation=SIMS_CITATION,
    )


mtil_order1 = _mtil("mtil-order1", MTIL_ORDER_1, "I")
mtil_order2 = _mtil("mtil-order2", MTIL_ORDER_2, "II")
vtab5t_large = StreamDefinition(
    "vtab5t-large",
    _members(VTAB5T),
    description="five VTAB datasets on their full splits, one per task, class-incremental over 196 classes",
)
vtab_sim25 = _sims(25)
vtab_sim50 = _sims(50)
vtab_sim75 = _sims(75)
