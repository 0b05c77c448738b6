"""SUN397 (Xiao et al., 2010): 108,754 scene images of 397 categories, ZSCL's 80/20 split, made reproducible.

`prepare` downloads `SUN397.tar.gz` (39 GB; md5 and sha256 pinned). Classes are the lines of
`SUN397/ClassName.txt` (`/a/abbey` -> `abbey`, `/a/apartment_building/outdoor` ->
`apartment_building/outdoor`), as in torchvision's `SUN397`, which ZSCL and KeepLoRA use. Their 80/20 split
(`random_split`, seed 42) runs over an unsorted `rglob` listing, so it depends on the file system; here the
listing is sorted (label, then path) first (`ntkcl.data.folder.torch_random_split`) and the resulting file
lists are stored in the manifest. Prompt names read `_` and `/` as spaces; templates are CLIP's
(arXiv 2103.00020).
"""

from __future__ import annotations

from pathlib import Path

from ntkcl.data.extract import extract_archive
from ntkcl.data.folder import is_image, torch_random_split
from ntkcl.data.plugin import RemoteFile
from ntkcl.data.prepared import Inputs, Layout, PreparedDataset
from ntkcl.errors import BadInputError

TARBALL = RemoteFile(
    name="SUN397.tar.gz",
    url="http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
    size=39_077_296_924,
    md5="8ca2778205c41d23104230ba66911c7a",
    sha256="f404130965a7ad77bed5ececc71e720ab50f3cc1e1bb257257610d38f3b928ec",
)
ROOT = "SUN397"


class SUN397(PreparedDataset):
    name = "sun397"
    num_classes = 397
    label_order = "the order of SUN397/ClassName.txt (alphabetical)"
    homepage = "https://vision.princeton.edu/projects/2010/SUN/"
    license = "images collected from the web for research (see the site)"
    citation = (
        "@inproceedings{xiao2010sun, title={SUN Database: Large-scale Scene Recognition from Abbey to Zoo}, "
        "author={Xiao, Jianxiong and Hays, James and Ehinger, Krista A. and Oliva, Aude and Torralba, Antonio}, "
        "booktitle={CVPR}, year={2010}}"
    )
    files = (TARBALL,)
    default_init_classes = 37
    default_increment = 40
    train_fraction = 0.8
    split_seed = 42
    templates = ("a photo of a {}.", "a photo of the {}.")

    def text_class_names(self, class_names) -> tuple[str, ...]:
        return tuple(name.replace("_", " ").replace("/", " ") for name in class_names)

    def build(self, stage: Path, inputs: Inputs) -> Layout:
        extract_archive(inputs.archives[TARBALL.name], stage)
        listing = stage / ROOT / "ClassName.txt"
        if not listing.is_file():
            raise BadInputError(f"{TARBALL.name} lacks {ROOT}/ClassName.txt")
        paths = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
        classes = [path[3:] for path in paths]  # drop the "/a/" letter folder
        if len(classes) != self.num_classes:
            raise BadInputError(f"{ROOT}/ClassName.txt lists {len(classes)} classes, expected {self.num_classes}")
        rows = []
        for label, path in enumerate(paths):
            folder = stage / ROOT / path.lstrip("/")
            files = sorted(p for p in folder.glob("sun_*") if p.is_file() and is_image(p)) if folder.is_dir() else []
            rows.extend((p.relative_to(stage).as_posix(), label) for p in files)
        if not rows:
            raise BadInputError(f"{TARBALL.name} holds no sun_*.jpg images under its class folders")
        train, test, recipe = torch_random_split(rows, self.train_fraction, self.split_seed)
        return Layout(classes, {"train": train, "test": test}, {"label_order": self.label_order, "split": recipe})


plugin = SUN397()
