"""PlantVillage, the 15-class pepper/potato/tomato subset used by NTK-CL (Hughes and Salathé, 2015).

This subset is distributed on Kaggle ("PlantVillage", a Kaggle login is needed) and in NTK-CL's package;
no checksum is published for either, so `ntkcl prepare plantvillage --from FILE_OR_DIR` imports a zip or
folder, records its sha256 and reports it as unverified. The 15 class folders are found wherever they sit;
other folders (some copies nest a duplicate `PlantVillage/`) are ignored and listed in the manifest. Without
`train/`/`test/` folders the split is the stratified 80/20 one of `ntkcl.data.folder` (seed 0). Base
labels: ImageFolder order of the class folders.
"""

from __future__ import annotations

from ntkcl.data.folder import FolderDataset
from ntkcl.data.plugin import RemoteFile

ARCHIVE = RemoteFile(
    name="plantvillage.zip",
    url=None,
    instructions="Kaggle 'PlantVillage' (15 classes) or NTK-CL's package; no published checksum",
)

CLASS_NAMES = (
    "Pepper__bell___Bacterial_spot",
    "Pepper__bell___healthy",
    "Potato___Early_blight",
    "Potato___Late_blight",
    "Potato___healthy",
    "Tomato_Bacterial_spot",
    "Tomato_Early_blight",
    "Tomato_Late_blight",
    "Tomato_Leaf_Mold",
    "Tomato_Septoria_leaf_spot",
    "Tomato_Spider_mites_Two_spotted_spider_mite",
    "Tomato__Target_Spot",
    "Tomato__Tomato_YellowLeaf__Curl_Virus",
    "Tomato__Tomato_mosaic_virus",
    "Tomato_healthy",
)


class PlantVillage(FolderDataset):
    name = "plantvillage"
    num_classes = 15
    class_names = CLASS_NAMES
    label_order = "ImageFolder: case-sensitive sort of the class folders"
    homepage = "https://data.mendeley.com/datasets/tywbtsjrjv"
    license = "PlantVillage images under a Creative Commons licence (Mendeley); the Kaggle copy is a redistribution"
    citation = (
        "@article{hughes2015open, title={An open access repository of images on plant health to enable the "
        "development of mobile disease diagnostics}, author={Hughes, David P. and Salath{\\'e}, Marcel}, "
        "journal={arXiv:1511.08060}, year={2015}}"
    )
    files = (ARCHIVE,)
    accepts_image_folder = True
    obtain_hint = (
        "Get the 15-class 'PlantVillage' dataset from Kaggle (needs a Kaggle login) or NTK-CL's package "
        "(https://pan.baidu.com/s/1PwDAytZY5sKyUInecc5dkg?pwd=arrd); no checksum is published, its sha256 is recorded."
    )
    default_init_classes = 3
    default_increment = 3


plugin = PlantVillage()
