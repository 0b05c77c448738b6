"""Describable Textures (Cimpoi et al., 2014): 47 texture classes, official partition 1.

`prepare` downloads `dtd-r1.0.1.tar.gz` (md5 and sha256 pinned) and takes train and test from
`dtd/labels/train1.txt` and `dtd/labels/test1.txt` (1,880 each; lines `<class>/<file>.jpg`), as torchvision's
`DTD(split=..., partition=1)`, which ZSCL and KeepLoRA use (validation is not used). Base labels: sorted class
names. Prompt templates: CLIP's (arXiv 2103.00020).
"""

from __future__ import annotations

from pathlib import Path

from ntkcl.data.extract import extract_archive
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset, require_listed_files
from ntkcl.errors import BadInputError

TARBALL = RemoteFile(
    name="dtd-r1.0.1.tar.gz",
    url="https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
    size=625_239_812,
    md5="fff73e5086ae6bdbea199a49dfb8a4c1",
    sha256="e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
)
PARTITION = 1

CLASS_NAMES = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
    "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved",
    "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
    "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled",
    "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
    "wrinkled", "zigzagged",
)  # fmt: skip


class DTD(PreparedDataset):
    name = "dtd"
    num_classes = 47
    class_names = CLASS_NAMES
    label_order = "sorted class names"
    homepage = "https://www.robots.ox.ac.uk/~vgg/data/dtd/"
    license = "for research purposes only (images from Flickr and Google, see the site)"
    citation = (
        "@inproceedings{cimpoi2014describing, title={Describing Textures in the Wild}, author={Cimpoi, Mircea and "
        "Maji, Subhransu and Kokkinos, Iasonas and Mohamed, Sammy and Vedaldi, Andrea}, booktitle={CVPR}, "
        "year={2014}}"
    )
    files = (TARBALL,)
    default_init_classes = 7
    default_increment = 5
    templates = (
        "a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.", "a photo of a {} object.",
        "a photo of the {} texture.", "a photo of the {} pattern.", "a photo of the {} thing.",
        "a photo of the {} object.",
    )  # fmt: skip

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        extract_archive(inputs.archives[TARBALL.name], stage)
        label_of = {name: label for label, name in enumerate(CLASS_NAMES)}
        splits = {}
        for split in ("train", "test"):
            listing = stage / "dtd" / "labels" / f"{split}{PARTITION}.txt"
            if not listing.is_file():
                raise BadInputError(f"{TARBALL.name} lacks dtd/labels/{listing.name}")
            rows = []
            for line in listing.read_text(encoding="utf-8").split():
                class_name = line.split("/", 1)[0]
                if class_name not in label_of:
                    raise BadInputError(f"dtd/labels/{listing.name}: unknown class {class_name!r}")
                rows.append((f"dtd/images/{line}", label_of[class_name]))
            require_listed_files(stage, rows, TARBALL.name)
            splits[split] = rows
        recipe = {"recipe": f"official partition {PARTITION} (train{PARTITION}.txt / test{PARTITION}.txt)"}
        return Layout(list(CLASS_NAMES), splits, {"label_order": self.label_order, "split": recipe})


plugin = DTD()
