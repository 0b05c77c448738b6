"""EuroSAT RGB (Helber et al., 2019): 27,000 Sentinel-2 64x64 images of 10 land-cover classes.

`prepare` downloads the torchvision archive (md5 and sha256 pinned) and makes the 80/20 split of ZSCL and
KeepLoRA with seed 42 (`ntkcl.data.folder.torch_random_split`: 21,600 / 5,400). The resulting lists are in
the manifest and the test indices in its `extra.split.test_indices`. Prompt names and templates are CLIP's
(Radford et al., arXiv 2103.00020), which ZSCL and KeepLoRA use. NTK-CL's own folders (undocumented split) can be imported with `--from DIR` holding
`train/` and `test/`.
"""

from __future__ import annotations

from typing import Any

from ntkcl.data.folder import FolderDataset, Rows, torch_random_split
from ntkcl.data.plugin import RemoteFile

ARCHIVE = RemoteFile(
    name="EuroSAT.zip",
    url="https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
    size=94_280_567,
    md5="c8fa014336c82ac7804f0398fcb19387",
    sha256="8ebea626349354c5328b142b96d0430e647051f26efc2dc974c843f25ecf70bd",
)

CLASS_NAMES = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)


class EuroSAT(FolderDataset):
    name = "eurosat"
    num_classes = 10
    class_names = CLASS_NAMES
    label_order = "ImageFolder: case-sensitive sort of the class folders"
    homepage = "https://github.com/phelber/EuroSAT"
    license = "MIT (per the EuroSAT repository)"
    citation = (
        "@article{helber2019eurosat, title={EuroSAT: A Novel Dataset and Deep Learning Benchmark for Land Use and "
        "Land Cover Classification}, author={Helber, Patrick and Bischke, Benjamin and Dengel, Andreas and Borth, "
        "Damian}, journal={IEEE Journal of Selected Topics in Applied Earth Observations and Remote Sensing}, "
        "volume={12}, number={7}, pages={2217--2226}, year={2019}}"
    )
    files = (ARCHIVE,)
    accepts_image_folder = True
    default_init_classes = 2
    default_increment = 2
    train_fraction = 0.8
    split_seed = 42
    templates = (
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    )
    prompt_names = (
        "annual crop land", "forest", "brushland or shrubland", "highway or road",
        "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
        "residential buildings or homes or apartments", "river", "lake or sea",
    )  # fmt: skip

    def derive_split(self, rows: Rows, classes: list[str]) -> tuple[Rows, Rows, dict[str, Any]]:
        return torch_random_split(rows, self.train_fraction, self.split_seed)


plugin = EuroSAT()
