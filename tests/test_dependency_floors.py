"""The floors pyproject.toml declares are the versions CI installs together to test them."""

import re
import sys
from pathlib import Path

from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
UNTESTED_HERE = {"torch", "torchvision", "tomli"}  # the environment's torch; tomli only before Python 3.11


def _floors() -> dict[str, str]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for requirement in dependencies:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(;.*)?", requirement.replace(" ", "")).group(1, 2)
        floors[name.lower()] = floor
    return floors


def test_ci_installs_exactly_the_declared_floors():
    pins = {}
    for line in (ROOT / ".ci" / "lowest-versions.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version
    declared = {name: floor for name, floor in _floors().items() if name not in UNTESTED_HERE}
    assert {name: Version(version) for name, version in pins.items()} == {
        name: Version(floor) for name, floor in declared.items()
    }
