"""Food-101 (Bossard et al., 2014): 101 dishes, the official 75,750 / 25,250 split.

`prepare` downloads `food-101.tar.gz` (md5 and sha256 pinned) and takes train and test from
`food-101/meta/train.json` and `test.json` (`{class: ["<class>/<id>", ...]}`), as torchvision's
`Food101(split=...)`, which ZSCL and KeepLoRA use. Base labels: sorted class names. Prompt template: CLIP's
(arXiv 2103.00020); class names are read with underscores as spaces.
"""

from __future__ import annotations

import json
from pathlib import Path

from ntkcl.data.extract import extract_archive
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset, require_listed_files
from ntkcl.errors import BadInputError

TARBALL = RemoteFile(
    name="food-101.tar.gz",
    url="http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
    size=4_996_278_331,
    md5="85eeb15f3717b99a5da872d97d918f87",
    sha256="d97d15e438b7f4498f96086a4f7e2fa42a32f2712e87d3295441b2b6314053a4",
)


class Food101(PreparedDataset):
    name = "food101"
    num_classes = 101
    label_order = "sorted class names (the keys of meta/train.json)"
    homepage = "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/"
    hub_dataset_id = "ethz/food101"
    license = "images from foodspotting.com under their terms; for research"
    citation = (
        "@inproceedings{bossard2014food, title={Food-101 -- Mining Discriminative Components with Random "
        "Forests}, author={Bossard, Lukas and Guillaumin, Matthieu and Van Gool, Luc}, booktitle={ECCV}, "
        "year={2014}}"
    )
    files = (TARBALL,)
    default_init_classes = 11
    default_increment = 10
    templates = ("a photo of {}, a type of food.",)

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        extract_archive(inputs.archives[TARBALL.name], stage)
        listings = {}
        for split in ("train", "test"):
            path = stage / "food-101" / "meta" / f"{split}.json"
            try:
                listings[split] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise BadInputError(f"{TARBALL.name}: cannot read food-101/meta/{split}.json ({error})") from error
        classes = sorted(listings["train"])
        if len(classes) != self.num_classes or sorted(listings["test"]) != classes:
            raise BadInputError(f"{TARBALL.name}: meta lists {len(classes)} classes, expected {self.num_classes}")
        splits = {}
        for split, listing in listings.items():
            rows = [
                (f"food-101/images/{relative}.jpg", label)
                for label, name in enumerate(classes)
                for relative in listing[name]
            ]
            require_listed_files(stage, rows, TARBALL.name)
            splits[split] = rows
        recipe = {"recipe": "official meta/train.json and meta/test.json"}
        return Layout(classes, splits, {"label_order": self.label_order, "split": recipe})


plugin = Food101()
