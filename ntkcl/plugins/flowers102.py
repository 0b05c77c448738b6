"""Oxford Flowers-102 (Nilsback & Zisserman, 2008): 102 flower species, the official train / test split.

`prepare` downloads `102flowers.tgz`, `imagelabels.mat` and `setid.mat` (md5 and sha256 pinned); train is
`trnid` (1,020 images) and test `tstid` (6,149), as torchvision's `Flowers102(split="train" / "test")`,
which ZSCL and KeepLoRA use. Base labels: the dataset's label ids (1..102) minus one. The dataset publishes
no class names; the names are CLIP's (arXiv 2103.00020), which ZSCL uses as its class-name override, with
CLIP's template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ntkcl.data.extract import extract_archive
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset, read_mat, require_listed_files
from ntkcl.errors import BadInputError

BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
IMAGES = RemoteFile(
    name="102flowers.tgz",
    url=BASE_URL + "102flowers.tgz",
    size=344_862_509,
    md5="52808999861908f626f3c1f4e79d11fa",
    sha256="2d01ecc807db462958cfe3d92f57a8c252b4abd240eb955770201e45f783b246",
)
LABELS = RemoteFile(
    name="imagelabels.mat",
    url=BASE_URL + "imagelabels.mat",
    size=502,
    md5="e0620be6f572b9609742df49c70aed4d",
    sha256="4903e94206bac23bf772aadf06451916df56b58fc483a62db32a97b82656651d",
)
SET_IDS = RemoteFile(
    name="setid.mat",
    url=BASE_URL + "setid.mat",
    size=14_989,
    md5="a5357ecc9cb78c4bef273ce3793fc85c",
    sha256="46b8678f91fd95d3c8f4feab80d271a6c834a1dd896fe29fd3e6ad9ce5c8dccd",
)

CLASS_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe flower", "purple coneflower", "peruvian lily",
    "balloon flower", "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william",
    "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya",
    "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily",
    "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium",
    "orange dahlia", "pink and yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan",
    "silverbush", "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower",
    "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower",
    "lotus", "toad lily", "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose",
    "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "air plant",
    "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
)  # fmt: skip


def _mat_vector(path: Path, key: str) -> np.ndarray:
    return np.atleast_1d(read_mat(path, key)).astype(int)


class Flowers102(PreparedDataset):
    name = "flowers102"
    num_classes = 102
    class_names = CLASS_NAMES
    label_order = "the dataset's label ids (imagelabels.mat, 1..102) minus one"
    homepage = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
    license = "no licence published; images collected from the web for research"
    citation = (
        "@inproceedings{nilsback2008automated, title={Automated Flower Classification over a Large Number of "
        "Classes}, author={Nilsback, Maria-Elena and Zisserman, Andrew}, booktitle={ICVGIP}, year={2008}}"
    )
    files = (IMAGES, LABELS, SET_IDS)
    default_init_classes = 12
    default_increment = 10
    templates = ("a photo of a {}, a type of flower.",)

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        extract_archive(inputs.archives[IMAGES.name], stage)
        labels = _mat_vector(inputs.archives[LABELS.name], "labels")
        if labels.min() < 1 or labels.max() > self.num_classes:
            raise BadInputError(f"{LABELS.name}: labels outside 1..{self.num_classes}")
        splits = {}
        for split, key in (("train", "trnid"), ("test", "tstid")):
            ids = _mat_vector(inputs.archives[SET_IDS.name], key)
            if ids.min() < 1 or ids.max() > len(labels):
                raise BadInputError(f"{SET_IDS.name}: {key} lists images beyond the {len(labels)} labelled ones")
            rows = [(f"jpg/image_{i:05d}.jpg", int(labels[i - 1]) - 1) for i in ids]
            require_listed_files(stage, rows, IMAGES.name)
            splits[split] = rows
        recipe = {"recipe": "official setid.mat: trnid (train), tstid (test)"}
        return Layout(list(CLASS_NAMES), splits, {"label_order": self.label_order, "split": recipe})


plugin = Flowers102()
