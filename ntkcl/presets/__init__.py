"""The one home of configuration layering: paper presets as TOML, and the layers that make a RunConfig.

Layers, later wins: built-in defaults < `streams.toml[<dataset>]` (method-independent: backbone, transforms)
< `<method>.toml[<dataset>]` (or its `[default]` table; one that names a backbone replaces the stream's
backbone section) < that table's `by_backbone."<backbone name>"`
< `--config FILE` < command-line flags and `--set key=value`. A backbone the user names replaces the presets'
backbone sections; `--unset key` removes a key from every layer below the flags. A resumed run has two layers:
its saved configuration and the flags that may change where it runs.

`ntkcl train`, `ntkcl train --resume` and `ntkcl train --print-config` all build their configuration here, so
the value a run uses and the layer `--print-config` names for it come from the same code.

The method name picks a preset file, so it is checked against the registered methods first; a name or section
of the wrong type is left to the final validation, which names its key path.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ntkcl._entry_points import METHODS_GROUP, check_registered
from ntkcl.config import (
    RunConfig,
    check_config_key,
    deep_merge,
    load_config,
    parse_assignments,
    read_config_file,
    validate,
    without_key,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)

STREAMS_FILE = "streams.toml"
BY_BACKBONE = "by_backbone"


def _load(file_name: str) -> dict:
    resource = resources.files(__package__) / file_name
    if not resource.is_file():
        return {}
    return tomllib.loads(resource.read_text(encoding="utf-8"))


def method_preset_file(method: str) -> str:
    return f"{method.replace('-', '_')}.toml"


def stream_preset(dataset: str) -> dict:
    """The stream's own table; a composite stream without one takes its first member's when every member has
    one (the built-in offline datasets), so `digits,synthetic` runs offline like `digits` does."""
    presets = _load(STREAMS_FILE)
    if dataset in presets:
        return presets[dataset]
    members = _member_names(dataset)
    if members and all(member in presets for member in members):
        return presets[members[0]]
    return {}


def _member_names(dataset: str) -> list[str]:
    """The datasets of an ad-hoc (`a,b,c`) or named composite stream; empty for anything else."""
    if "," in dataset:
        return [part.strip() for part in dataset.split(",")]
    from ntkcl.data.registry import discover_streams

    named = discover_streams().get(dataset)
    return [member.dataset for member in named.obj.members] if named is not None and named.ok else []


def method_preset(method: str, dataset: str) -> dict:
    """The method's table for `dataset` (or its `default` table), including any `by_backbone` tables."""
    tables = _load(method_preset_file(method))
    return tables.get(dataset, tables.get("default", {}))


def _pick(layers: list[dict], section: str, key: str, default: str) -> object:
    """The last layer's `section.key` (sections that are not tables are skipped here, refused later)."""
    value = default
    for layer in layers:
        table = layer.get(section)
        if isinstance(table, dict):
            value = table.get(key, value)
    return value


def _merge(layers: list[dict]) -> dict:
    merged: dict = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    return merged


def _table(layer: dict, section: str) -> dict:
    """`layer[section]` when it is a table (anything else is refused by the final validation)."""
    value = layer.get(section, {})
    return value if isinstance(value, dict) else {}


def _without_backbone(preset: dict, label: str, user_backbone: dict) -> dict:
    """`preset` minus its backbone section; a dropped value the user did not set themselves is warned about."""
    dropped = {k: v for k, v in preset.get("backbone", {}).items() if k != "name" and k not in user_backbone}
    if dropped:
        shown = ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(dropped.items()))
        logger.warning(
            "the backbone you named (backbone.name or weights) replaces the %s preset's backbone settings (dropped %s)",
            label,
            shown,
        )
    return {k: v for k, v in preset.items() if k != "backbone"}


@dataclass(frozen=True)
class Layer:
    """One layer of configuration values and where they come from (shown by `--print-config`)."""

    source: str
    values: dict


def config_layers(
    config_file: Path | None = None,
    overrides: dict | None = None,
    unset: Sequence[str] = (),
    assignments: Sequence[str] = (),
) -> list[Layer]:
    """The layers of a new run, lowest first (see the module docstring).

    Args:
        config_file: a TOML/YAML/JSON file of config sections.
        overrides: the flags, as config sections.
        unset: dotted keys removed from every layer below the flags, so their built-in default (or the
            flag's value) applies.
        assignments: `--set KEY=VALUE` texts, the most specific layer; a table given whole replaces the
            table below instead of merging into it.

    A backbone named in the config file or the overrides (`backbone.name` or `backbone.weights`) replaces the
    presets' backbone sections as a whole: a preset's backbone settings (e.g. a tiny CLIP's model_kwargs) never
    leak into a pre-trained backbone the user asked for.
    """
    for key in unset:
        check_config_key(key, "--unset")
    assigned, replaced = parse_assignments(list(assignments))
    overrides = deep_merge(overrides or {}, assigned)
    unset = [*unset, *replaced]
    defaults = RunConfig().model_dump(mode="json")
    file_layer = read_config_file(config_file) if config_file else {}
    dataset = _pick([defaults, file_layer, overrides], "stream", "dataset", "digits")
    method = _pick([defaults, file_layer, overrides], "method", "name", "ntk-cl")
    if not isinstance(dataset, str) or not isinstance(method, str):
        validate(_merge([defaults, file_layer, overrides]))  # raises, naming the key path
    check_registered(METHODS_GROUP, method, "method")
    method_layer = method_preset(method, dataset)
    by_backbone = method_layer.get(BY_BACKBONE, {})
    method_layer = {k: v for k, v in method_layer.items() if k != BY_BACKBONE}
    stream_layer = stream_preset(dataset)
    for key in unset:
        stream_layer, method_layer, file_layer = (without_key(x, key) for x in (stream_layer, method_layer, file_layer))
    user_backbone = deep_merge(_table(file_layer, "backbone"), _table(overrides, "backbone"))
    if "name" in user_backbone or "weights" in user_backbone:
        stream_layer = _without_backbone(stream_layer, f"{dataset} stream", user_backbone)
        method_layer = _without_backbone(method_layer, f"{method} {dataset}", user_backbone)
    elif "name" in method_layer.get("backbone", {}):
        # A method that names its own backbone (the CLIP methods) replaces the stream's backbone section whole:
        # a timm model's keyword arguments mean nothing to another model.
        stream_layer = {k: v for k, v in stream_layer.items() if k != "backbone"}
    lower = [defaults, stream_layer, method_layer]
    backbone = _pick([*lower, file_layer, overrides], "backbone", "name", defaults["backbone"]["name"])
    backbone_layer = by_backbone.get(backbone, {}) if isinstance(backbone, str) else {}
    for key in unset:
        backbone_layer = without_key(backbone_layer, key)
    return [
        Layer("default", defaults),
        Layer(f"stream preset ({STREAMS_FILE} [{dataset}])", stream_layer),
        Layer(f"method preset ({method_preset_file(method)} [{dataset}])", method_layer),
        Layer(f"method preset ({method_preset_file(method)} [{dataset}.{BY_BACKBONE}])", backbone_layer),
        Layer(f"config file ({config_file})", file_layer),
        Layer("flags", overrides),
    ]


def resumed_layers(saved_config: Path, overrides: dict) -> list[Layer]:
    """The layers of a resumed run: its saved, fully resolved configuration and the flags that may change."""
    return [
        Layer(f"run folder ({saved_config})", load_config(saved_config).model_dump(mode="json")),
        Layer("flags", overrides),
    ]


def merge_layers(layers: Sequence[Layer]) -> RunConfig:
    """The validated RunConfig of `layers` (later wins)."""
    return validate(_merge([layer.values for layer in layers]))


def resolve_config(
    config_file: Path | None = None, overrides: dict | None = None, unset: Sequence[str] = ()
) -> RunConfig:
    """Layer defaults, presets, an optional config file and flag overrides into a validated RunConfig."""
    return merge_layers(config_layers(config_file, overrides, unset))


def _leaves(values: object, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf (a table field such as `method.params` counts its keys as leaves)."""
    if not isinstance(values, dict) or (prefix and not values):
        return {prefix: values}
    leaves: dict[str, object] = {}
    for key, value in values.items():
        leaves.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def value_sources(layers: Sequence[Layer], resolved: RunConfig) -> dict[str, tuple[object, str]]:
    """Each resolved value with the layer it came from: the last layer that sets it, or `completed` where the
    engine filled it in (a stream's protocol, a method's hyper-parameter defaults, the resolved arch.tag)."""
    merged = _leaves(_merge([layer.values for layer in layers]))
    origin: dict[str, str] = {}
    for layer in layers:
        for key in _leaves(layer.values):
            origin[key] = layer.source
    sources = {}
    for key, value in _leaves(resolved.model_dump(mode="json")).items():
        given = key in merged and merged[key] == value
        sources[key] = (value, origin.get(key, "default") if given else "completed from the stream, method or backbone")
    return sources
