"""ImageFolder-style datasets: class sub-folders, optional `train/` and `test/`, derived splits.

Base label order is torchvision `ImageFolder` order, a case-sensitive `sorted()` of the class folder names,
which is the order PILOT, ADAM and NTK-CL use for these benchmarks. Files inside a class folder are found
recursively and sorted, so a listing never depends on the file system.

When the data has no `train/`/`test/` folders, `stratified_split` makes one: for each class (in label
order) the sorted files are shuffled with one shared `numpy.random.RandomState(seed)` (whose stream NumPy
keeps stable across versions) and the first `round(test_fraction * n)` go to test. The recipe and seed are
written to the manifest next to the resulting file lists.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntkcl.data.extract import extract_archive
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset
from ntkcl.errors import BadInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IGNORED_DIRS = ("__MACOSX",)
Rows = list[tuple[str, int]]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def subfolders(directory: Path) -> list[str]:
    """Visible sub-folder names, case-sensitively sorted (ImageFolder order)."""
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in IGNORED_DIRS
    )


def class_rows(base: Path, directory: Path, classes: Sequence[str]) -> Rows:
    """(path relative to `base`, label) for every image under `directory/<class>/`, label = class index."""
    rows: Rows = []
    for label, name in enumerate(classes):
        class_dir = directory / name
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and is_image(p))
        rows.extend((p.relative_to(base).as_posix(), label) for p in files)
    return rows


def _breadth_first(tree: Path, depth: int = 4):
    level = [tree]
    for _ in range(depth + 1):
        following = []
        for directory in level:
            yield directory
            following.extend(directory / name for name in subfolders(directory))
        level = following


def find_split_root(tree: Path) -> Path | None:
    """The shallowest folder under `tree` holding both `train/` and `test/` sub-folders."""
    for directory in _breadth_first(tree):
        names = subfolders(directory)
        if "train" in names and "test" in names:
            return directory
    return None


def find_class_root(tree: Path, expected: Sequence[str] = ()) -> Path:
    """The folder whose sub-folders are the classes.

    With `expected` names, the shallowest folder that holds all of them (extra folders, such as a nested
    duplicate copy, are ignored); otherwise the first folder reached through single-folder wrappers that has
    several sub-folders.
    """
    if expected:
        wanted = set(expected)
        for directory in _breadth_first(tree):
            if wanted <= set(subfolders(directory)):
                return directory
        raise BadInputError(f"found no folder holding the class folders {sorted(wanted)[:3]}... under the input")
    directory = tree
    while True:
        names = subfolders(directory)
        has_images = any(is_image(p) for p in directory.iterdir() if p.is_file())
        if len(names) == 1 and not has_images:
            directory = directory / names[0]
            continue
        return directory


def stratified_split(rows: Rows, num_classes: int, test_fraction: float, seed: int) -> tuple[Rows, Rows]:
    """Per-class shuffled split; see the module docstring for the exact recipe."""
    by_class: list[Rows] = [[] for _ in range(num_classes)]
    for row in sorted(rows):
        by_class[row[1]].append(row)
    generator = np.random.RandomState(seed)
    train: Rows = []
    test: Rows = []
    for members in by_class:
        permutation = generator.permutation(len(members))
        cut = int(round(test_fraction * len(members)))
        test.extend(members[i] for i in permutation[:cut])
        train.extend(members[i] for i in permutation[cut:])
    return train, test


def torch_random_split(rows: Rows, train_fraction: float, seed: int) -> tuple[Rows, Rows, dict[str, Any]]:
    """ZSCL's split of EuroSAT, Caltech101 and SUN397, made reproducible.

    The rows in ImageFolder order (label, then path: a sorted listing, whatever the file system returns) are
    permuted by `torch.randperm(n, generator=torch.Generator().manual_seed(seed))`, which is what
    `torch.utils.data.random_split(dataset, [int(f * n), n - int(f * n)], generator)` does; the first
    `int(f * n)` are train. The recipe records the test indices into that order, so a prepared folder never
    depends on the torch RNG again.
    """
    import torch

    ordered = sorted(rows, key=lambda row: (row[1], row[0]))
    permutation = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(train_fraction * len(ordered))
    recipe = {
        "recipe": "torch.utils.data.random_split over ImageFolder order (label, then sorted path) with "
        "torch.Generator().manual_seed(seed) (ZSCL); test_indices index that order",
        "seed": seed,
        "train_fraction": train_fraction,
        "torch_version": torch.__version__,
        "test_indices": sorted(permutation[cut:]),
    }
    return [ordered[i] for i in permutation[:cut]], [ordered[i] for i in permutation[cut:]], recipe


def copy_image_tree(source: Path, destination: Path) -> None:
    """Copy the images (and their folders) of `source` into `destination`, skipping hidden and system files."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        here = Path(directory)
        return {
            name
            for name in names
            if name.startswith(".") or name in IGNORED_DIRS or ((here / name).is_file() and not is_image(here / name))
        }

    shutil.copytree(source, destination, ignore=ignore)


class FolderDataset(PreparedDataset):
    """A dataset of class folders, from an archive or an imported folder.

    `train/` and `test/` folders, where the input has them, are the official split. Otherwise the split is
    `stratified_split(test_fraction, split_seed)`, unless a subclass overrides `derive_split`.

    Attributes:
        images_dir: where inside the dataset folder the archive is extracted / the folder copied.
        test_fraction, split_seed: the derived split's settings.
    """

    images_dir = "images"
    test_fraction = 0.2
    split_seed = 0

    def unpack(self, stage: Path, inputs: Inputs) -> Path:
        target = stage / self.images_dir
        if inputs.folder is not None:
            copy_image_tree(inputs.folder, target)
        else:
            for path in inputs.archives.values():
                extract_archive(path, target)
        return target

    def derive_split(self, rows: Rows, classes: list[str]) -> tuple[Rows, Rows, dict[str, Any]]:
        train, test = stratified_split(rows, len(classes), self.test_fraction, self.split_seed)
        recipe = {
            "recipe": "stratified: per class (label order), sorted files shuffled by one "
            "numpy.random.RandomState(seed); the first round(test_fraction * n) are test",
            "seed": self.split_seed,
            "test_fraction": self.test_fraction,
        }
        return train, test, recipe

    def check_classes(self, classes: list[str]) -> None:
        if len(classes) != self.num_classes:
            raise BadInputError(f"{self.name}: found {len(classes)} class folders, expected {self.num_classes}")
        if self.class_names and sorted(self.class_names) != sorted(classes):
            unknown = sorted(set(classes) - set(self.class_names))
            raise BadInputError(f"{self.name}: unexpected class folders {unknown[:3]}")

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        tree = self.unpack(stage, inputs)
        split_root = find_split_root(tree)
        if split_root is not None:
            classes = subfolders(split_root / "train")
            self.check_classes(classes)
            test_classes = subfolders(split_root / "test")
            if not set(test_classes) <= set(classes):
                raise BadInputError(
                    f"{self.name}: test/ has classes that train/ lacks: {sorted(set(test_classes) - set(classes))[:3]}"
                )
            splits = {
                "train": class_rows(stage, split_root / "train", classes),
                "test": class_rows(stage, split_root / "test", classes),
            }
            split_note: dict[str, Any] = {"recipe": "train/ and test/ folders of the input"}
        else:
            class_root = find_class_root(tree, sorted(self.class_names))
            classes = sorted(self.class_names) if self.class_names else subfolders(class_root)
            self.check_classes(classes)
            ignored = sorted(set(subfolders(class_root)) - set(classes))
            rows = class_rows(stage, class_root, classes)
            train, test, split_note = self.derive_split(rows, classes)
            if ignored:
                split_note["ignored_folders"] = ignored
            splits = {"train": train, "test": test}
        for split, rows in splits.items():
            if not rows:
                raise BadInputError(f"{self.name}: the {split} split has no images")
        return Layout(classes, splits, {"label_order": self.label_order, "split": split_note})
