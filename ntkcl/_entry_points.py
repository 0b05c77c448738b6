"""Entry-point discovery shared by the dataset and method registries.

Both registries use `importlib.metadata` so that built-in plugins and third-party distributions are found
the same way; a plugin that fails to import is recorded with its error instead of breaking the others.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

from ntkcl.errors import BadInputError

DATASETS_GROUP = "ntkcl.datasets"
METHODS_GROUP = "ntkcl.methods"
STREAMS_GROUP = "ntkcl.streams"


@dataclass
class Discovered:
    """One entry point of a group: the loaded object, or the error that loading raised."""

    name: str
    distribution: str
    target: str
    obj: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def entry_point_names(group: str) -> list[str]:
    """The names registered in `group`, sorted, without importing anything (for completion and early checks)."""
    return sorted({entry.name for entry in importlib.metadata.entry_points(group=group)})


def discover(group: str) -> dict[str, Discovered]:
    """Load every entry point of `group`, keyed by entry-point name (first distribution wins)."""
    found: dict[str, Discovered] = {}
    for entry in importlib.metadata.entry_points(group=group):
        if entry.name in found:
            continue
        distribution = entry.dist.name if entry.dist is not None else "?"
        item = Discovered(name=entry.name, distribution=distribution, target=entry.value)
        try:
            item.obj = entry.load()
        except Exception as error:  # a broken third-party plugin must not take the others down
            item.error = f"{type(error).__name__}: {error}"
        found[entry.name] = item
    return dict(sorted(found.items()))


def require(found: dict[str, Discovered], name: str, kind: str) -> Any:
    """The object registered as `name`; unknown or broken names are a BadInputError listing the valid ones."""
    item = found.get(name)
    if item is None:
        valid = ", ".join(n for n, i in found.items() if i.ok)
        raise BadInputError(f"unknown {kind} {name!r}; valid: {valid}")
    if not item.ok:
        raise BadInputError(f"{kind} plugin {name!r} (from {item.distribution}) failed to load: {item.error}")
    return item.obj
