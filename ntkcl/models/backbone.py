"""A stock, frozen vision transformer with the hooks PEFT methods attach to, and how backbones are chosen.

Nothing here is specific to ViT-B/16: width, token count, prefix tokens and image size are read from the
model, so `test_vit` or a 32-pixel ViT behave like the paper's backbones. Methods insert their modules by
passing a `block_forward` that re-composes a block's own sub-modules (norm1, attn, ls1, norm2, mlp, ...);
the pre-trained modules are never copied or replaced.

What a method hooks into is a set of named backbone features (`BACKBONE_FEATURES`); a method class declares
the ones it needs (`ContinualMethod.required_backbone_features`) and `check_backbone_for_method` refuses an
architecture that lacks one before anything runs. Backbone names are dispatched on their prefix
(`BACKBONE_FAMILIES`): `clip:` names go to `ntkcl.models.clip`, whose CLIP backbone offers the same image-side
interface; timm takes plain names and its own `hf-hub:` / `local-dir:` prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ntkcl.errors import BadInputError
from ntkcl.models._backbone_common import (  # noqa: F401 (re-exported: the names methods import from here)
    BACKBONE_FEATURES,
    CLIP_TOWERS,
    FUSED_QKV_ATTENTION,
    NORMALIZATION_CONSTANTS,
    PRE_NORM_BLOCKS,
    VIT_TOKENS,
    BackboneDescription,
    BackboneFeature,
    BlockForward,
    model_features,
    model_kind,
    plain_block_forward,
    run_block_range,
    state_dict_sha256,
)
from ntkcl.models.weights import (
    BackboneOrigin,
    check_checkpoint,
    create_timm_model,
    describe_timm_model,
    locate_weights,
    timm_model_kwargs,
)

if TYPE_CHECKING:
    from ntkcl.models.clip import ClipBackbone


class Backbone(nn.Module):
    """Frozen timm ViT plus input normalisation; always in eval mode (its dropouts never fire).

    Args:
        model: a timm VisionTransformer created with `num_classes=0`.
        origin: which architecture and weights it is (resolved `arch.tag`, Hub id and revision, weights file).
        weights_sha256: fingerprint of the loaded weights (see `state_dict_sha256`).
        normalize: "none" (the NTK-CL/PILOT convention: [0, 1] pixels), "timm", "imagenet" or "clip".
    """

    kind = "timm"

    def __init__(self, model: nn.Module, origin: BackboneOrigin, weights_sha256: str, normalize: str = "none"):
        super().__init__()
        self.vit = model
        self.origin = origin
        self.name = origin.label
        self.weights_sha256 = weights_sha256
        self.normalize = normalize
        for parameter in self.vit.parameters():
            parameter.requires_grad_(False)
        mean, std = self._normalization(normalize)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.vit.eval()

    def _normalization(self, normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if normalize == "none":
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if normalize == "timm":
            config = self.vit.pretrained_cfg
            return tuple(config.get("mean", (0.5,) * 3)), tuple(config.get("std", (0.5,) * 3))
        return NORMALIZATION_CONSTANTS[normalize]

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        self.vit.eval()
        return self

    @property
    def features(self) -> frozenset[str]:
        return model_features(self.vit)

    def record(self) -> dict:
        """What `run.json` and exports record: the origin and the fingerprint of the loaded weights."""
        return {**self.origin.record(), "weights_sha256": self.weights_sha256}

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def feature_dim(self) -> int:
        """Width of `forward`'s output (the pooled feature)."""
        return self.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    @property
    def num_patches(self) -> int:
        return int(self.vit.patch_embed.num_patches)

    @property
    def num_tokens(self) -> int:
        """Tokens entering the first block: prefix (CLS, registers) plus patches."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def img_size(self) -> int:
        return int(self.vit.patch_embed.img_size[0])

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    def data_config(self) -> dict:
        """timm's pretrained data configuration (interpolation, mean, std, crop_pct, crop_mode) at this input size."""
        from timm.data import resolve_model_data_config

        return {**resolve_model_data_config(self.vit), "input_size": (3, self.img_size, self.img_size)}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise, patch-embed and add position embeddings: the tokens the first block receives."""
        x = (images - self.mean) / self.std
        x = self.vit.patch_embed(x)
        x = self.vit._pos_embed(x)
        x = self.vit.patch_drop(x)
        return self.vit.norm_pre(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm and the model's own pooling (CLS token for the ViTs used here)."""
        return self.vit.forward_head(self.vit.norm(tokens), pre_logits=True)

    def run_blocks(
        self,
        tokens: torch.Tensor,
        block_forward: BlockForward = plain_block_forward,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Blocks `start .. stop - 1` (default: all) on `tokens`, each through `block_forward`."""
        return run_block_range(self.vit.blocks, tokens, block_forward, start, stop)

    def forward(self, images: torch.Tensor, block_forward: BlockForward = plain_block_forward) -> torch.Tensor:
        return self.pool(self.run_blocks(self.embed(images), block_forward))


def _memory_estimate(model: nn.Module) -> tuple[int, int]:
    """Lower bounds of what a model built on the meta device needs: (parameter and buffer bytes, bytes of one
    image's tokens in float32, which any forward pass holds at least once)."""
    parameters = sum(tensor.numel() * tensor.element_size() for tensor in (*model.parameters(), *model.buffers()))
    tokens = getattr(getattr(model, "patch_embed", None), "num_patches", 0) + getattr(model, "num_prefix_tokens", 1)
    return parameters, tokens * getattr(model, "embed_dim", 0) * 4


def _describe_timm(name: str, model_kwargs: dict | None, weights: str | Path | None) -> BackboneDescription:
    model, origin = describe_timm_model(name, model_kwargs)
    if weights is not None:
        check_checkpoint(weights, origin.name)
    return BackboneDescription(origin, model_kind(model), model_features(model), *_memory_estimate(model))


def _create_timm(
    name: str,
    *,
    pretrained: bool,
    weights: str | Path | None,
    model_kwargs: dict | None,
    init_seed: int,
    normalize: str,
    allow_partial: bool,
) -> Backbone:
    model, origin = describe_timm_model(name, model_kwargs)
    if VIT_TOKENS not in model_features(model):
        raise BadInputError(f"backbone {origin.name} ({model_kind(model)}) is not a timm VisionTransformer")
    origin = locate_weights(origin, weights) if weights is not None or pretrained else origin.architecture_only()
    vit = create_timm_model(origin, timm_model_kwargs(name, model_kwargs), init_seed, allow_partial)
    return Backbone(vit, origin, state_dict_sha256(vit), normalize)


@dataclass(frozen=True)
class BackboneFamily:
    """How the backbones of one source are inspected (no weights read) and built."""

    describe: Callable[[str, dict | None, str | Path | None], BackboneDescription]
    create: Callable[..., Backbone | ClipBackbone]


def _describe_clip(name: str, model_kwargs: dict | None, weights: str | Path | None) -> BackboneDescription:
    from ntkcl.models.clip import describe_clip_backbone

    return describe_clip_backbone(name, model_kwargs, weights)


def _create_clip(name: str, **settings) -> ClipBackbone:
    from ntkcl.models.clip import create_clip_backbone

    return create_clip_backbone(name, **settings)


TIMM = BackboneFamily(_describe_timm, _create_timm)
# Name prefix -> family. Plain names and timm's own `hf-hub:` / `local-dir:` prefixes go to timm.
BACKBONE_FAMILIES: dict[str, BackboneFamily] = {"clip": BackboneFamily(_describe_clip, _create_clip)}


def backbone_family(name: str) -> BackboneFamily:
    prefix, separator, _ = name.partition(":")
    return BACKBONE_FAMILIES.get(prefix.lower(), TIMM) if separator else TIMM


def describe_backbone(
    name: str, model_kwargs: dict | None = None, weights: str | Path | None = None
) -> BackboneDescription:
    """Resolve `name` and inspect its architecture without loading weights (built on the meta device).

    A `weights` file is checked to be a readable checkpoint; whether it fits is known only when it loads.
    """
    return backbone_family(name).describe(name, model_kwargs, weights)


def check_backbone_for_method(method_name: str, required: Iterable[str], description: BackboneDescription) -> None:
    """Refuse a backbone that lacks a feature the method hooks into (one line naming both).

    Args:
        method_name: the method's CLI name.
        required: the method's `required_backbone_features`.
        description: from `describe_backbone`.
    """
    for feature in required:
        if feature not in description.features:
            needed = BACKBONE_FEATURES[feature].description if feature in BACKBONE_FEATURES else feature
            raise BadInputError(
                f"method {method_name} needs a backbone with {needed}; {description.origin.name} "
                f"({description.kind}) has none"
            )


def create_backbone(
    name: str,
    pretrained: bool = True,
    weights: str | Path | None = None,
    model_kwargs: dict | None = None,
    init_seed: int = 0,
    normalize: str = "none",
    allow_partial: bool = False,
) -> Backbone | ClipBackbone:
    """Create a frozen backbone by name (see `ntkcl.models.weights` for the names timm accepts).

    Args:
        name: `arch.tag`, a bare architecture (timm's default tag), `hf-hub:<repo>`, `local-dir:<folder>`, a
            shipped backbone (`ntkcl-tiny-fdsl`, see `ntkcl.models.shipped`), or `clip:ViT-B-16/openai` (see
            `ntkcl.models.clip.create_clip_backbone`).
        pretrained: load the pre-trained weights (Hugging Face Hub cache; honours HF_HUB_OFFLINE).
        weights: a local weights file or a folder holding `model.safetensors`; overrides `pretrained`.
        model_kwargs: extra `timm.create_model` arguments (img_size, patch_size, depth, ...).
        init_seed: seed of the random initialisation when no weights are loaded, so the same backbone is
            rebuilt on resume, evaluation and export load.
        normalize: input normalisation, see `Backbone`.
        allow_partial: load weights that do not cover the whole model (warns loudly) instead of refusing them.
    """
    return backbone_family(name).create(
        name,
        pretrained=pretrained,
        weights=weights,
        model_kwargs=model_kwargs,
        init_seed=init_seed,
        normalize=normalize,
        allow_partial=allow_partial,
    )
