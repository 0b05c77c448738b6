"""File writing that never leaves half a result behind, never replaces what it did not write, and file hashing.

Shared by every layer that writes: dataset manifests and preparation, the run directory (config, metrics,
checkpoints) and exports. A file is written under a hidden temporary name and renamed into place; a folder
is built under a hidden temporary name next to its final place and renamed into place when complete.

Every folder built here carries a marker (`.ntkcl-folder.json`: its kind and the sha256 of its top-level
files). An existing path is replaced only when it is a real directory (not a symlink) that proves it is of
the same kind: its marker says so, or, for folders written before markers existed, the caller's `legacy`
test recognises its full file set. An empty directory is taken over (renaming onto it deletes nothing).
Anything else (a file, a symlink, even a dangling one, a device, a FIFO, a socket, a foreign folder) is
refused with a `BadInputError` before anything is written, and is never followed, moved or deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from ntkcl.errors import BadInputError

STAGING_MARK = ".staging-"
TEMPORARY_MARK = ".tmp-"
FOLDER_MARKER = ".ntkcl-folder.json"


def expand_user(path: str | Path) -> Path:
    """`path` with a leading `~` or `~user` expanded; BadInputError when that user has no home directory."""
    try:
        return Path(path).expanduser()
    except RuntimeError as error:
        user = str(path).split("/", 1)[0]
        raise BadInputError(f"{path}: cannot expand {user} (no such user or no home directory)") from error


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_safetensors(path: Path, tensors: dict) -> None:
    """Tensors as a safetensors file (`format: pt` metadata, keys sorted) with the permissions of any other file
    written here: safetensors' own file writer creates owner-only files."""
    from safetensors.torch import save

    ordered = {key: tensors[key].detach().to("cpu").contiguous() for key in sorted(tensors)}
    path.write_bytes(save(ordered, metadata={"format": "pt"}))


def clean_stale_staging(folder: Path) -> None:
    """Remove staging folders that an interrupted earlier write of `folder` left behind (never a symlink)."""
    if folder.parent.is_dir():
        for stale in folder.parent.glob(f".{folder.name}{STAGING_MARK}*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


def _describe(mode: int) -> str:
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISREG, "a file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a directory")


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder built by `staged_folder` ({"kind", "sha256"}), None when absent or unreadable."""
    path = folder / FOLDER_MARKER
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("kind"), str):
        return None
    if not isinstance(document.get("sha256"), dict):
        return None
    return document


def is_owned_folder(folder: Path, kind: str, legacy: Callable[[Path], bool] | None = None) -> bool:
    """`folder` is a real directory (not a symlink) proven to be a `kind` folder by its marker or `legacy`."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
    except OSError:
        return False
    marker = read_marker(folder)
    if marker is not None:
        return marker["kind"] == kind
    return legacy is not None and legacy(folder)


def check_replaceable(folder: Path, kind: str, legacy: Callable[[Path], bool] | None = None, what: str = "") -> None:
    """BadInputError unless `folder` is absent, an empty real directory or a `kind` folder written here.

    Args:
        folder: the path about to be (re)written.
        kind: the folder kind ("export", "checkpoint", "dataset", ...), as recorded in the marker.
        legacy: recognises a `kind` folder written before markers existed (by its full file set).
        what: how the error names the path (default: the path itself).
    """
    name = what or str(folder)
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise BadInputError(f"{name} cannot be inspected: {error.strerror or error}") from error
    if not stat.S_ISDIR(mode):
        raise BadInputError(f"{name} exists and is {_describe(mode)}; refusing to replace it, choose another path")
    try:
        empty = not any(os.scandir(folder))
    except OSError as error:
        raise BadInputError(f"{name} cannot be read: {error.strerror or error}") from error
    if not empty and not is_owned_folder(folder, kind, legacy):
        raise BadInputError(f"{name} is a non-empty folder that is not an ntkcl {kind}; refusing to replace it")


def folder_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every regular top-level file of `folder` but the marker."""
    return {
        entry.name: sha256_file(Path(entry.path))
        for entry in sorted(os.scandir(folder), key=lambda entry: entry.name)
        if entry.is_file(follow_symlinks=False) and entry.name != FOLDER_MARKER
    }


def write_marker(folder: Path, kind: str, checksums: dict[str, str]) -> None:
    atomic_write_text(folder / FOLDER_MARKER, json.dumps({"kind": kind, "sha256": checksums}, indent=2) + "\n")


@contextlib.contextmanager
def staged_folder(
    folder: Path, kind: str, legacy: Callable[[Path], bool] | None = None, checksums: bool = True
) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `folder` when the block succeeds.

    `folder` must pass `check_replaceable` (checked before anything is written, and again just before the
    rename). On any exception the temporary folder is deleted and `folder` is left as it was. An existing
    `folder` is replaced only after the new one is complete.

    Args:
        folder: the final place.
        kind: recorded in the marker; only a folder of the same kind is ever replaced.
        legacy: see `check_replaceable`.
        checksums: record the sha256 of the top-level files in the marker (off for large dataset folders,
            whose own manifest records what they hold).
    """
    check_replaceable(folder, kind, legacy)
    clean_stale_staging(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}{STAGING_MARK}{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        write_marker(staging, kind, folder_checksums(staging) if checksums else {})
        check_replaceable(folder, kind, legacy)
        if os.path.lexists(folder) and any(os.scandir(folder)):
            retired = folder.parent / f".{folder.name}{STAGING_MARK}old-{os.getpid()}"
            os.rename(folder, retired)
            os.rename(staging, folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, folder)  # onto an empty directory: fails rather than replace one that filled up
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_owned_folder(folder: Path, kind: str, legacy: Callable[[Path], bool] | None = None) -> bool:
    """Delete `folder` if it is a `kind` folder written here (see `is_owned_folder`); whether it was deleted."""
    if not is_owned_folder(folder, kind, legacy):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def remove_interrupted_writes(folder: Path) -> list[Path]:
    """Delete the temporary files and staging folders that killed writes left anywhere under `folder`.

    Only for a folder no other process is writing to (a run being resumed). Symbolic links are neither
    followed nor deleted. Returns what was removed.
    """
    removed = []
    for parent, folders, files in os.walk(folder):
        for name in [*folders, *files]:
            path = Path(parent) / name
            if name.startswith(".") and (STAGING_MARK in name or TEMPORARY_MARK in name) and not path.is_symlink():
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.is_file():
                    path.unlink(missing_ok=True)
                else:
                    continue
                removed.append(path)
        folders[:] = [name for name in folders if (Path(parent) / name).exists()]
    return removed


def verify_checksums(folder: Path, names: list[str] | None = None) -> list[str]:
    """Names of the files of `folder` whose sha256 differs from its marker's record, or that are missing.

    Args:
        names: the files to check (default: every file the marker records).
    """
    marker = read_marker(folder)
    if marker is None:
        return []
    recorded = marker["sha256"]
    wrong = []
    for name in names if names is not None else sorted(recorded):
        if name not in recorded:
            continue
        path = folder / name
        if not path.is_file() or path.is_symlink() or sha256_file(path) != recorded[name]:
            wrong.append(name)
    return wrong


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
