"""ImageNet-R (Hendrycks et al., 2021): 30,000 renditions of 200 ImageNet classes.

Two inputs are accepted:

- the public Berkeley tarball (downloaded by `ntkcl prepare imagenet-r`; md5 and sha256 pinned). It has no
  split, so `prepare` makes the literature's 80/20 one (24,000 / 6,000): all images in ImageFolder order
  (sorted wnid folders, sorted files), permuted by `numpy.random.RandomState(0).permutation(n)`, the first
  `int(0.8 * n)` of the permutation are train. Not stratified, like the dualprompt-pytorch split.
- the ADAM/PILOT author zip `imagenet-r.zip` (md5 pinned) through `--from`: its `train/` and `test/` folders
  are used as they are.

Base labels: ImageFolder order (case-sensitive sort of the wnid folders).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ntkcl.data.folder import FolderDataset, Rows
from ntkcl.data.plugin import RemoteFile

TARBALL = RemoteFile(
    name="imagenet-r.tar",
    url="https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
    size=2_191_079_936,
    md5="a61312130a589d0ca1a8fca1f2bd3337",
    sha256="18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52",
)
AUTHOR_ZIP = RemoteFile(
    name="imagenet-r.zip",
    url=None,
    md5="730aa3fb9c7d2ec0b6381c6b23040681",
    instructions="ADAM/PILOT split; Google Drive file id 1SG4TbiL8_DooekztyCVK8mPmfhMo8fkR",
)


class ImageNetR(FolderDataset):
    name = "imagenet-r"
    num_classes = 200
    label_order = "ImageFolder: case-sensitive sort of the wnid folders"
    homepage = "https://github.com/hendrycks/imagenet-r"
    license = "images collected from the web for research; code repository MIT"
    citation = (
        "@inproceedings{hendrycks2021many, title={The Many Faces of Robustness: A Critical Analysis of "
        "Out-of-Distribution Generalization}, author={Hendrycks, Dan and Basart, Steven and Mu, Norman and "
        "Kadavath, Saurav and Wang, Frank and Dorundo, Evan and Desai, Rahul and Zhu, Tyler and Parajuli, "
        "Samyak and Guo, Mike and Song, Dawn and Steinhardt, Jacob and Gilmer, Justin}, booktitle={ICCV}, year={2021}}"
    )
    files = (TARBALL,)
    alternates = (AUTHOR_ZIP,)
    default_init_classes = 20
    default_increment = 20
    train_fraction = 0.8
    split_seed = 0

    def derive_split(self, rows: Rows, classes: list[str]) -> tuple[Rows, Rows, dict[str, Any]]:
        ordered = sorted(rows, key=lambda row: (row[1], row[0]))
        permutation = np.random.RandomState(self.split_seed).permutation(len(ordered))
        cut = int(self.train_fraction * len(ordered))
        train = [ordered[i] for i in permutation[:cut]]
        test = [ordered[i] for i in permutation[cut:]]
        recipe = {
            "recipe": "images in ImageFolder order permuted by numpy.random.RandomState(seed).permutation(n); "
            "the first int(train_fraction * n) are train",
            "seed": self.split_seed,
            "train_fraction": self.train_fraction,
        }
        return train, test, recipe


plugin = ImageNetR()
