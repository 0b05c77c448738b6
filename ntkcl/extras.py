"""Optional dependencies: each is an extra of the package, and a missing one is bad input naming that extra.

Core commands never import these; the feature that needs one asks for it through `require` (imports it)
or `check` (only looks it up, before a run starts), so the user reads one line with the install command
instead of a `ModuleNotFoundError`.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from ntkcl.errors import BadInputError

# import name -> (extra, what needs it)
EXTRAS = {
    "open_clip": ("clip", "CLIP backbones need open_clip"),
    "tensorboard": ("tensorboard", "--log tensorboard needs tensorboard"),
    "wandb": ("wandb", "--log wandb needs wandb"),
    "matplotlib": ("report", "ntkcl report draws with matplotlib"),
    "h5py": ("pcam", "patch-camelyon reads its HDF5 files with h5py"),
}


def install_hint(module: str) -> str:
    extra, needs = EXTRAS[module]
    return f"{needs}: pip install 'ntkcl[{extra}]'"


def check(module: str) -> None:
    """BadInputError with the install command when `module` is not installed (does not import it)."""
    if importlib.util.find_spec(module) is None:
        raise BadInputError(install_hint(module))


def require(module: str) -> ModuleType:
    """Import the optional `module` (or a submodule of it), or raise BadInputError with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise BadInputError(install_hint(module.partition(".")[0])) from error
