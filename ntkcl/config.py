"""Typed run configuration.

A run's configuration is layered: defaults < stream preset < method preset (`ntkcl/presets/`) <
`--config FILE` (TOML or YAML) < command-line flags and `--set key=value`. The fully resolved result is
written to `config.json` in the run directory; every invalid value is reported with its dotted field name.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ntkcl.data.scenarios import SCENARIOS
from ntkcl.errors import BadInputError
from ntkcl.files import atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


Precision = Literal["auto", "fp32", "bf16"]
Scenario = Literal[SCENARIOS]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StreamMember(_Section):
    """One task of a composite stream: a dataset plugin and its options."""

    dataset: str
    options: dict[str, Any] = Field(default_factory=dict)


class StreamConfig(_Section):
    """Which data and how it is cut into tasks.

    `dataset` names a dataset plugin (split by classes), a composite stream (`ntkcl.streams`: one dataset
    per task), or an ad-hoc composite `a,b,c`; `members` lists a composite's datasets with their options
    (filled in from the name when not given). `scenario` is class- or task-incremental; null takes the
    stream's own (class-incremental unless a named stream says otherwise).
    For a single dataset, `init_classes` / `increment` default to the plugin's protocol (the NTK-CL
    paper's); `class_order_seed` picks `np.random.seed(s); np.random.permutation(n)`; null keeps the base
    order; `class_order` gives the permutation explicitly. Composite streams keep each dataset's base order.
    """

    dataset: str = "digits"
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    members: list[StreamMember] | None = None
    scenario: Scenario | None = None
    init_classes: int | None = Field(default=None, ge=1)
    increment: int | None = Field(default=None, ge=1)
    class_order_seed: int | None = 0
    class_order: list[int] | None = None
    augment: Literal["paper", "resize", "clip"] = "paper"
    data_root: Path | None = None


class BackboneConfig(_Section):
    """A stock timm ViT by any name timm accepts (`arch.tag`, a bare architecture, `hf-hub:`, `local-dir:`).

    Weights come from the Hub cache, `weights` (a local file or folder), or a seeded random initialisation.
    Pre-trained weights must fill every tensor but the classifier head; `allow_partial` loads what fits and
    warns instead of refusing.
    """

    name: str = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    pretrained: bool = True
    weights: Path | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    init_seed: int = 0
    normalize: Literal["none", "timm", "imagenet", "clip"] = "none"
    allow_partial: bool = False


class MethodConfig(_Section):
    """The method's entry-point name and its hyper-parameters (validated by the method's own model)."""

    name: str = "ntk-cl"
    params: dict[str, Any] = Field(default_factory=dict)


TORCH_OPTIMIZERS = ("sgd", "adam", "adamw")


class OptimConfig(_Section):
    """Per-task optimisation: a new optimizer and schedule for every task.

    The defaults are the papers' (torch optimizer, cosine schedule stepped per epoch). timm's options are
    opt-in: `warmup_epochs`, `sched_on_updates`, `clip_grad`, `accumulation_steps`, `layer_decay`,
    `weight_decay_exclude_1d` and any timm optimizer name (see `ntkcl/engine/optim.py`).
    """

    optimizer: str = Field(default="sgd", description="sgd, adam, adamw (torch), or a timm optimizer name")
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    epochs: int = Field(default=5, ge=0)
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=128, ge=1)
    scheduler: Literal["cosine", "constant"] = "cosine"
    min_lr: float = Field(default=0.0, ge=0)
    warmup_epochs: int = Field(default=0, ge=0, description="linear warm-up from warmup_lr (timm scheduler)")
    warmup_lr: float = Field(default=1e-5, ge=0)
    sched_on_updates: bool = Field(default=False, description="step the schedule after every optimizer update")
    clip_grad: float | None = Field(default=None, gt=0, description="gradient clipping threshold")
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    accumulation_steps: int = Field(
        default=1, ge=1, description="micro-batches per optimizer step; batch_size stays the global batch of a step"
    )
    layer_decay: float | None = Field(default=None, gt=0, le=1, description="layer-wise learning-rate decay")
    weight_decay_exclude_1d: bool = Field(default=False, description="no weight decay on 1-D parameters and biases")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        value = value.lower()
        if value in TORCH_OPTIMIZERS:
            return value
        from timm.optim import list_optimizers

        if value not in list_optimizers():
            raise ValueError("must be sgd, adam, adamw or a timm optimizer (timm.optim.list_optimizers())")
        return value

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> OptimConfig:
        if self.batch_size % self.accumulation_steps:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into accumulation_steps={self.accumulation_steps} "
                "equal micro-batches"
            )
        return self


class RuntimeConfig(_Section):
    """Where and how the run executes. `seed` is the training seed (separate from the class order)."""

    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"
    num_workers: int | None = Field(default=None, ge=0, description="DataLoader workers; null = min(4, CPUs)")
    gpus: list[int] | None = None
    nproc: int = Field(default=1, ge=1)
    snapshot_epochs: int = Field(
        default=1, ge=0, description="save a resumable in-task snapshot every N epochs (0: only on Ctrl+C / SIGTERM)"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda"):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value


class RunConfig(_Section):
    """Everything that defines a run; `config.json` in the run directory is this model, resolved."""

    stream: StreamConfig = Field(default_factory=StreamConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


def describe_validation_error(error: ValidationError) -> str:
    """One line naming the first invalid field, what was given and what is allowed."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "config"
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"invalid {location}: {first['msg']}{shown}"


def deep_merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; `override` wins. Neither argument is modified."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_config_file(path: Path) -> dict:
    """A TOML (.toml) or YAML (.yaml/.yml) file as a dict; errors name the file."""
    if not path.is_file():
        raise BadInputError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise BadInputError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0]
        raise BadInputError(f"config file {path} cannot be parsed: {reason}") from error
    if not isinstance(data, dict):
        raise BadInputError(f"config file {path} must hold a table/mapping at the top level")
    return data


def parse_assignment(assignment: str) -> dict:
    """`a.b.c=value` as a nested dict; the value is read as TOML/JSON (numbers, booleans, lists) or text."""
    key, separator, raw = assignment.partition("=")
    if not separator or not key.strip():
        raise BadInputError(f"--set expects KEY=VALUE, got {assignment!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = None if raw in ("null", "none", "None") else raw
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def parse_assignments(assignments: list[str]) -> tuple[dict, list[str]]:
    """`--set` assignments as one override dict, plus the keys they set to a whole table.

    A table given with `--set` replaces the table the layers below hold instead of merging into it, so
    `--set backbone.model_kwargs={}` clears a preset's keyword arguments.
    """
    overrides: dict = {}
    replaced = []
    for assignment in assignments:
        parsed = parse_assignment(assignment)
        overrides = deep_merge(overrides, parsed)
        key = assignment.partition("=")[0].strip()
        if isinstance(_lookup(parsed, key), dict):
            replaced.append(key)
    return overrides, replaced


def _lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def without_key(data: dict, dotted: str) -> dict:
    """A copy of `data` without the nested key `a.b.c` (the same content when it is absent)."""
    head, _, rest = dotted.partition(".")
    if head not in data:
        return copy.deepcopy(data)
    copied = {key: copy.deepcopy(value) for key, value in data.items() if key != head}
    if rest and isinstance(data[head], dict):
        copied[head] = without_key(data[head], rest)
    elif rest:
        copied[head] = copy.deepcopy(data[head])
    return copied


def validate(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise BadInputError(describe_validation_error(error)) from error


def save_config(config: RunConfig, path: Path) -> None:
    atomic_write_text(path, config.model_dump_json(indent=2) + "\n")


def load_config(path: Path) -> RunConfig:
    return validate(json.loads(path.read_text(encoding="utf-8")))
