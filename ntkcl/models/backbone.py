"""A stock, frozen timm vision transformer with the hooks PEFT methods attach to.

Nothing here is specific to ViT-B/16: width, token count, prefix tokens and image size are read from the
model, so `test_vit` or a 32-pixel ViT behave like the paper's backbones. Methods insert their modules by
passing a `block_forward` that re-composes a block's own sub-modules (norm1, attn, ls1, norm2, mlp, ...);
the pre-trained modules are never copied or replaced. `create_backbone` hands `clip:` names to
`ntkcl.models.clip`, whose CLIP backbone offers the same image-side interface.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
from torch import nn

from ntkcl.errors import BadInputError

if TYPE_CHECKING:
    from ntkcl.models.clip import ClipBackbone

NORMALIZATION_CONSTANTS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")

BlockForward = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]


def plain_block_forward(index: int, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The block exactly as timm runs it."""
    return block(tokens)


def run_block_range(
    blocks: nn.Sequential | nn.ModuleList,
    tokens: torch.Tensor,
    block_forward: BlockForward,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """`blocks[start:stop]` on `tokens`, each through `block_forward(index, block, tokens)`."""
    stop = len(blocks) if stop is None else stop
    for index in range(start, stop):
        tokens = block_forward(index, blocks[index], tokens)
    return tokens


def state_dict_sha256(module: nn.Module) -> str:
    """A fingerprint of the weights that does not depend on the file format they came from."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Backbone(nn.Module):
    """Frozen timm ViT plus input normalisation; always in eval mode (its dropouts never fire).

    Args:
        model: a timm VisionTransformer created with `num_classes=0`.
        name: the full timm `arch.tag` name.
        weights_sha256: fingerprint of the loaded weights (see `state_dict_sha256`).
        normalize: "none" (the NTK-CL/PILOT convention: [0, 1] pixels), "timm", "imagenet" or "clip".
    """

    kind = "timm"

    def __init__(self, model: nn.Module, name: str, weights_sha256: str, normalize: str = "none"):
        super().__init__()
        self.vit = model
        self.name = name
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


def resolve_weights_file(weights: Path) -> Path:
    """A weights file, or the known weights file inside a folder; missing ones are bad input."""
    if weights.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (weights / name).is_file():
                return weights / name
        raise BadInputError(f"{weights} holds none of {', '.join(WEIGHT_FILE_NAMES)}")
    if not weights.is_file():
        raise BadInputError(f"backbone weights {weights} do not exist")
    return weights


def create_backbone(
    name: str,
    pretrained: bool = True,
    weights: str | Path | None = None,
    model_kwargs: dict | None = None,
    init_seed: int = 0,
    normalize: str = "none",
) -> Backbone | ClipBackbone:
    """Create a frozen timm ViT by full `arch.tag` name, or an open_clip CLIP by a `clip:` name.

    Args:
        name: timm model name, e.g. `vit_base_patch16_224.augreg_in21k`, or `clip:ViT-B-16/openai`
            (see `ntkcl.models.clip.create_clip_backbone`).
        pretrained: load the tag's weights through timm (Hugging Face Hub cache; honours HF_HUB_OFFLINE).
        weights: a local weights file or a folder holding `model.safetensors`; overrides `pretrained`.
        model_kwargs: extra `timm.create_model` arguments (img_size, patch_size, depth, ...).
        init_seed: seed of the random initialisation when no weights are loaded, so the same backbone is
            rebuilt on resume, evaluation and export load.
        normalize: input normalisation, see `Backbone`.
    """
    from ntkcl.models.clip import CLIP_PREFIX, create_clip_backbone

    if name.startswith(CLIP_PREFIX):
        return create_clip_backbone(name, pretrained, weights, model_kwargs, init_seed, normalize)
    architecture = name.split(".", 1)[0]
    if not timm.is_model(architecture):
        raise BadInputError(f"{name!r} is not a timm model (see `timm.list_models('vit*')`)")
    kwargs = dict(model_kwargs or {})
    try:
        if weights is not None:
            file = resolve_weights_file(Path(weights).expanduser())
            model = timm.create_model(
                name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(file)}, **kwargs
            )
        elif pretrained:
            model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except BadInputError:
        raise
    except (OSError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(
            f"could not load backbone {name!r}: {first_line} (offline? pass --weights FILE or --no-pretrained)"
        ) from error
    required = ("blocks", "patch_embed", "_pos_embed", "norm", "forward_head")
    if not all(hasattr(model, attribute) for attribute in required):
        raise BadInputError(f"{name!r} is not a timm VisionTransformer; ntkcl methods need one")
    return Backbone(model, name, state_dict_sha256(model), normalize)
