"""Caltech-101 (Fei-Fei et al., 2004): 101 object categories, ZSCL's 80/20 split with seed 42.

`prepare` downloads `caltech-101.zip` (torchvision's md5 pinned), unpacks the `101_ObjectCategories.tar.gz`
inside it, drops `BACKGROUND_Google` (recorded as an ignored folder) and splits the 8,677 images as ZSCL
and KeepLoRA do (`ntkcl.data.folder.torch_random_split`, seed 42: 6,941 / 1,736). Base labels: the
case-sensitive sort of the category folders (torchvision's `Caltech101` order, `Faces` first). Prompt names
are CLIP's (arXiv 2103.00020) Caltech-101 names, the class-name override ZSCL uses (`Faces` is
"off-center face", `Faces_easy` "centered face", `car_side` "side of a car", ...), with CLIP's templates.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ntkcl.data.extract import extract_archive
from ntkcl.data.folder import FolderDataset, Rows, torch_random_split
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs
from ntkcl.errors import BadInputError

ARCHIVE = RemoteFile(
    name="caltech-101.zip",
    url="https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
    md5="3138e1922a9193bfa496528edbbc45d0",
)
INNER = "101_ObjectCategories.tar.gz"

CLASS_NAMES = (
    "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant", "barrel", "bass",
    "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon",
    "car_side", "ceiling_fan", "cellphone", "chair", "chandelier", "cougar_body", "cougar_face", "crab",
    "crayfish", "crocodile", "crocodile_head", "cup", "dalmatian", "dollar_bill", "dolphin", "dragonfly",
    "electric_guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo", "flamingo_head", "garfield",
    "gerenuk", "gramophone", "grand_piano", "hawksbill", "headphone", "hedgehog", "helicopter", "ibis",
    "inline_skate", "joshua_tree", "kangaroo", "ketch", "lamp", "laptop", "llama", "lobster", "lotus",
    "mandolin", "mayfly", "menorah", "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda",
    "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner",
    "scissors", "scorpion", "sea_horse", "snoopy", "soccer_ball", "stapler", "starfish", "stegosaurus",
    "stop_sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch", "water_lilly",
    "wheelchair", "wild_cat", "windsor_chair", "wrench", "yin_yang",
)  # fmt: skip

PROMPT_NAMES = (
    "off-center face", "centered face", "leopard", "motorbike", "accordion", "airplane", "anchor", "ant",
    "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera",
    "cannon", "side of a car", "ceiling fan", "cellphone", "chair", "chandelier", "body of a cougar cat",
    "face of a cougar cat", "crab", "crayfish", "crocodile", "head of a crocodile", "cup", "dalmatian",
    "dollar bill", "dolphin", "dragonfly", "electric guitar", "elephant", "emu", "euphonium", "ewer", "ferry",
    "flamingo", "head of a flamingo", "garfield", "gerenuk", "gramophone", "grand piano", "hawksbill",
    "headphone", "hedgehog", "helicopter", "ibis", "inline skate", "joshua tree", "kangaroo", "ketch", "lamp",
    "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly", "menorah", "metronome", "minaret", "nautilus",
    "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino",
    "rooster", "saxophone", "schooner", "scissors", "scorpion", "sea horse", "snoopy (cartoon beagle)",
    "soccer ball", "stapler", "starfish", "stegosaurus", "stop sign", "strawberry", "sunflower", "tick",
    "trilobite", "umbrella", "watch", "water lilly", "wheelchair", "wild cat", "windsor chair", "wrench",
    "yin and yang symbol",
)  # fmt: skip


class Caltech101(FolderDataset):
    name = "caltech101"
    num_classes = 101
    class_names = CLASS_NAMES
    label_order = "case-sensitive sort of the category folders, BACKGROUND_Google removed (torchvision)"
    homepage = "https://data.caltech.edu/records/mzrjq-6wc02"
    hub_dataset_id = "flwrlabs/caltech101"
    license = "CC BY 4.0"
    citation = (
        "@inproceedings{feifei2004learning, title={Learning Generative Visual Models from Few Training Examples: "
        "An Incremental Bayesian Approach Tested on 101 Object Categories}, author={Fei-Fei, Li and Fergus, Rob "
        "and Perona, Pietro}, booktitle={CVPR Workshop on Generative-Model Based Vision}, year={2004}}"
    )
    files = (ARCHIVE,)
    default_init_classes = 11
    default_increment = 10
    train_fraction = 0.8
    split_seed = 42
    prompt_names = PROMPT_NAMES
    templates = (
        "a photo of a {}.", "a painting of a {}.", "a plastic {}.", "a sculpture of a {}.", "a sketch of a {}.",
        "a tattoo of a {}.", "a toy {}.", "a rendition of a {}.", "a embroidered {}.", "a cartoon {}.",
        "a {} in a video game.", "a plushie {}.", "a origami {}.", "art of a {}.", "graffiti of a {}.",
        "a drawing of a {}.", "a doodle of a {}.", "a photo of the {}.", "a painting of the {}.", "the plastic {}.",
        "a sculpture of the {}.", "a sketch of the {}.", "a tattoo of the {}.", "the toy {}.",
        "a rendition of the {}.", "the embroidered {}.", "the cartoon {}.", "the {} in a video game.",
        "the plushie {}.", "the origami {}.", "art of the {}.", "graffiti of the {}.", "a drawing of the {}.",
        "a doodle of the {}.",
    )  # fmt: skip

    def unpack(self, stage: Path, inputs: Inputs) -> Path:
        """The zip holds the image tarball (and annotations, not used): unpack the tarball only."""
        raw = stage / ".raw"
        extract_archive(inputs.archives[ARCHIVE.name], raw)
        inner = sorted(raw.rglob(INNER))
        if not inner:
            raise BadInputError(f"{ARCHIVE.name} lacks {INNER}")
        target = stage / self.images_dir
        extract_archive(inner[0], target)
        shutil.rmtree(raw)
        return target

    def derive_split(self, rows: Rows, classes: list[str]) -> tuple[Rows, Rows, dict[str, Any]]:
        return torch_random_split(rows, self.train_fraction, self.split_seed)


plugin = Caltech101()
