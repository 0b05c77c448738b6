"""PatchCamelyon (Veeling et al., 2018): 96x96 lymph-node patches, metastatic tissue or not; official split.

`prepare` downloads the training and test HDF5 files (`camelyonpatch_level_2_split_{train,test}_{x,y}.h5.gz`)
from the authors' Zenodo record and checks each against torchvision's md5, then decompresses them and writes
the images as memory-mapped `train.npy` / `test.npy` (N x 96 x 96 x 3 uint8; 262,144 / 32,768 images) with
manifest rows `train.npy#000017`; the validation split is not used. Reading HDF5 needs `h5py`. Base labels:
0 no tumour tissue, 1 metastatic tumour tissue. Prompt names and template are CLIP's (arXiv 2103.00020).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np

from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset
from ntkcl.errors import BadInputError
from ntkcl.extras import require

BASE_URL = "https://zenodo.org/records/2546921/files/"
MD5 = {
    ("train", "x"): "1571f514728f59376b705fc836ff4b63",
    ("train", "y"): "35c2d7259d906cfc8143347bb8e05be7",
    ("test", "x"): "d8c2d60d490dbd479f8199bdfa0cf6ec",
    ("test", "y"): "60a7035772fbdb7f34eb86d4420cf66a",
}
H5_FILES = {
    key: RemoteFile(
        f"camelyonpatch_level_2_split_{key[0]}_{key[1]}.h5.gz",
        f"{BASE_URL}camelyonpatch_level_2_split_{key[0]}_{key[1]}.h5.gz?download=1",
        md5=md5,
    )
    for key, md5 in MD5.items()
}
CHUNK = 4096


def _read_h5(compressed: Path, scratch: Path, key: str):
    """Decompress `compressed` into `scratch` and open its dataset `key` (the caller closes the file)."""
    h5py = require("h5py")
    with gzip.open(compressed, "rb") as source, open(scratch, "wb") as target:
        shutil.copyfileobj(source, target, length=1 << 24)
    handle = h5py.File(scratch, "r")
    if key not in handle:
        handle.close()
        raise BadInputError(f"{compressed.name} holds no {key!r} dataset")
    return handle


class PatchCamelyon(PreparedDataset):
    name = "patch-camelyon"
    num_classes = 2
    class_names = ("no_tumor", "tumor")
    label_order = "the HDF5 label (0: no metastatic tissue in the centre region, 1: metastatic tissue)"
    homepage = "https://github.com/basveeling/pcam"
    license = "CC0 1.0"
    citation = (
        "@inproceedings{veeling2018rotation, title={Rotation Equivariant CNNs for Digital Pathology}, "
        "author={Veeling, Bastiaan S. and Linmans, Jasper and Winkens, Jim and Cohen, Taco and Welling, Max}, "
        "booktitle={MICCAI}, year={2018}}"
    )
    files = tuple(H5_FILES.values())
    default_init_classes = 1
    default_increment = 1
    prompt_names = ("lymph node", "lymph node containing metastatic tumor tissue")
    templates = ("this is a photo of {}",)

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        scratch = stage / ".scratch.h5"
        splits = {}
        for split in ("train", "test"):
            labels_file = _read_h5(inputs.archives[H5_FILES[split, "y"].name], scratch, "y")
            with labels_file:
                labels = np.asarray(labels_file["y"]).reshape(-1).astype(np.int64)
            images_file = _read_h5(inputs.archives[H5_FILES[split, "x"].name], scratch, "x")
            with images_file:
                images = images_file["x"]
                if images.shape[0] != len(labels) or images.ndim != 4 or images.dtype != np.uint8:
                    raise BadInputError(
                        f"PatchCamelyon {split}: {images.shape} {images.dtype} images, {len(labels)} labels"
                    )
                target = np.lib.format.open_memmap(
                    stage / f"{split}.npy", mode="w+", dtype=np.uint8, shape=images.shape
                )
                for start in range(0, len(labels), CHUNK):
                    target[start : start + CHUNK] = images[start : start + CHUNK]
                target.flush()
                del target
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise BadInputError(f"PatchCamelyon {split}: labels outside 0..1")
            splits[split] = [(f"{split}.npy#{i:06d}", int(label)) for i, label in enumerate(labels)]
        scratch.unlink()
        return Layout(
            list(self.class_names), splits, {"label_order": self.label_order, "split": {"recipe": "official"}}
        )


plugin = PatchCamelyon()
