"""NWPU-RESISC45 (Cheng et al., 2017): 31,500 aerial scenes, 45 classes of 700; torchgeo's train / test lists.

`prepare` downloads torchgeo's copy of `NWPU-RESISC45.zip` (md5 and sha256 pinned; the authors' own copy is
on OneDrive) and its split lists `resisc45-train.txt` / `resisc45-test.txt` (the 60/20/20 split of Neumann et
al., "In-domain representation learning for remote sensing", arXiv 1911.06721; md5 pinned): 18,900 train and
6,300 test images (the 6,300 validation images are not used). Base labels: ImageFolder order of the class
folders. Prompt templates: CLIP's (arXiv 2103.00020); class names are read with underscores as spaces.
"""

from __future__ import annotations

from pathlib import Path

from ntkcl.data.extract import extract_archive
from ntkcl.data.folder import find_class_root
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset, require_listed_files
from ntkcl.errors import BadInputError

ARCHIVE = RemoteFile(
    name="NWPU-RESISC45.zip",
    url="https://hf.co/datasets/isaaccorley/resisc45/resolve/883edc0eee77b2c84225472f10f126e3ed83fa6e/NWPU-RESISC45.zip",
    md5="75206b2e16446591afa88e2628744886",
    sha256="beeecd0b63656290ae6d65cf7763185b0c1c4c54a753ef8088d6fba3faaf1f53",
)
SPLIT_URL = "https://hf.co/datasets/torchgeo/resisc45/resolve/a826b44d938a883185f11ebe3d512d38b464312f/"
SPLIT_LISTS = {
    "train": RemoteFile("resisc45-train.txt", SPLIT_URL + "resisc45-train.txt", md5="b5a4c05a37de15e4ca886696a85c403e"),
    "test": RemoteFile("resisc45-test.txt", SPLIT_URL + "resisc45-test.txt", md5="3dda9e4988b47eb1de9f07993653eb08"),
}

CLASS_NAMES = (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake", "meadow",
    "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot", "railway",
    "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace", "thermal_power_station",
    "wetland",
)  # fmt: skip


class RESISC45(PreparedDataset):
    name = "resisc45"
    num_classes = 45
    class_names = CLASS_NAMES
    label_order = "ImageFolder: case-sensitive sort of the class folders"
    homepage = "https://gcheng-nwpu.github.io/#Datasets"
    license = "for research purposes (per the authors)"
    citation = (
        "@article{cheng2017remote, title={Remote Sensing Image Scene Classification: Benchmark and State of the "
        "Art}, author={Cheng, Gong and Han, Junwei and Lu, Xiaoqiang}, journal={Proceedings of the IEEE}, "
        "volume={105}, number={10}, pages={1865--1883}, year={2017}}"
    )
    files = (ARCHIVE, *SPLIT_LISTS.values())
    default_init_classes = 5
    default_increment = 5
    templates = (
        "satellite imagery of {}.", "aerial imagery of {}.", "satellite photo of {}.", "aerial photo of {}.",
        "satellite view of {}.", "aerial view of {}.", "satellite imagery of a {}.", "aerial imagery of a {}.",
        "satellite photo of a {}.", "aerial photo of a {}.", "satellite view of a {}.", "aerial view of a {}.",
        "satellite imagery of the {}.", "aerial imagery of the {}.", "satellite photo of the {}.",
        "aerial photo of the {}.", "satellite view of the {}.", "aerial view of the {}.",
    )  # fmt: skip

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        extract_archive(inputs.archives[ARCHIVE.name], stage / "images")
        class_root = find_class_root(stage / "images", CLASS_NAMES)
        label_of = {name: label for label, name in enumerate(CLASS_NAMES)}
        splits = {}
        for split, remote in SPLIT_LISTS.items():
            rows = []
            for file_name in inputs.archives[remote.name].read_text(encoding="utf-8").split():
                class_name = file_name.rsplit("_", 1)[0]
                if class_name not in label_of:
                    raise BadInputError(f"{remote.name}: {file_name} is of no known class")
                path = (class_root / class_name / file_name).relative_to(stage).as_posix()
                rows.append((path, label_of[class_name]))
            require_listed_files(stage, rows, ARCHIVE.name)
            splits[split] = rows
        recipe = {"recipe": "torchgeo's resisc45-train.txt / resisc45-test.txt (validation list not used)"}
        return Layout(list(CLASS_NAMES), splits, {"label_order": self.label_order, "split": recipe})


plugin = RESISC45()
