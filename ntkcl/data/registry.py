"""Dataset plugins discovered through the `ntkcl.datasets` entry-point group."""

from __future__ import annotations

import os
from pathlib import Path

from ntkcl._entry_points import DATASETS_GROUP, STREAMS_GROUP, Discovered, discover, require
from ntkcl.data.composite import StreamDefinition
from ntkcl.data.plugin import DatasetPlugin

GROUP = DATASETS_GROUP
DATA_ROOT_ENV = "NTKCL_DATA_ROOT"


def default_data_root() -> Path:
    """`$NTKCL_DATA_ROOT`, else `~/.cache/ntkcl/data`."""
    configured = os.environ.get(DATA_ROOT_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ntkcl" / "data"


def discover_datasets() -> dict[str, Discovered]:
    """Every registered dataset entry point, broken ones included (with their error)."""
    found = discover(GROUP)
    for item in found.values():
        if item.ok and not isinstance(item.obj, DatasetPlugin):
            item.error = f"entry point {item.target} is not a DatasetPlugin instance"
            item.obj = None
    return found


def get_dataset(name: str) -> DatasetPlugin:
    """The plugin called `name`; an unknown or broken name is a BadInputError listing the valid ones."""
    return require(discover_datasets(), name, "dataset")


def discover_streams() -> dict[str, Discovered]:
    """Every registered composite-stream entry point; a name that a dataset already uses is reported as broken."""
    found = discover(STREAMS_GROUP)
    datasets = discover(GROUP)
    for item in found.values():
        if not item.ok:
            continue
        if not isinstance(item.obj, StreamDefinition):
            item.error = f"entry point {item.target} is not a StreamDefinition instance"
        elif item.name in datasets:
            item.error = f"the name {item.name!r} is taken by a dataset plugin"
        if item.error:
            item.obj = None
    return found


def get_stream(name: str) -> StreamDefinition:
    """The composite stream called `name`; an unknown or broken name is a BadInputError listing the valid ones."""
    return require(discover_streams(), name, "stream")
