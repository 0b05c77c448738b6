"""FGVC-Aircraft 2013b (Maji et al., arXiv 1306.5151): 100 aircraft variants, the official train / test split.

`prepare` downloads `fgvc-aircraft-2013b.tar.gz` and takes the variant-level lists
`data/images_variant_train.txt` and `data/images_variant_test.txt` (lines `<image id> <variant>`;
3,334 / 3,333 images), as torchvision's `FGVCAircraft(split="train" / "test")`, which ZSCL and KeepLoRA use
for MTIL (train, not trainval). Base labels: the order of `data/variants.txt`. torchvision publishes no
checksum; the size and sha256 are TensorFlow Datasets' (another public script pins a different sha256,
so a mismatch says which value it got). Prompt templates: CLIP's (arXiv 2103.00020).
"""

from __future__ import annotations

from pathlib import Path

from ntkcl.data.extract import extract_archive
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset, require_listed_files
from ntkcl.errors import BadInputError

TARBALL = RemoteFile(
    name="fgvc-aircraft-2013b.tar.gz",
    url="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
    size=2_770_575_360,
    sha256="d5f68b1b81d6d7831eb9d5c5517074176b5dfbce6bcb43dc14ed1c66a87b8d75",
)
DATA_DIR = "fgvc-aircraft-2013b/data"


class FGVCAircraft(PreparedDataset):
    name = "fgvc-aircraft"
    num_classes = 100
    label_order = "the order of data/variants.txt"
    homepage = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"
    license = "for non-commercial research purposes only (images by the photographers, see the site)"
    citation = (
        "@article{maji2013fine, title={Fine-Grained Visual Classification of Aircraft}, author={Maji, Subhransu "
        "and Rahtu, Esa and Kannala, Juho and Blaschko, Matthew and Vedaldi, Andrea}, journal={arXiv:1306.5151}, "
        "year={2013}}"
    )
    files = (TARBALL,)
    default_init_classes = 10
    default_increment = 10
    templates = ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft.")

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        extract_archive(inputs.archives[TARBALL.name], stage)
        data = stage / DATA_DIR
        variants_file = data / "variants.txt"
        if not variants_file.is_file():
            raise BadInputError(f"{TARBALL.name} lacks {DATA_DIR}/variants.txt")
        classes = [line.strip() for line in variants_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(classes) != self.num_classes:
            raise BadInputError(f"{DATA_DIR}/variants.txt lists {len(classes)} variants, expected {self.num_classes}")
        label_of = {variant: label for label, variant in enumerate(classes)}
        splits = {}
        for split in ("train", "test"):
            listing = data / f"images_variant_{split}.txt"
            if not listing.is_file():
                raise BadInputError(f"{TARBALL.name} lacks {DATA_DIR}/{listing.name}")
            rows = []
            for line in listing.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                image_id, variant = line.strip().split(" ", 1)
                if variant not in label_of:
                    raise BadInputError(f"{listing.name}: unknown variant {variant!r}")
                rows.append((f"{DATA_DIR}/images/{image_id}.jpg", label_of[variant]))
            require_listed_files(stage, rows, TARBALL.name)
            splits[split] = rows
        return Layout(classes, splits, {"label_order": self.label_order, "split": {"recipe": "official variant-level"}})


plugin = FGVCAircraft()
