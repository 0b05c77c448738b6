"""CIFAR-100 (Krizhevsky, 2009): 100 classes, the official 50,000 / 10,000 split.

`prepare` downloads the python tarball (md5 pinned), reads its pickles and stores the images as two uint8
arrays, `train.npz` and `test.npz` (N x 32 x 32 x 3, key `images`); manifest rows are `train.npz#00017`.
The tarball's pickles are read only after the archive matched its md5. Base labels are the official
`fine_labels` (the alphabetical order of `fine_label_names`). Prompt templates: CLIP's (arXiv 2103.00020).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np

from ntkcl.data.extract import extract_archive
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset
from ntkcl.errors import BadInputError

TARBALL = RemoteFile(
    name="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    size=169_001_437,
    md5="eb9058c3a382ffc7106e4002c42a8d85",
)

CLASS_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


class Cifar100(PreparedDataset):
    name = "cifar100"
    num_classes = 100
    class_names = CLASS_NAMES
    label_order = "official fine_labels (alphabetical fine_label_names)"
    homepage = "https://www.cs.toronto.edu/~kriz/cifar.html"
    hub_dataset_id = "uoft-cs/cifar100"
    license = "no formal licence published; distributed by the authors for research"
    citation = (
        "@techreport{krizhevsky2009learning, title={Learning Multiple Layers of Features from Tiny Images}, "
        "author={Krizhevsky, Alex}, institution={University of Toronto}, year={2009}}"
    )
    files = (TARBALL,)
    default_init_classes = 10
    default_increment = 10
    templates = (
        "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
        "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
        "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
        "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
        "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
        "a photo of the small {}.", "a photo of the big {}.",
    )  # fmt: skip

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        raw = stage / ".raw"
        extract_archive(inputs.archives[TARBALL.name], raw)
        folder = raw / "cifar-100-python"
        if not all((folder / part).is_file() for part in ("train", "test", "meta")):
            raise BadInputError(f"{TARBALL.name} lacks cifar-100-python/{{train,test,meta}}")
        classes = list(_unpickle(folder / "meta")["fine_label_names"])
        if len(classes) != self.num_classes:
            raise BadInputError(f"{TARBALL.name}: meta lists {len(classes)} classes, expected {self.num_classes}")
        splits = {}
        for split in ("train", "test"):
            batch = _unpickle(folder / split)
            images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = np.asarray(batch["fine_labels"], dtype=np.int64)
            np.savez(stage / f"{split}.npz", images=np.ascontiguousarray(images))
            splits[split] = [(f"{split}.npz#{i:05d}", int(label)) for i, label in enumerate(labels)]
        shutil.rmtree(raw)
        return Layout(classes, splits, {"label_order": self.label_order, "split": {"recipe": "official"}})


plugin = Cifar100()
