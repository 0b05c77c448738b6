"""Kvasir v2 (Pogorelov et al., 2017): 8,000 endoscopy images, 8 classes of 1,000.

Simula publishes no checksum for the archive, so ntkcl does not download it on its own: the user downloads
`kvasir-dataset-v2.zip` and runs `ntkcl prepare kvasir --from kvasir-dataset-v2.zip` (or a folder). The file's
sha256 is recorded in the manifest and reported as unverified. NTK-CL's own split is undocumented; without
`train/`/`test/` folders the split is the stratified 80/20 one of `ntkcl.data.folder` (seed 0), recorded in
the manifest. Base labels: ImageFolder order of the class folders.
"""

from __future__ import annotations

from ntkcl.data.folder import FolderDataset
from ntkcl.data.plugin import RemoteFile

ARCHIVE = RemoteFile(
    name="kvasir-dataset-v2.zip",
    url=None,
    instructions="https://datasets.simula.no/downloads/kvasir/kvasir-dataset-v2.zip (no published checksum)",
)

CLASS_NAMES = (
    "dyed-lifted-polyps",
    "dyed-resection-margins",
    "esophagitis",
    "normal-cecum",
    "normal-pylorus",
    "normal-z-line",
    "polyps",
    "ulcerative-colitis",
)


class Kvasir(FolderDataset):
    name = "kvasir"
    num_classes = 8
    class_names = CLASS_NAMES
    label_order = "ImageFolder: case-sensitive sort of the class folders"
    homepage = "https://datasets.simula.no/kvasir/"
    license = "Simula terms: research and education use with citation; no commercial use without permission"
    citation = (
        "@inproceedings{pogorelov2017kvasir, title={KVASIR: A Multi-Class Image Dataset for Computer Aided "
        "Gastrointestinal Disease Detection}, author={Pogorelov, Konstantin and others}, "
        "booktitle={Proceedings of the 8th ACM Multimedia Systems Conference (MMSys)}, pages={164--169}, year={2017}}"
    )
    files = (ARCHIVE,)
    accepts_image_folder = True
    obtain_hint = (
        "Download it from https://datasets.simula.no/downloads/kvasir/kvasir-dataset-v2.zip "
        "(Simula publishes no checksum; its sha256 is recorded)."
    )
    default_init_classes = 2
    default_increment = 2


plugin = Kvasir()
