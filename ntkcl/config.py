"""Typed run configuration.

A run's configuration is layered: defaults < stream preset < method preset (`ntkcl/presets/`) <
`--config FILE` (TOML or YAML) < command-line flags and `--set key=value`. The fully resolved result is
written to `config.json` in the run directory; every invalid value is reported with its dotted field name.

Every number is bounded here, so that a value no run could use is refused before anything runs: seeds fit
numpy's 32 bits, epochs and batch sizes stay within what a run can finish, NaN and infinity are refused in
every field (method hyper-parameters included, through `StrictModel`), and no integer exceeds 2**32 - 1.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ntkcl.data.scenarios import SCENARIOS
from ntkcl.errors import BadInputError
from ntkcl.files import atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


MAX_INTEGER = 2**32 - 1
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 1 << 20
MAX_WORKERS = 256
MAX_PROCESSES = 1024
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"

Precision = Literal["auto", "fp32", "bf16"]
Feed = Literal["auto", "loader", "device"]
Scenario = Literal[SCENARIOS]
# numpy's and torch's seeds are unsigned 32-bit integers.
Seed = Annotated[int, Field(ge=0, le=MAX_INTEGER)]


def _non_empty(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


# An empty string would silently mean the current folder.
NonEmptyPath = Annotated[Path, BeforeValidator(_non_empty)]


def out_of_range_number(value: Any, path: str = "") -> tuple[str, Any] | None:
    """The dotted path inside `value` ("" for `value` itself) and the first NaN/infinite float or integer
    beyond 2**32 - 1 found there, else None."""
    if isinstance(value, (bool, BaseModel)):  # bools are ints; nested models check their own fields
        return None
    if isinstance(value, float) and not math.isfinite(value) or isinstance(value, int) and abs(value) > MAX_INTEGER:
        return path, value
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = out_of_range_number(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _takes_numbers_only(annotation: Any) -> bool:
    """Whether a field's type is int or float (or a union of them with None): no text or boolean means one."""
    if get_origin(annotation) is Annotated:
        return _takes_numbers_only(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
        return bool(kinds) and all(_takes_numbers_only(kind) for kind in kinds)
    return annotation in (int, float)


class StrictModel(BaseModel):
    """Unknown keys are refused, and so are NaN, infinity and integers beyond 2**32 - 1 in any field.

    The base of every config section and of every method's hyper-parameters (`MethodParams`), so new fields
    and new methods are covered without a line of their own: a weight that can only produce NaN is bad input.
    """

    # No protected namespace: hyper-parameters such as NTK-CL's `model_name` are fields, and pydantic before
    # 2.10 warns about every field that starts with `model_`.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A number field takes numbers only: pydantic's lax mode would read `true`, `"2"` or YAML's `yes`."""
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and isinstance(value, (bool, str)) and _takes_numbers_only(field.annotation):
            raise ValueError(f"must be a number, not the {type(value).__name__} {value!r}")
        return value

    @field_validator("*")
    @classmethod
    def _numbers_in_range(cls, value: Any) -> Any:
        found = out_of_range_number(value)
        if found is None:
            return value
        path, number = found
        where = f" ({path} is {number!r})" if path else ""
        raise ValueError(f"numbers must be finite and integers at most {MAX_INTEGER} in size{where}")


class _Section(StrictModel):
    model_config = ConfigDict(validate_assignment=True)


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
    class_order_seed: Seed | None = 0
    class_order: list[Annotated[int, Field(ge=0)]] | None = None
    augment: Literal["paper", "resize", "clip", "timm"] = "paper"
    data_root: NonEmptyPath | None = None


class BackboneConfig(_Section):
    """A stock timm ViT by any name timm accepts (`arch.tag`, a bare architecture, `hf-hub:`, `local-dir:`).

    Weights come from the Hub cache, `weights` (a local file or folder), or a seeded random initialisation.
    Pre-trained weights must fill every tensor but the classifier head; `allow_partial` loads what fits and
    warns instead of refusing.
    """

    name: str = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    pretrained: bool = True
    weights: NonEmptyPath | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    init_seed: Seed = 0
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
    `weight_decay_exclude_1d` and any timm optimizer name (see `ntkcl/engine/optim.py`). `scheduler` may also be
    "onecycle" (torch's OneCycleLR peaking at `lr`, stepped per batch, as KeepLoRA trains); `task_epochs` gives
    each task its own number of epochs (one entry per task), overriding `epochs`.
    """

    optimizer: str = Field(default="sgd", description="sgd, adam, adamw (torch), or a timm optimizer name")
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    epochs: int = Field(default=5, ge=0, le=MAX_EPOCHS)
    batch_size: int = Field(default=16, ge=1, le=MAX_BATCH_SIZE)
    eval_batch_size: int = Field(default=128, ge=1, le=MAX_BATCH_SIZE)
    scheduler: Literal["cosine", "constant", "onecycle"] = "cosine"
    min_lr: float = Field(default=0.0, ge=0)
    warmup_epochs: int = Field(
        default=0, ge=0, le=MAX_EPOCHS, description="linear warm-up from warmup_lr (timm scheduler)"
    )
    warmup_lr: float = Field(default=1e-5, ge=0)
    sched_on_updates: bool = Field(
        default=False, description="step the schedule after every training step (global batch)"
    )
    clip_grad: float | None = Field(default=None, gt=0, description="gradient clipping threshold")
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    accumulation_steps: int = Field(
        default=1,
        ge=1,
        le=MAX_BATCH_SIZE,
        description="micro-batches per optimizer step; batch_size stays the global batch of a step",
    )
    layer_decay: float | None = Field(default=None, gt=0, le=1, description="layer-wise learning-rate decay")
    weight_decay_exclude_1d: bool = Field(default=False, description="no weight decay on 1-D parameters and biases")
    task_epochs: list[Annotated[int, Field(ge=0, le=MAX_EPOCHS)]] | None = None

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
    def _consistent(self) -> OptimConfig:
        if self.scheduler == "onecycle" and (self.warmup_epochs or self.sched_on_updates):
            raise ValueError(
                "onecycle has its own warm-up and steps after every update; drop warmup_epochs / sched_on_updates"
            )
        if self.batch_size % self.accumulation_steps:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into accumulation_steps={self.accumulation_steps} "
                "equal micro-batches"
            )
        return self

    def epochs_of(self, task_index: int) -> int:
        """Epochs of task `task_index`."""
        return self.epochs if self.task_epochs is None else self.task_epochs[task_index]


class RuntimeConfig(_Section):
    """Where and how the run executes. `seed` is the training seed (separate from the class order)."""

    seed: Seed = 0
    device: str = "auto"
    precision: Precision = "auto"
    num_workers: int | None = Field(
        default=None, ge=0, le=MAX_WORKERS, description="DataLoader workers; null = min(4, CPUs)"
    )
    gpus: list[Annotated[int, Field(ge=0)]] | None = None
    nproc: int = Field(default=1, ge=1, le=MAX_PROCESSES)
    log: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="experiment trackers (ntkcl[tensorboard], ntkcl[wandb])"
    )
    snapshot_epochs: int = Field(
        default=1,
        ge=0,
        le=MAX_EPOCHS,
        description="save a resumable in-task snapshot every N epochs (0: only on Ctrl+C / SIGTERM)",
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="torch.compile the method's backbone passes; auto = on CUDA for runs long enough to pay back",
    )
    no_training_reference: bool = Field(
        default=True,
        description="also score SimpleCIL on the run's backbone and stream, the no-training reference printed "
        "after the summary (one pass over the training and the test images)",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        # Whether this host has that device is checked with the processes (`engine.launch.plan_processes`).
        if not re.fullmatch(DEVICE_PATTERN, value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value


class DataConfig(_Section):
    """How images reach the model (`ntkcl.engine.feed`); the choice never changes a run's results on CPU.

    `feed`: "loader" decodes and transforms every image in DataLoader workers; "device" decodes each split
    once into a memory-mapped uint8 cache and runs the batched transforms on the training device; "auto"
    takes "device" on CUDA when the augmentation has a batched form and the decoded splits fit
    `feed_memory_fraction` of the host's physical memory, else "loader".
    """

    feed: Feed = "auto"
    feed_memory_fraction: float = Field(
        default=0.5, gt=0, le=1, description="share of host memory the decoded splits may take under feed=auto"
    )


class RunConfig(_Section):
    """Everything that defines a run; `config.json` in the run directory is this model, resolved."""

    stream: StreamConfig = Field(default_factory=StreamConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


def describe_validation_error(error: ValidationError, prefix: str = "", owner: str = "") -> str:
    """One line naming the first invalid field, what was given and what is allowed.

    Args:
        error: pydantic's error.
        prefix: the dotted path of the validated model inside the run config (`method.params`).
        owner: appended to the field name (` for ntk-cl`).
    """
    first = error.errors()[0]
    location = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "") or "config"
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    reason = first["msg"].removeprefix("Value error, ")
    return f"invalid {location}{owner}: {reason}{shown}"


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


def check_config_key(dotted: str, option: str) -> None:
    """A BadInputError unless `dotted` names a config section, a field, or a key inside a table field
    (`method.params.*`, `backbone.model_kwargs.*`, `stream.dataset_options.*`)."""
    parts = dotted.strip().split(".")
    if not all(parts):
        raise BadInputError(f"{option} key {dotted.strip()!r} has an empty part")
    model: type[BaseModel] | None = RunConfig
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        if model is None:
            raise BadInputError(f"{option} {dotted}: {'.'.join(parts[:depth])} is a value, not a table")
        field = model.model_fields.get(part)
        if field is None:
            raise BadInputError(f"{option} {dotted}: {where} is not a config field")
        annotation = field.annotation
        if get_origin(annotation) is dict:
            return
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


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
    if not all(parts):
        raise BadInputError(f"--set key {key.strip()!r} has an empty part")
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
    """A saved config.json; BadInputError naming the file when it is unreadable, not JSON or invalid."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise BadInputError(f"{path} cannot be read: {reason}") from error
    if not isinstance(data, dict):
        raise BadInputError(f"{path} holds a JSON {type(data).__name__}, not an object")
    try:
        return validate(data)
    except BadInputError as error:
        raise BadInputError(f"{path}: {error}") from error
