"""The 8x8 handwritten digits that scikit-learn ships (UCI Optical Recognition of Handwritten Digits).

1,797 real grey-scale images of 10 classes, bundled with scikit-learn, so a full continual-learning run
needs no download. The train/test split is a fixed stratified 80/20 split (scikit-learn
`train_test_split(..., stratify=labels, random_state=0)`), stored in the manifest like any other dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ntkcl.data.manifest import Manifest, read_manifest, staged_dataset_folder, write_manifest
from ntkcl.data.plugin import DatasetPlugin

ARRAY_FILE = "digits.npz"


class Digits(DatasetPlugin):
    name = "digits"
    num_classes = 10
    class_names = tuple(str(d) for d in range(10))
    label_order = "the digit itself (0..9)"
    homepage = "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits"
    license = "CC BY 4.0 (UCI Machine Learning Repository)"
    citation = (
        "@misc{alpaydin1998digits, author={Alpaydin, E. and Kaynak, C.}, title={Optical Recognition of "
        "Handwritten Digits}, howpublished={UCI Machine Learning Repository}, year={1998}}"
    )
    default_init_classes = 2
    default_increment = 2

    def prepare(self, root: Path, source: Path | None = None, force: bool = False) -> Manifest:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        folder = self.dataset_dir(root)
        if self.is_prepared(root) and not force:
            return read_manifest(folder)
        bunch = load_digits()
        # 0..16 intensities scaled to 0..255 bytes so the images go through the same PIL path as files.
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        labels = bunch.target.astype(np.int64)
        indices = np.arange(len(labels))
        train, test = train_test_split(indices, test_size=0.2, stratify=labels, random_state=0)
        with staged_dataset_folder(folder) as stage:
            np.savez_compressed(stage / ARRAY_FILE, images=images)
            write_manifest(
                stage,
                self.name,
                self.class_names,
                {
                    "train": [(f"{ARRAY_FILE}#{i:04d}", labels[i]) for i in train],
                    "test": [(f"{ARRAY_FILE}#{i:04d}", labels[i]) for i in test],
                },
                sources=[{"origin": "sklearn.datasets.load_digits", "verified": "bundled with scikit-learn"}],
            )
        return read_manifest(folder)


plugin = Digits()
