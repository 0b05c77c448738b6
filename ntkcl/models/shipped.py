"""Backbones whose weights ship inside the package, under names of their own.

`ntkcl-tiny-fdsl` is a 32-pixel ViT (timm `vit_tiny_patch16_224` with patch 16, width 192, 4 blocks, 3 heads)
pre-trained on generated fractal and contour images by `ntkcl.pretraining.pretrain` (formula-driven
supervised learning, Kataoka et al., ACCV 2020 and CVPR 2022), so that a pre-trained backbone is at hand where nothing can be
downloaded (CI, offline machines). The weights load through the same strict, recorded path as any local file
(`ntkcl.models.weights.locate_weights`), checked against the sha256 the script recorded, so a run records
the file and its sha256 under this name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED_FOLDER = Path(__file__).parent / "shipped"
SHIPPED_SOURCE = "ntkcl"  # `BackboneOrigin.source` of a shipped backbone
RANDOM_INIT = "random init"  # how records and labels name a backbone without loaded weights
WEIGHTS_FILE_NAME = "model.safetensors"
SETTINGS_FILE_NAME = "pretraining.json"
CARD_FILE_NAME = "README.md"


@dataclass(frozen=True)
class ShippedBackbone:
    """A named backbone: a timm architecture with fixed keyword arguments and its weights in the package.

    Attributes:
        name: the name configs and records use (`ntkcl-tiny-fdsl`).
        architecture: the timm architecture it is built from.
        model_kwargs: the `timm.create_model` arguments that make it (image and patch size, width, depth).
        license: licence of the weights.
    """

    name: str
    architecture: str
    model_kwargs: dict = field(default_factory=dict)
    license: str = "mit"

    @property
    def folder(self) -> Path:
        return SHIPPED_FOLDER / self.name

    @property
    def weights_file(self) -> Path:
        return self.folder / WEIGHTS_FILE_NAME

    @property
    def settings_file(self) -> Path:
        return self.folder / SETTINGS_FILE_NAME

    def recorded_sha256(self) -> str:
        """The weights' sha256 as the pre-training script recorded it (`pretraining.json`)."""
        return json.loads(self.settings_file.read_text(encoding="utf-8"))["weights_sha256"]


NTKCL_TINY_FDSL = ShippedBackbone(
    name="ntkcl-tiny-fdsl",
    architecture="vit_tiny_patch16_224",
    model_kwargs={"img_size": 32, "patch_size": 16, "embed_dim": 192, "depth": 4, "num_heads": 3},
)
SHIPPED_BACKBONES = {backbone.name: backbone for backbone in (NTKCL_TINY_FDSL,)}
