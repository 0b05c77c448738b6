"""The dataset plugin contract.

A plugin is an object registered under the `ntkcl.datasets` entry-point group; the entry-point name is the
name users type (`ntkcl prepare NAME`, `ntkcl train --stream NAME`). It declares its metadata and the files
it needs, turns downloaded or user-supplied files into a prepared folder with a manifest (`prepare`), and
returns the samples of a split with integer labels in its documented base order (`load`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ValidationError

from ntkcl.data.manifest import Manifest, read_manifest
from ntkcl.errors import BadInputError

# CLIP's generic prompt, for datasets that publish no templates of their own.
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class RemoteFile:
    """A file a plugin needs. `url=None` means the user has to obtain it (see `instructions`)."""

    name: str
    url: str | None
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    instructions: str = ""

    @property
    def manual(self) -> bool:
        return self.url is None

    @property
    def checksum_kind(self) -> str:
        return "sha256" if self.sha256 else "md5" if self.md5 else "none"


@dataclass
class Samples:
    """The images of one split: file paths or in-memory uint8 images, plus base-order labels.

    `arrays` is one N x H x W[x C] array, or an object array of single images when they differ in shape.
    Samples joined from several datasets (`concatenate`) may hold both: image i is the file `paths[i]`
    unless that is None, then `arrays[i]`.
    """

    labels: np.ndarray
    paths: list[Path | None] | None = None
    arrays: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.paths is None and self.arrays is None:
            raise ValueError("Samples needs paths or arrays")
        for images in (self.paths, self.arrays):
            if images is not None and len(images) != len(self.labels):
                raise ValueError("Samples: labels and images differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Path | np.ndarray:
        """The file or the uint8 array of image `index`."""
        if self.paths is not None and self.paths[index] is not None:
            return self.paths[index]
        return self.arrays[index]

    @classmethod
    def concatenate(cls, parts: Sequence[Samples]) -> Samples:
        """One Samples holding every image of `parts` in order (class names joined, labels as given)."""
        labels = np.concatenate([part.labels for part in parts]) if parts else np.zeros(0, np.int64)
        names = [name for part in parts for name in part.class_names]
        if all(part.arrays is None for part in parts):
            return cls(labels, paths=[path for part in parts for path in part.paths], class_names=names)
        # One stacked array when every part is a plain array of the same image shape and dtype.
        kinds = {
            None
            if part.paths is not None or part.arrays.dtype == object
            else (part.arrays.dtype, part.arrays.shape[1:])
            for part in parts
        }
        if len(kinds) == 1 and None not in kinds:
            return cls(labels, arrays=np.concatenate([part.arrays for part in parts]), class_names=names)
        arrays = np.empty(len(labels), dtype=object)
        paths: list[Path | None] = [None] * len(labels)
        start = 0
        for part in parts:
            for offset in range(len(part)):
                source = part.image(offset)
                if isinstance(source, np.ndarray):
                    arrays[start + offset] = source
                else:
                    paths[start + offset] = source
            start += len(part)
        has_paths = any(path is not None for path in paths)
        return cls(labels, paths=paths if has_paths else None, arrays=arrays, class_names=names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Samples:
        """Images `indices` in that order; all of them in order keeps the arrays as they are (a memory map
        of a large dataset stays one, not a copy in memory)."""
        indices = np.asarray(indices, dtype=np.int64)
        everything = len(indices) == len(self) and bool((indices == np.arange(len(self))).all())
        arrays = None
        if self.arrays is not None:
            arrays = self.arrays if everything else self.arrays[indices]
        return Samples(
            labels=self.labels[indices],
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            arrays=arrays,
            class_names=self.class_names,
        )


def image_array(path: Path) -> np.ndarray:
    """The images of an array file: `images` of an `.npz`, or a memory-mapped `.npy` (for large datasets)."""
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    with np.load(path) as archive:
        return archive["images"]


def samples_from_manifest(dataset_dir: Path, manifest: Manifest, split: str) -> Samples:
    """Resolve a manifest split into Samples (`file.npz#i` / `file.npy#i` rows address image i of an array file)."""
    rows = manifest.splits.get(split)
    if rows is None:
        raise KeyError(f"{manifest.dataset} has no split {split!r} (has {sorted(manifest.splits)})")
    labels = np.array([label for _, label in rows], dtype=np.int64)
    if rows and "#" in rows[0][0]:
        addresses = [relative.rsplit("#", 1) for relative, _ in rows]
        array_files = {name: image_array(dataset_dir / name) for name in dict.fromkeys(name for name, _ in addresses)}
        indices = np.array([int(index) for _, index in addresses], dtype=np.int64)
        if len(array_files) == 1:
            # every image of one file in order is the file itself: a memory-mapped `.npy` stays mapped
            (array,) = array_files.values()
            whole = len(indices) == len(array) and bool((indices == np.arange(len(array))).all())
            return Samples(labels=labels, arrays=array if whole else array[indices], class_names=manifest.classes)
        images = [array_files[name][index] for (name, _), index in zip(addresses, indices, strict=True)]
        return Samples(labels=labels, arrays=np.stack(images), class_names=manifest.classes)
    return Samples(labels=labels, paths=[dataset_dir / relative for relative, _ in rows], class_names=manifest.classes)


class DatasetPlugin(ABC):
    """Base class of dataset plugins; subclasses set the class attributes and implement `prepare`.

    Attributes:
        name: CLI name (must equal the entry-point name).
        num_classes: number of classes; labels are 0..num_classes-1 in the base order below.
        class_names: names in base-label order (may be filled from the manifest once prepared).
        label_order: how base labels are assigned (e.g. "ImageFolder: case-sensitive sort of folder names").
        homepage, license, citation: shown by `ntkcl datasets` and copied into model cards.
        hub_dataset_id: the dataset's id on the Hugging Face Hub (`uoft-cs/cifar100`), which model cards list as
            their `datasets`; empty when the Hub has no copy of it.
        files: what `prepare` needs; empty for generated or bundled data.
        default_init_classes, default_increment: the class-incremental protocol used when a run does not
            say otherwise (the NTK-CL paper's protocol for its benchmarks).
        templates: CLIP prompt templates (one `{}` each) as the literature uses them for this dataset;
            empty means CLIP's generic `DEFAULT_TEMPLATES`.
        prompt_names: class names as a text encoder should read them, where they differ from `class_names`
            (e.g. ZSCL's overrides); empty means `class_names` with underscores read as spaces.
    """

    name: str = ""
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    label_order: str = ""
    homepage: str = ""
    license: str = ""
    citation: str = ""
    hub_dataset_id: str = ""
    files: tuple[RemoteFile, ...] = ()
    default_init_classes: int = 0
    default_increment: int = 0
    templates: tuple[str, ...] = ()
    prompt_names: tuple[str, ...] = ()

    def prompt_templates(self) -> tuple[str, ...]:
        return tuple(self.templates) or DEFAULT_TEMPLATES

    def text_class_names(self, class_names: Sequence[str]) -> tuple[str, ...]:
        """`prompt_names`, else the given (manifest) class names with underscores as spaces."""
        if self.prompt_names:
            return tuple(self.prompt_names)
        return tuple(name.replace("_", " ") for name in class_names)

    def dataset_dir(self, root: Path) -> Path:
        return Path(root) / self.name

    Options: ClassVar[type[BaseModel] | None] = None

    def configure(self, **options) -> DatasetPlugin:
        """A variant of this dataset from `stream.dataset_options`, validated by the plugin's `Options` model
        (strict types, bounds, unknown keys refused); plugins without options reject any."""
        if self.Options is None:
            if options:
                raise BadInputError(f"dataset {self.name!r} takes no options (got {sorted(options)})")
            return self
        from ntkcl.config import describe_validation_error

        try:
            validated = self.Options.model_validate(options)
        except ValidationError as error:
            raise BadInputError(
                describe_validation_error(error, "stream.dataset_options", f" for {self.name}")
            ) from error
        return self.configured(validated)

    def configured(self, options: BaseModel) -> DatasetPlugin:
        """The variant of this dataset for validated `Options` (plugins that declare `Options` override it)."""
        return self

    @property
    def needs_download(self) -> bool:
        """False for data that is generated or ships with a package: `train` prepares it on the fly."""
        return bool(self.files)

    @property
    def needs_manual_file(self) -> bool:
        return any(remote.manual for remote in self.files)

    def is_prepared(self, root: Path) -> bool:
        return (self.dataset_dir(root) / "manifest.json").is_file()

    @abstractmethod
    def prepare(self, root: Path, source: Path | None = None, force: bool = False) -> Manifest:
        """Make `<root>/<name>/` ready (download or import, verify, lay out) and write its manifest.

        Must be idempotent: with a valid manifest already present and `force` false, verify and return it.
        """

    def manifest(self, root: Path) -> Manifest:
        return read_manifest(self.dataset_dir(root))

    def load(self, root: Path, split: str) -> Samples:
        """Samples of `split` ("train" or "test") from the prepared folder."""
        return samples_from_manifest(self.dataset_dir(root), self.manifest(root), split)
