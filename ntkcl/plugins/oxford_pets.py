"""Oxford-IIIT Pets (Parkhi et al., 2012): 37 breeds, the official 3,680 trainval / 3,669 test split.

`prepare` downloads `images.tar.gz` and `annotations.tar.gz` (md5 and sha256 pinned) and builds the splits
from `annotations/trainval.txt` (train) and `annotations/test.txt` (test), whose lines are
`image_id class_id species breed_id`. Base labels are the official class ids minus one, i.e. the
case-insensitive alphabetical order of the breed names, as in torchvision's `OxfordIIITPet` (ImageFolder
order would put the 12 capitalised cat breeds first). Prompt template: CLIP's (arXiv 2103.00020).
"""

from __future__ import annotations

from pathlib import Path

from ntkcl.data.extract import extract_archive
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset, require_listed_files
from ntkcl.errors import BadInputError

BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/"
IMAGES = RemoteFile(
    name="images.tar.gz",
    url=BASE_URL + "images.tar.gz",
    size=791_918_971,
    md5="5c4f3ee8e5d25df40f4fd59a7f44e54c",
    sha256="67195c5e1c01f1ab5f9b6a5d22b8c27a580d896ece458917e61d459337fa318d",
)
ANNOTATIONS = RemoteFile(
    name="annotations.tar.gz",
    url=BASE_URL + "annotations.tar.gz",
    size=19_173_078,
    md5="95a8c909bbe2e81eed6a22bccdf3f68f",
    sha256="52425fb6de5c424942b7626b428656fcbd798db970a937df61750c0f1d358e91",
)

CLASS_NAMES = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal", "Birman",
    "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel",
    "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
    "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll",
    "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx",
    "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)  # fmt: skip


def _read_list(path: Path) -> list[tuple[str, int]]:
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        image_id, class_id, *_ = line.split()
        entries.append((image_id, int(class_id) - 1))
    return entries


class OxfordPets(PreparedDataset):
    name = "oxford-pets"
    num_classes = 37
    class_names = CLASS_NAMES
    label_order = "official class ids (1..37) minus one: case-insensitive alphabetical breed names"
    homepage = "https://www.robots.ox.ac.uk/~vgg/data/pets/"
    hub_dataset_id = "timm/oxford-iiit-pet"
    license = "CC BY-SA 4.0; image copyright stays with the image owners"
    citation = (
        "@inproceedings{parkhi2012cats, title={Cats and Dogs}, author={Parkhi, Omkar M. and Vedaldi, Andrea and "
        "Zisserman, Andrew and Jawahar, C. V.}, booktitle={CVPR}, year={2012}}"
    )
    files = (IMAGES, ANNOTATIONS)
    default_init_classes = 7
    default_increment = 5
    templates = ("a photo of a {}, a type of pet.",)

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        for remote in self.files:
            extract_archive(inputs.archives[remote.name], stage)
        splits = {}
        for split, list_name in (("train", "trainval.txt"), ("test", "test.txt")):
            listing = stage / "annotations" / list_name
            if not listing.is_file():
                raise BadInputError(f"{ANNOTATIONS.name} lacks annotations/{list_name}")
            rows = [(f"images/{image_id}.jpg", label) for image_id, label in _read_list(listing)]
            require_listed_files(stage, rows, IMAGES.name)
            for image_id, label in _read_list(listing):
                if not 0 <= label < self.num_classes or image_id.rsplit("_", 1)[0] != CLASS_NAMES[label]:
                    raise BadInputError(f"annotations/{list_name}: {image_id} has an unexpected class id {label + 1}")
            splits[split] = rows
        return Layout(list(CLASS_NAMES), splits, {"label_order": self.label_order, "split": {"recipe": "official"}})


plugin = OxfordPets()
