"""MNIST (LeCun et al., 1998): 70,000 handwritten digits, the official 60,000 / 10,000 split.

`prepare` downloads the four IDX files from the PyTorch mirror (torchvision's md5 and TensorFlow Datasets'
sha256 pinned), decodes them after verification and stores the images as `train.npz` / `test.npz`
(N x 28 x 28 uint8, key `images`) like CIFAR-100. Base labels: the digit. Prompt template: CLIP's
(arXiv 2103.00020), as ZSCL and KeepLoRA use it.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset
from ntkcl.errors import BadInputError

BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
IDX_FILES = {
    ("train", "images"): RemoteFile(
        "train-images-idx3-ubyte.gz", BASE_URL + "train-images-idx3-ubyte.gz", 9_912_422,
        md5="f68b3c2dcbeaaa9fbdd348bbdeb94873",
        sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    ("train", "labels"): RemoteFile(
        "train-labels-idx1-ubyte.gz", BASE_URL + "train-labels-idx1-ubyte.gz", 28_881,
        md5="d53e105ee54ea40749a09fcbcd1e9432",
        sha256="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
    ("test", "images"): RemoteFile(
        "t10k-images-idx3-ubyte.gz", BASE_URL + "t10k-images-idx3-ubyte.gz", 1_648_877,
        md5="9fb629c4189551a2d022fa330f9573f3",
        sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    ("test", "labels"): RemoteFile(
        "t10k-labels-idx1-ubyte.gz", BASE_URL + "t10k-labels-idx1-ubyte.gz", 4_542,
        md5="ec29112dd5afa0611ce80d1b7f02629c",
        sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
}  # fmt: skip
IDX_MAGIC = {"images": 2051, "labels": 2049}


def read_idx(path: Path, kind: str) -> np.ndarray:
    """An IDX file (big-endian header: magic, counts, then uint8 data) as an array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = 3 if kind == "images" else 1
    header = np.frombuffer(data[: 4 * (dims + 1)], dtype=">i4")
    if len(header) != dims + 1 or header[0] != IDX_MAGIC[kind]:
        raise BadInputError(f"{path.name} is not an IDX {kind} file")
    shape = tuple(int(n) for n in header[1:])
    body = np.frombuffer(data[4 * (dims + 1) :], dtype=np.uint8)
    if body.size != int(np.prod(shape)):
        raise BadInputError(f"{path.name} is truncated")
    return body.reshape(shape)


class MNIST(PreparedDataset):
    name = "mnist"
    num_classes = 10
    class_names = tuple(str(d) for d in range(10))
    label_order = "the digit itself (0..9)"
    homepage = "http://yann.lecun.com/exdb/mnist/"
    hub_dataset_id = "ylecun/mnist"
    license = "CC BY-SA 3.0 (per the torchvision and TensorFlow Datasets catalogues)"
    citation = (
        "@article{lecun1998gradient, title={Gradient-Based Learning Applied to Document Recognition}, "
        "author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and Haffner, Patrick}, "
        "journal={Proceedings of the IEEE}, volume={86}, number={11}, pages={2278--2324}, year={1998}}"
    )
    files = tuple(IDX_FILES.values())
    default_init_classes = 2
    default_increment = 2
    templates = ('a photo of the number: "{}".',)

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        splits = {}
        for split in ("train", "test"):
            images = read_idx(inputs.archives[IDX_FILES[split, "images"].name], "images")
            labels = read_idx(inputs.archives[IDX_FILES[split, "labels"].name], "labels")
            if len(images) != len(labels):
                raise BadInputError(f"MNIST {split}: {len(images)} images but {len(labels)} labels")
            np.savez(stage / f"{split}.npz", images=np.ascontiguousarray(images))
            splits[split] = [(f"{split}.npz#{i:05d}", int(label)) for i, label in enumerate(labels)]
        return Layout(
            list(self.class_names), splits, {"label_order": self.label_order, "split": {"recipe": "official"}}
        )


plugin = MNIST()
