"""Generated images for smoke tests and benchmarks: deterministic from a seed, no download.

Each class is a random blocky colour pattern; its images are that pattern with a random shift and pixel
noise, so classes are learnable but not identical. Class count, images per class, size and seed are
dataset options (`--set stream.dataset_options.classes=20`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ntkcl.data.manifest import Manifest, read_manifest, staged_dataset_folder, write_manifest
from ntkcl.data.plugin import DatasetPlugin

ARRAY_FILE = "images.npz"
# The generated images are held in memory at once (uint8 RGB): at most this many bytes.
MAX_BYTES = 1 << 31


class SyntheticOptions(BaseModel):
    """`stream.dataset_options` of the synthetic dataset: integers only (no booleans or text), bounded."""

    model_config = ConfigDict(extra="forbid", strict=True)

    classes: int = Field(10, ge=1, le=10_000, description="classes to generate")
    per_class: int = Field(20, ge=2, le=100_000, description="images per class")
    size: int = Field(32, ge=8, le=1024, description="image side in pixels")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="generator seed (numpy's 32 bits)")

    @model_validator(mode="after")
    def _fits_in_memory(self) -> SyntheticOptions:
        total = self.classes * self.per_class * self.size * self.size * 3
        if total > MAX_BYTES:
            raise ValueError(
                f"classes x per_class x size^2 x 3 = {total:,} bytes of images exceeds the {MAX_BYTES:,} generated "
                "in memory; lower one of them"
            )
        return self


class Synthetic(DatasetPlugin):
    """Generated class patterns.

    Args:
        num_classes: classes to generate.
        per_class: images per class (the last 20% of each class are the test split).
        size: image side in pixels.
        seed: generator seed.
    """

    label_order = "generation order"
    homepage = "https://github.com/ntkcl/ntkcl"
    license = "CC0 (generated)"
    citation = ""

    def __init__(self, num_classes: int = 10, per_class: int = 20, size: int = 32, seed: int = 0):
        self.name = "synthetic"
        self.num_classes = num_classes
        self.per_class = per_class
        self.size = size
        self.seed = seed
        self.class_names = tuple(f"pattern-{c:03d}" for c in range(num_classes))
        self.default_init_classes = max(1, num_classes // 5)
        self.default_increment = max(1, num_classes // 5)

    Options = SyntheticOptions

    def configured(self, options: SyntheticOptions) -> Synthetic:
        """A copy with other settings (`--set stream.dataset_options.classes=20`); unset options keep these."""
        settings = {**self._settings(), **options.model_dump(exclude_unset=True)}
        return Synthetic(settings["classes"], settings["per_class"], settings["size"], settings["seed"])

    def _settings(self) -> dict[str, int]:
        return {
            "classes": self.num_classes,
            "per_class": self.per_class,
            "size": self.size,
            "seed": self.seed,
        }

    def dataset_dir(self, root: Path) -> Path:
        settings = self._settings()
        return Path(root) / self.name / "-".join(f"{k}{v}" for k, v in settings.items())

    def generate(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        coarse = rng.uniform(0, 255, size=(self.num_classes, 4, 4, 3))
        shift = self.size // 4
        # Blocks large enough that a crop shifted by up to `shift` pixels stays inside the pattern.
        block = -(-(self.size + shift) // 4)
        patterns = np.kron(coarse, np.ones((block, block, 1)))
        images, labels = [], []
        for label in range(self.num_classes):
            for _ in range(self.per_class):
                dy, dx = rng.integers(0, shift + 1, size=2)
                crop = patterns[label, dy : dy + self.size, dx : dx + self.size]
                noisy = crop + rng.normal(0, 20, size=crop.shape)
                images.append(np.clip(noisy, 0, 255).astype(np.uint8))
                labels.append(label)
        return np.stack(images), np.array(labels, dtype=np.int64)

    def prepare(self, root: Path, source: Path | None = None, force: bool = False) -> Manifest:
        folder = self.dataset_dir(root)
        if self.is_prepared(root) and not force:
            return read_manifest(folder)
        images, labels = self.generate()
        within_class = np.arange(len(labels)) % self.per_class
        is_test = within_class >= int(round(self.per_class * 0.8))
        rows = [(f"{ARRAY_FILE}#{i:06d}", labels[i]) for i in range(len(labels))]
        with staged_dataset_folder(folder) as stage:
            np.savez_compressed(stage / ARRAY_FILE, images=images)
            write_manifest(
                stage,
                self.name,
                self.class_names,
                {
                    "train": [row for row, test in zip(rows, is_test) if not test],
                    "test": [row for row, test in zip(rows, is_test) if test],
                },
                sources=[{"origin": "generated", "settings": self._settings(), "verified": "deterministic"}],
            )
        return read_manifest(folder)


plugin = Synthetic()
