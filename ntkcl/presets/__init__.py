"""Paper hyper-parameters as TOML, and the layering that turns presets, files and flags into a RunConfig.

Layers, later wins: built-in defaults < `streams.toml[<dataset>]` (method-independent: backbone, transforms)
< `<method>.toml[<dataset>]` (or its `[default]` table; one that names a backbone replaces the stream's
backbone section) < that table's `by_backbone."<backbone name>"`
< `--config FILE` < command-line flags and `--set key=value`. A backbone the user names replaces the presets'
backbone sections; `--unset key` removes a key from every layer below the flags.

The method name picks a preset file, so it is checked against the registered methods first; a name or section
of the wrong type is left to the final validation, which names its key path.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ntkcl._entry_points import METHODS_GROUP, check_registered
from ntkcl.config import RunConfig, deep_merge, read_config_file, validate, without_key

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
    return _load(STREAMS_FILE).get(dataset, {})


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


def resolve_config(
    config_file: Path | None = None, overrides: dict | None = None, unset: Sequence[str] = ()
) -> RunConfig:
    """Layer defaults, presets, an optional config file and flag overrides into a validated RunConfig.

    Args:
        config_file: a TOML/YAML/JSON file of config sections.
        overrides: flags and `--set` assignments (the last layer).
        unset: dotted keys removed from every layer below `overrides`, so their built-in default (or the
            value in `overrides`) applies: `--unset` and tables given whole with `--set`.

    A backbone named in the config file or the overrides (`backbone.name` or `backbone.weights`) replaces the
    presets' backbone sections as a whole: a stream preset's small random ViT settings never leak into a
    pre-trained backbone the user asked for.
    """
    defaults = RunConfig().model_dump(mode="json")
    file_layer = read_config_file(config_file) if config_file else {}
    overrides = overrides or {}
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
    layers = [defaults, stream_layer, method_layer]
    backbone = _pick([*layers, file_layer, overrides], "backbone", "name", defaults["backbone"]["name"])
    backbone_layer = by_backbone.get(backbone, {}) if isinstance(backbone, str) else {}
    for key in unset:
        backbone_layer = without_key(backbone_layer, key)
    return validate(_merge([*layers, backbone_layer, file_layer, overrides]))
