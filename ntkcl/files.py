"""File writing that never leaves half a result behind, and file hashing.

Shared by every layer that writes: dataset manifests and preparation, the run directory (config, metrics,
checkpoints) and exports. A file is written under a hidden temporary name and renamed into place; a folder
is built under a hidden temporary name next to its final place and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

STAGING_MARK = ".staging-"
TEMPORARY_MARK = ".tmp-"


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
    """Remove staging folders that an interrupted earlier write of `folder` left behind."""
    if folder.parent.is_dir():
        for stale in folder.parent.glob(f".{folder.name}{STAGING_MARK}*"):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `folder` when the block succeeds.

    On any exception the temporary folder is deleted and `folder` is left as it was. An existing `folder` is
    replaced only after the new one is complete.
    """
    clean_stale_staging(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}{STAGING_MARK}{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        if folder.exists():
            retired = folder.parent / f".{folder.name}{STAGING_MARK}old-{os.getpid()}"
            os.replace(folder, retired)
            os.replace(staging, folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_interrupted_writes(folder: Path) -> list[Path]:
    """Delete the temporary files and staging folders that killed writes left anywhere under `folder`.

    Only for a folder no other process is writing to (a run being resumed). Returns what was removed.
    """
    removed = []
    for parent, folders, files in os.walk(folder):
        for name in [*folders, *files]:
            if name.startswith(".") and (STAGING_MARK in name or TEMPORARY_MARK in name):
                path = Path(parent) / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        folders[:] = [name for name in folders if (Path(parent) / name).exists()]
    return removed


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
