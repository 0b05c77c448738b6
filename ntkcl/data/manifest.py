"""Split manifests: the exact list of images a run sees, sorted and hashed.

A prepared dataset folder holds `manifest.json` plus one `<split>.tsv` per split whose rows are
`relative path<TAB>integer label`, sorted by path. `manifest.json` records each split file's sha256, the
class names in base-label order and where the data came from, so `run.json` can pin exactly which data a run
used. Rows of the form `arrays.npz#17` address image 17 of an array file (in-memory datasets such as digits).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ntkcl.errors import BadInputError
from ntkcl.files import atomic_write_text, staged_folder

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
DATASET_KIND = "dataset"


def is_legacy_dataset(folder: Path) -> bool:
    """A dataset folder prepared before folder markers: it holds a manifest file."""
    return (folder / MANIFEST_FILE).is_file() and not (folder / MANIFEST_FILE).is_symlink()


def staged_dataset_folder(folder: Path):
    """`ntkcl.files.staged_folder` for a dataset folder: replaces only a dataset folder ntkcl prepared."""
    return staged_folder(folder, DATASET_KIND, is_legacy_dataset, checksums=False)


@dataclass
class Manifest:
    """A prepared dataset: class names, per-split rows and their hashes, provenance of the sources."""

    dataset: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    split_sha256: dict[str, str]
    sources: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """One fingerprint over every split file (what `run.json` records)."""
        joined = "".join(f"{name}:{digest};" for name, digest in sorted(self.split_sha256.items()))
        return hashlib.sha256(joined.encode()).hexdigest()


def _split_text(rows: Sequence[tuple[str, int]]) -> str:
    return "".join(f"{path}\t{int(label)}\n" for path, label in rows)


def write_manifest(
    dataset_dir: Path,
    dataset: str,
    classes: Sequence[str],
    splits: dict[str, Sequence[tuple[str, int]]],
    sources: Sequence[dict[str, Any]] = (),
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Sort each split by path, write `<split>.tsv` files, then `manifest.json` last (it marks completion)."""
    from ntkcl import __version__

    sorted_splits = {name: sorted((str(p), int(label)) for p, label in rows) for name, rows in splits.items()}
    for name, rows in sorted_splits.items():
        if not rows:
            raise ValueError(f"split {name!r} of {dataset} is empty")
        bad = [label for _, label in rows if not 0 <= label < len(classes)]
        if bad:
            raise ValueError(f"split {name!r} of {dataset} has labels outside 0..{len(classes) - 1}")
    digests = {}
    for name, rows in sorted_splits.items():
        text = _split_text(rows)
        atomic_write_text(dataset_dir / f"{name}.tsv", text)
        digests[name] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    document = {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        "ntkcl_version": __version__,
        "classes": list(classes),
        "splits": {
            name: {"file": f"{name}.tsv", "sha256": digests[name], "count": len(rows)}
            for name, rows in sorted_splits.items()
        },
        "sources": list(sources),
        "extra": extra or {},
    }
    atomic_write_text(dataset_dir / MANIFEST_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")
    return Manifest(dataset, list(classes), sorted_splits, digests, list(sources), extra or {})


def read_manifest(dataset_dir: Path) -> Manifest:
    """Read and verify a manifest; a split file that no longer matches its recorded sha256 is an error."""
    manifest_path = dataset_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BadInputError(f"{dataset_dir} is not prepared (no {MANIFEST_FILE})")
    try:
        document = json.loads(manifest_path.read_text(encoding="utf-8"))
        splits: dict[str, list[tuple[str, int]]] = {}
        digests: dict[str, str] = {}
        for name, entry in document["splits"].items():
            raw = (dataset_dir / entry["file"]).read_bytes()
            if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
                raise BadInputError(
                    f"{dataset_dir / entry['file']} does not match the sha256 in its manifest; "
                    "run `ntkcl prepare` again"
                )
            rows = []
            for line in raw.decode("utf-8").splitlines():
                path, label = line.rsplit("\t", 1)
                rows.append((path, int(label)))
            splits[name] = rows
            digests[name] = entry["sha256"]
        return Manifest(
            dataset=document["dataset"],
            classes=list(document["classes"]),
            splits=splits,
            split_sha256=digests,
            sources=list(document.get("sources", [])),
            extra=dict(document.get("extra", {})),
        )
    except (KeyError, ValueError, OSError) as error:
        raise BadInputError(f"{manifest_path} is damaged ({error}); run `ntkcl prepare` again") from error
