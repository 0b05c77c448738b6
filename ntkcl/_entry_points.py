"""Entry-point discovery shared by the dataset and method registries.

Both registries use `importlib.metadata` so that built-in plugins and third-party distributions are found
the same way; a plugin that fails to import is recorded with its error instead of breaking the others.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
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


@functools.lru_cache(maxsize=16)
def _entry_points_on(group: str, search_path: tuple[str, ...]) -> tuple[importlib.metadata.EntryPoint, ...]:
    return tuple(importlib.metadata.entry_points(group=group))


def _entry_points(group: str) -> tuple[importlib.metadata.EntryPoint, ...]:
    """The group's entry points, read once per search path (reading every distribution's metadata takes tens
    of milliseconds, and one command looks a group up several times); a changed `sys.path` reads again."""
    return _entry_points_on(group, tuple(sys.path))


def entry_point_names(group: str) -> list[str]:
    """The names registered in `group`, sorted, without importing anything (for completion and early checks)."""
    return sorted({entry.name for entry in _entry_points(group)})


def _unknown(kind: str, name: str, valid: list[str]) -> BadInputError:
    shown = name if len(name) <= 60 else f"{name[:57]}..."
    return BadInputError(f"unknown {kind} {shown!r}; valid: {', '.join(valid)}")


def check_registered(group: str, name: str, kind: str) -> None:
    """A BadInputError listing the valid names unless `name` is registered in `group` (nothing is imported)."""
    names = entry_point_names(group)
    if name not in names:
        raise _unknown(kind, name, names)


def discover(group: str) -> dict[str, Discovered]:
    """Load every entry point of `group`, keyed by entry-point name (first distribution wins)."""
    found: dict[str, Discovered] = {}
    for entry in _entry_points(group):
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
        raise _unknown(kind, name, [n for n, i in found.items() if i.ok])
    if not item.ok:
        raise BadInputError(f"{kind} plugin {name!r} (from {item.distribution}) failed to load: {item.error}")
    return item.obj
