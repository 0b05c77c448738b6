"""What both backbone families (timm ViTs and open_clip CLIPs) share, below both of them: the features a
method can hook into and how to detect them, how blocks are run, input normalisation constants, a weights
fingerprint, and the description of a backbone inspected without its weights.

`ntkcl.models.backbone` (the dispatcher and the timm family) and `ntkcl.models.clip` both import from here and
never from each other's internals, so the imports run one way: backbone -> clip -> this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ntkcl.models.weights import BackboneOrigin

NORMALIZATION_CONSTANTS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}

BlockForward = Callable[[int, nn.Module, torch.Tensor], torch.Tensor]

VIT_TOKENS = "vit-tokens"
PRE_NORM_BLOCKS = "pre-norm-blocks"
FUSED_QKV_ATTENTION = "fused-qkv-attention"
CLIP_TOWERS = "clip-towers"


def _has(module: nn.Module, dotted_names: Iterable[str]) -> bool:
    """Whether `module` has every attribute path (`attn.qkv`)."""
    for dotted in dotted_names:
        owner = module
        for part in dotted.split("."):
            if not hasattr(owner, part):
                return False
            owner = getattr(owner, part)
    return True


def _every_block_has(model: nn.Module, dotted_names: tuple[str, ...]) -> bool:
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, nn.Sequential) and len(blocks) > 0 and all(_has(b, dotted_names) for b in blocks)


@dataclass(frozen=True)
class BackboneFeature:
    """Something a method hooks into, and how to tell whether a model has it."""

    description: str
    present: Callable[[nn.Module], bool]


BACKBONE_FEATURES: dict[str, BackboneFeature] = {
    VIT_TOKENS: BackboneFeature(
        "a ViT token pipeline (patch_embed, _pos_embed, patch_drop, norm_pre, blocks, norm, forward_head)",
        lambda model: (
            _has(model, ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head"))
            and isinstance(model.blocks, nn.Sequential)
        ),
    ),
    PRE_NORM_BLOCKS: BackboneFeature(
        "pre-norm blocks with layer scale (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2)",
        lambda model: _every_block_has(
            model, ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
        ),
    ),
    FUSED_QKV_ATTENTION: BackboneFeature(
        "attention with one fused qkv projection (attn.qkv, num_heads, head_dim, q_norm, k_norm, norm, proj)",
        lambda model: _every_block_has(
            model,
            tuple(
                f"attn.{name}"
                for name in (
                    "qkv",
                    "num_heads",
                    "head_dim",
                    "q_norm",
                    "k_norm",
                    "attn_drop",
                    "norm",
                    "proj",
                    "proj_drop",
                )
            ),
        ),
    ),
    CLIP_TOWERS: BackboneFeature(
        "CLIP image and text towers (encode_text, attention_layers, logit_scale)",
        lambda model: _has(model, ("encode_text", "attention_layers", "logit_scale", "tokenizer")),
    ),
}


def model_features(model: nn.Module) -> frozenset[str]:
    """The `BACKBONE_FEATURES` a (timm) model has."""
    return frozenset(name for name, feature in BACKBONE_FEATURES.items() if feature.present(model))


def model_kind(model: nn.Module) -> str:
    """`VisionTransformer with ResPostBlock blocks`: what an error message calls an architecture."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks):
        return f"{type(model).__name__} with {type(blocks[0]).__name__} blocks"
    return type(model).__name__


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


@dataclass(frozen=True)
class BackboneDescription:
    """A backbone inspected without loading weights: its origin, what kind of model it is and its features."""

    origin: BackboneOrigin
    kind: str
    features: frozenset[str]
    parameter_bytes: int = 0
    activation_bytes_per_image: int = 0
