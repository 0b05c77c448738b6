"""ImageNet-A (Hendrycks et al., 2021) as split by the ADAM authors: 200 classes, `train/` and `test/`.

The continual-learning split exists only as the authors' `ina.zip` (md5 pinned, published in the
RevisitingCIL issue tracker); how it was made is undocumented, so it cannot be rebuilt from the public
tarball. `ntkcl prepare imagenet-a --from ina.zip` verifies and lays it out. Base labels: ImageFolder order
(case-sensitive sort of the wnid folders).
"""

from __future__ import annotations

from ntkcl.data.folder import FolderDataset
from ntkcl.data.plugin import RemoteFile

AUTHOR_ZIP = RemoteFile(
    name="ina.zip",
    url=None,
    md5="7f4aaf0b1532b7a0bd670822c152d3c5",
    instructions="ADAM/PILOT split; Google Drive file id 19l52ua_vvTtttgVRziCZJjal0TPE9f2p",
)


class ImageNetA(FolderDataset):
    name = "imagenet-a"
    num_classes = 200
    label_order = "ImageFolder: case-sensitive sort of the wnid folders"
    homepage = "https://github.com/hendrycks/natural-adv-examples"
    license = "images collected from the web for research; the authors of the split do not redistribute it"
    citation = (
        "@inproceedings{hendrycks2021natural, title={Natural Adversarial Examples}, author={Hendrycks, Dan and "
        "Zhao, Kevin and Basart, Steven and Steinhardt, Jacob and Song, Dawn}, booktitle={CVPR}, year={2021}}"
    )
    files = (AUTHOR_ZIP,)
    obtain_hint = (
        "It is the ADAM/PILOT ImageNet-A split, shared by its authors on Google Drive "
        "(https://drive.google.com/file/d/19l52ua_vvTtttgVRziCZJjal0TPE9f2p)."
    )
    default_init_classes = 20
    default_increment = 20


plugin = ImageNetA()
