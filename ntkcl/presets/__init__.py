"""Paper hyper-parameters as TOML, and the layering that turns presets, files and flags into a RunConfig.

Layers, later wins: built-in defaults < `streams.toml[<dataset>]` (method-independent: backbone, transforms)
< `<method>.toml[<dataset>]` (or its `[default]` table) < that table's `by_backbone."<backbone name>"`
< `--config FILE` < command-line flags and `--set key=value`.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from ntkcl.config import RunConfig, deep_merge, read_config_file, validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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


def _pick(layers: list[dict], section: str, key: str, default: str) -> str:
    value = default
    for layer in layers:
        value = layer.get(section, {}).get(key, value)
    return value


def resolve_config(config_file: Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Layer defaults, presets, an optional config file and flag overrides into a validated RunConfig."""
    defaults = RunConfig().model_dump(mode="json")
    user_layers = [read_config_file(config_file) if config_file else {}, overrides or {}]
    dataset = _pick([defaults, *user_layers], "stream", "dataset", "digits")
    method = _pick([defaults, *user_layers], "method", "name", "ntk-cl")
    method_layer = method_preset(method, dataset)
    by_backbone = method_layer.get(BY_BACKBONE, {})
    method_layer = {k: v for k, v in method_layer.items() if k != BY_BACKBONE}
    layers = [defaults, stream_preset(dataset), method_layer]
    backbone = _pick([*layers, *user_layers], "backbone", "name", defaults["backbone"]["name"])
    layers.append(by_backbone.get(backbone, {}))
    merged: dict = {}
    for layer in [*layers, *user_layers]:
        merged = deep_merge(merged, layer)
    return validate(merged)
