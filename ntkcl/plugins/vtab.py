"""VTAB-CIL as split by the ADAM authors: 50 classes, 10 from each of RESISC45, DTD, Oxford Pets, EuroSAT and
Flowers102, one source dataset per task under the 10/10 protocol when the class order is not shuffled.

The split exists only as the authors' `vtab.zip` (md5 pinned); `ntkcl prepare vtab --from vtab.zip` verifies
and lays out its `train/` and `test/` folders. Base labels: ImageFolder order of its class folders, which
keeps the source datasets in sequence. ADAM runs it with `shuffle=False` (`stream.class_order` = 0..49);
NTK-CL shuffles it with the usual seeded permutation, which is the default here.
"""

from __future__ import annotations

from ntkcl.data.folder import FolderDataset
from ntkcl.data.plugin import RemoteFile

AUTHOR_ZIP = RemoteFile(
    name="vtab.zip",
    url=None,
    md5="a9c37bde6105a2516c900b0c33a437c1",
    instructions="ADAM/PILOT split; Google Drive file id 1xUiwlnx4k0oDhYi26KL5KwrCAya-mvJ_",
)


class VTAB(FolderDataset):
    name = "vtab"
    num_classes = 50
    label_order = "ImageFolder: case-sensitive sort of the class folders of the author zip"
    homepage = "https://github.com/zhoudw-zdw/RevisitingCIL"
    license = "component datasets under their own terms; the authors of the split do not redistribute it"
    citation = (
        "@article{zhou2024revisiting, title={Revisiting Class-Incremental Learning with Pre-Trained Models: "
        "Generalizability and Adaptivity are All You Need}, author={Zhou, Da-Wei and Cai, Zi-Wen and Ye, Han-Jia "
        "and Zhan, De-Chuan and Liu, Ziwei}, journal={IJCV}, year={2024}}\n"
        "@article{zhai2019large, title={A Large-scale Study of Representation Learning with the Visual Task "
        "Adaptation Benchmark}, author={Zhai, Xiaohua and others}, journal={arXiv:1910.04867}, year={2019}}"
    )
    files = (AUTHOR_ZIP,)
    obtain_hint = (
        "It is the ADAM/PILOT VTAB-CIL split, shared by its authors on Google Drive "
        "(https://drive.google.com/file/d/1xUiwlnx4k0oDhYi26KL5KwrCAya-mvJ_)."
    )
    default_init_classes = 10
    default_increment = 10


plugin = VTAB()
