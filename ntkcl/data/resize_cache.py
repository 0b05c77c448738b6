"""An opt-in cache of images resized to a fixed shorter side, written by `ntkcl prepare --resize-cache S`.

Decoding large JPEGs dominates the cost of the paper transforms; images whose shorter side is already `S`
(256 matches the test transform's Resize(256)) decode several times faster. The cache sits in
`<dataset>/resized-<S>/` with the same relative paths as the originals, and a `complete.json` written last
marks it usable; loaders then read from it instead of the originals. The manifest (and its sha256) still
lists the original files, so a run's recorded data identity does not change.

Caveat: test-time results are the same up to JPEG re-encoding (Resize(256) of a 256-side image is exact);
training crops taken from a small region of an image are upsampled from the 256-side copy rather than
from the original, which is softer for large originals. That is why it is opt-in.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from ntkcl.data.manifest import Manifest
from ntkcl.files import atomic_write_text, remove_owned_folder, staged_folder

COMPLETE_FILE = "complete.json"
RESIZE_CACHE_KIND = "resize-cache"


def _is_legacy_cache(folder: Path) -> bool:
    """A cache written before folder markers: its `complete.json` is a file."""
    return (folder / COMPLETE_FILE).is_file() and not (folder / COMPLETE_FILE).is_symlink()


def cache_dir(dataset_dir: Path, size: int) -> Path:
    return dataset_dir / f"resized-{size}"


def find_cache(dataset_dir: Path) -> Path | None:
    """The complete resize cache of a prepared folder, if one was written."""
    for candidate in sorted(dataset_dir.glob("resized-*")):
        if (candidate / COMPLETE_FILE).is_file():
            return candidate
    return None


def _resize_one(job: tuple[str, str, int]) -> None:
    source, target, size = job
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    shorter = min(image.size)
    if shorter > size:
        scale = size / shorter
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
        )
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    if Path(target).suffix.lower() in (".jpg", ".jpeg"):
        image.save(target, quality=95)
    else:
        image.save(target)


def write_resize_cache(dataset_dir: Path, manifest: Manifest, size: int, workers: int | None = None) -> Path:
    """Write `resized-<size>/` for every file row of `manifest` (array rows are skipped); replaces other sizes."""
    final = cache_dir(dataset_dir, size)
    if (final / COMPLETE_FILE).is_file():
        return final
    paths = sorted({relative for rows in manifest.splits.values() for relative, _ in rows if "#" not in relative})
    with staged_folder(final, RESIZE_CACHE_KIND, _is_legacy_cache, checksums=False) as staging:
        jobs = [(str(dataset_dir / p), str(staging / p), size) for p in paths]
        workers = workers or min(8, os.cpu_count() or 1)
        if workers > 1 and len(jobs) > 64:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_resize_one, jobs, chunksize=64))
        else:
            for job in jobs:
                _resize_one(job)
        atomic_write_text(staging / COMPLETE_FILE, json.dumps({"size": size, "images": len(paths)}) + "\n")
        for other in dataset_dir.glob("resized-*"):
            if other != final:
                remove_owned_folder(other, RESIZE_CACHE_KIND, _is_legacy_cache)
    return final
