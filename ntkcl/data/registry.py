"""Dataset plugins discovered through the `ntkcl.datasets` entry-point group."""

from __future__ import annotations

import os
from pathlib import Path

from ntkcl._entry_points import DATASETS_GROUP, STREAMS_GROUP, Discovered, discover, require
from ntkcl.data.composite import StreamDefinition
from ntkcl.data.plugin import DatasetPlugin
from ntkcl.errors import BadInputError
from ntkcl.files import expand_user

GROUP = DATASETS_GROUP
DATA_ROOT_ENV = "NTKCL_DATA_ROOT"


def default_data_root() -> Path:
    """`$NTKCL_DATA_ROOT`, else `~/.cache/ntkcl/data`."""
    configured = os.environ.get(DATA_ROOT_ENV)
    return expand_user(configured) if configured else Path.home() / ".cache" / "ntkcl" / "data"


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


def check_data_root(root: Path) -> None:
    """The data root is a readable folder, created when missing (generated datasets are written into it)."""
    if root.exists() and not root.is_dir():
        raise BadInputError(f"data root {root} is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"data root {root} cannot be created: {error.strerror or error}") from error
    if not os.access(root, os.R_OK | os.X_OK):
        raise BadInputError(f"data root {root} is not readable")
