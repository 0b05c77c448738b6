"""Stanford Cars (Krause et al., 2013): 196 car models, the official 8,144 / 8,041 split.

The original download site is gone (torchvision refuses to download it), so `prepare` imports the four
original files from a folder the user supplies (`ntkcl prepare stanford-cars --from DIR`), each verified
against its md5 and sha256 (torchvision / TensorFlow Datasets values): `cars_train.tgz`, `cars_test.tgz`,
`car_devkit.tgz` and `cars_test_annos_withlabels.mat`. Labels come from `devkit/cars_train_annos.mat` and
`cars_test_annos_withlabels.mat` (`class` 1..196, minus one), names from `devkit/cars_meta.mat`, as
torchvision's `StanfordCars`, which ZSCL and KeepLoRA use. Prompt templates: CLIP's (arXiv 2103.00020).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ntkcl.data.extract import extract_archive
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset, read_mat, require_listed_files
from ntkcl.errors import BadInputError

WHERE = "an original copy (the ai.stanford.edu site is gone; mirrors exist, e.g. on Kaggle)"
TRAIN = RemoteFile(
    "cars_train.tgz", None, 979_269_282, md5="065e5b463ae28d29e77c1b4b166cfe61",
    sha256="512b227b30e2f0a8aab9e09485786ab4479582073a144998da74d64b801fd288", instructions=WHERE,
)  # fmt: skip
TEST = RemoteFile(
    "cars_test.tgz", None, 977_350_468, md5="4ce7ebf6a94d07f1952d94dd34c4d501",
    sha256="bffea656d6f425cba3c91c6d83336e4c5f86c6cffd8975b0f375d3a10da8e243", instructions=WHERE,
)  # fmt: skip
DEVKIT = RemoteFile(
    "car_devkit.tgz", None, 330_960, md5="c3b158d763b6e2245038c8ad08e45376",
    sha256="b97deb463af7d58b6bfaa18b2a4de9829f0f79e8ce663dfa9261bf7810e9accd", instructions=WHERE,
)  # fmt: skip
TEST_LABELS = RemoteFile(
    "cars_test_annos_withlabels.mat", None, 185_758, md5="b0a2b23655a3edd16d84508592a98d10",
    sha256="790f75be8ea34eeded134cc559332baf23e30e91367e9ddca97d26ed9b895f05", instructions=WHERE,
)  # fmt: skip


class StanfordCars(PreparedDataset):
    name = "stanford-cars"
    num_classes = 196
    label_order = "the devkit's class ids (1..196) minus one, names from devkit/cars_meta.mat"
    homepage = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
    license = "for non-commercial research purposes (ImageNet-style terms)"
    citation = (
        "@inproceedings{krause2013collecting, title={3D Object Representations for Fine-Grained Categorization}, "
        "author={Krause, Jonathan and Stark, Michael and Deng, Jia and Fei-Fei, Li}, "
        "booktitle={4th International IEEE Workshop on 3D Representation and Recognition (3dRR-13)}, year={2013}}"
    )
    files = (TRAIN, TEST, DEVKIT, TEST_LABELS)
    obtain_hint = (
        "The original site is gone: put the four original files (cars_train.tgz, cars_test.tgz, car_devkit.tgz, "
        "cars_test_annos_withlabels.mat; each is checked against its published md5 and sha256) in one folder "
        "and pass the folder."
    )
    default_init_classes = 16
    default_increment = 20
    templates = (
        "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
        "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.",
    )  # fmt: skip

    def manual_message(self) -> str:
        return f"{self.name} needs files you obtain yourself. {self.obtain_hint} Then run: ntkcl prepare {self.name} --from DIR"

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        for remote in (TRAIN, TEST, DEVKIT):
            extract_archive(inputs.archives[remote.name], stage)
        classes = [str(name) for name in read_mat(stage / "devkit" / "cars_meta.mat", "class_names")]
        if len(classes) != self.num_classes:
            raise BadInputError(f"devkit/cars_meta.mat names {len(classes)} classes, expected {self.num_classes}")
        annotations = {
            "train": (read_mat(stage / "devkit" / "cars_train_annos.mat", "annotations"), "cars_train"),
            "test": (read_mat(inputs.archives[TEST_LABELS.name], "annotations"), "cars_test"),
        }
        splits = {}
        for split, (records, folder) in annotations.items():
            names, labels = np.atleast_1d(records["fname"]), np.atleast_1d(records["class"])
            rows = [(f"{folder}/{name}", int(label) - 1) for name, label in zip(names, labels)]
            if any(not 0 <= label < self.num_classes for _, label in rows):
                raise BadInputError(f"the {split} annotations hold class ids outside 1..{self.num_classes}")
            require_listed_files(stage, rows, f"{folder}.tgz")
            splits[split] = rows
        return Layout(classes, splits, {"label_order": self.label_order, "split": {"recipe": "official"}})


plugin = StanfordCars()
