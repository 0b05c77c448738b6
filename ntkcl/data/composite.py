"""Composite streams: a sequence of datasets, one per task.

Task t holds every class of member dataset t, after the classes of the members before it (label offsets),
so a class-incremental run classifies over the union of all members (196 classes for VTAB5T-large) and a
task-incremental run (MTIL) classifies each test image among its own dataset's classes. Each member keeps
its base label order and its own prepared train/test split.

Named composite streams are `StreamDefinition` objects registered under the `ntkcl.streams` entry-point
group (built-ins in `ntkcl.plugins.streams`); `--stream a,b,c` builds an unnamed one from dataset names.

VTAB-SimS ("varying" shifts; Kim et al., "One Size Fits All for Semantic Shifts: Adaptive Prompt Tuning for
Continual Learning", ICML 2024, arXiv 2310.12244): each task's training set keeps (100 - S)% of its own
images and replaces S% by images of the other members of the same VTAB group (Natural / Specialized /
Structured), split evenly between them (the last one takes the remainder), each with its own label. Test
sets stay as they are. `ntkcl.data.stream.mix_training_sets` is that rule; `ntkcl.data.stream.compose`
builds the stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ntkcl.data.scenarios import CLASS_INCREMENTAL, SCENARIOS
from ntkcl.errors import BadInputError

# VTAB's three groups (Zhai et al., arXiv 1910.04867), by ntkcl dataset name.
VTAB_GROUPS = {
    "caltech101": "natural",
    "cifar100": "natural",
    "dtd": "natural",
    "flowers102": "natural",
    "oxford-pets": "natural",
    "sun397": "natural",
    "svhn": "natural",
    "eurosat": "specialized",
    "patch-camelyon": "specialized",
    "resisc45": "specialized",
    "diabetic-retinopathy": "specialized",
}


@dataclass(frozen=True)
class Member:
    """One task of a composite stream: a dataset plugin name and its options (`DatasetPlugin.configure`)."""

    dataset: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SimilarityMixing:
    """The VTAB-SimS rule (module docstring): `similarity` is S in percent, `groups` maps dataset -> group."""

    similarity: int
    seed: int = 0
    groups: Mapping[str, str] = field(default_factory=lambda: dict(VTAB_GROUPS))

    def __post_init__(self) -> None:
        if not 0 <= self.similarity <= 100:
            raise ValueError("similarity is a percentage (0..100)")


@dataclass(frozen=True)
class StreamDefinition:
    """A named composite stream (the object an `ntkcl.streams` entry point points at).

    Attributes:
        name: CLI name (must equal the entry-point name).
        members: the datasets, one per task, in task order.
        scenario: the default scenario (`--scenario` overrides it).
        requires_zero_shot: the benchmark's metrics need every task evaluated before it is trained (MTIL's
            Transfer), so only methods that predict untrained tasks can run it.
        mixing: VTAB-SimS mixing of the training sets, or None.
        description, citation: shown by `ntkcl datasets` and copied into model cards.
    """

    name: str
    members: tuple[Member, ...]
    scenario: str = CLASS_INCREMENTAL
    requires_zero_shot: bool = False
    mixing: SimilarityMixing | None = None
    description: str = ""
    citation: str = ""

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}")
        if not self.members:
            raise ValueError("a composite stream needs at least one member")


def parse_members(text: str) -> list[Member]:
    """`a,b,c` (the ad-hoc `--stream` form) as members; empty names are bad input."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise BadInputError(f"--stream {text!r}: empty dataset name in the comma-separated list")
    return [Member(name) for name in names]
