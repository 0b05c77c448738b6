"""CLIP from open_clip behind ntkcl's backbone interface: image tower, text tower, tokenizer.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020;
the implementation is open_clip's (Ilharco et al., OpenCLIP), never a hand-written CLIP. Names are
`clip:<open_clip model>[/<pretrained tag>]` (`clip:ViT-B-16/openai`) or `clip:hf-hub:<repo>` /
`clip:local-dir:<folder>`; the image side offers what `models.backbone.Backbone` does (blocks, embed, pool,
forward with a block hook), the text side tokenises and encodes prompts. Every weight is frozen; methods
adapt the attention weights of both towers through `attention_layers`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ntkcl.errors import BadInputError
from ntkcl.extras import require
from ntkcl.files import sha256_file
from ntkcl.models._backbone_common import (
    CLIP_TOWERS,
    NORMALIZATION_CONSTANTS,
    VIT_TOKENS,
    BackboneDescription,
    BlockForward,
    plain_block_forward,
    run_block_range,
    state_dict_sha256,
)
from ntkcl.models.weights import BackboneOrigin, weights_file

CLIP_PREFIX = "clip:"
SCHEMAS = ("hf-hub:", "local-dir:")
TOWERS = ("visual", "text")
# What every ClipBackbone offers methods (create_clip_backbone refuses a model that could not).
CLIP_FEATURES = frozenset({VIT_TOKENS, CLIP_TOWERS})


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP model with input normalisation; always in eval mode.

    Args:
        model: an open_clip `CLIP` with a ViT image tower and a batch-first text transformer.
        tokenizer: its open_clip tokenizer (texts -> (N, context_length) token ids).
        origin: the `clip:` name it was created from and where its weights came from.
        weights_sha256: fingerprint of the weights (`state_dict_sha256`).
        normalize: "clip" (OpenAI CLIP mean/std, what CLIP was trained with), "imagenet", or "timm" / "none"
            (the model's own preprocessing constants, the same for OpenAI CLIP: raw pixels are never right).
    """

    kind = "clip"

    def __init__(
        self, model: nn.Module, tokenizer, origin: BackboneOrigin, weights_sha256: str, normalize: str = "clip"
    ):
        super().__init__()
        self.clip = model
        self.tokenizer = tokenizer
        self.origin = origin
        self.name = origin.label
        self.weights_sha256 = weights_sha256
        self.normalize = normalize
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)
        if normalize in ("none", "timm"):
            # CLIP only works on inputs normalised as it was trained: "none" (the timm backbones' default, raw
            # pixels) and "timm" both mean the model's own preprocessing constants here.
            config = getattr(model.visual, "preprocess_cfg", {})
            mean = config.get("mean") or NORMALIZATION_CONSTANTS["clip"][0]
            std = config.get("std") or NORMALIZATION_CONSTANTS["clip"][1]
        else:
            mean, std = NORMALIZATION_CONSTANTS[normalize]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.clip.eval()

    def train(self, mode: bool = True) -> ClipBackbone:
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def features(self) -> frozenset[str]:
        return CLIP_FEATURES

    def record(self) -> dict:
        """What `run.json` and exports record: the origin and the fingerprint of the weights."""
        return {**self.origin.record(), "weights_sha256": self.weights_sha256}

    # Image tower: the interface of `Backbone`.

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def embed_dim(self) -> int:
        """Token width of the image tower."""
        return int(self.visual.transformer.width)

    @property
    def feature_dim(self) -> int:
        """Width of the joint image-text embedding (`forward`'s output)."""
        return int(self.visual.output_dim)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def num_patches(self) -> int:
        return int(self.visual.grid_size[0] * self.visual.grid_size[1])

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def img_size(self) -> int:
        return int(self.visual.image_size[0])

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise, patch-embed, add the class token and positions, ln_pre: the first block's input."""
        return self.visual._embeds((images - self.mean) / self.std)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post on the class token and the projection into the joint embedding."""
        pooled, _ = self.visual._pool(tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def run_blocks(
        self,
        tokens: torch.Tensor,
        block_forward: BlockForward = plain_block_forward,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Image blocks `start .. stop - 1` (default: all) on `tokens`, each through `block_forward`."""
        return run_block_range(self.blocks, tokens, block_forward, start, stop)

    def forward(self, images: torch.Tensor, block_forward: BlockForward = plain_block_forward) -> torch.Tensor:
        """Image features in the joint embedding (not normalised)."""
        return self.pool(self.run_blocks(self.embed(images), block_forward))

    # Text tower.

    @property
    def text_blocks(self) -> nn.ModuleList:
        return self.clip.transformer.resblocks

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, context_length) on the backbone's device."""
        return self.tokenizer(list(texts)).to(self.mean.device)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text features in the joint embedding (not normalised)."""
        return self.clip.encode_text(tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's temperature exp(t) (100 for OpenAI CLIP), frozen."""
        return self.clip.logit_scale.exp().detach()

    def attention_layers(self) -> dict[str, list[nn.MultiheadAttention]]:
        """The attention module of every block, per tower ("visual", "text")."""
        return {
            "visual": [block.attn for block in self.blocks],
            "text": [block.attn for block in self.text_blocks],
        }

    def text_attention_mask(self) -> torch.Tensor | None:
        """The causal mask the text blocks' attention receives."""
        return self.clip.attn_mask


def attention_context(attn: nn.MultiheadAttention, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The output of a batch-first `nn.MultiheadAttention` before its out-projection: the input of `out_proj`.

    Args:
        attn: the attention module (self-attention, fused in-projection).
        inputs: (B, L, C) queries = keys = values.
        mask: the additive or boolean (L, L) attention mask the module was called with.
    """
    batch, length, width = inputs.shape
    heads = attn.num_heads
    q, k, v = F.linear(inputs, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return context.transpose(1, 2).reshape(batch, length, width)


def _parse(spec: str) -> tuple[str, str | None]:
    """(open_clip model name, pretrained tag or None) from the part after `clip:`."""
    if spec.startswith(SCHEMAS):
        return spec, None
    architecture, _, tag = spec.partition("/")
    return architecture, tag or None


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs "No pretrained weights loaded" on the root logger for every random model."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _resolve(name: str) -> tuple[str, str | None, bool]:
    """(open_clip model name or hf-hub:/local-dir: spec, pretrained tag, whether it is such a spec)."""
    open_clip = require("open_clip")

    if not name.startswith(CLIP_PREFIX) or not name[len(CLIP_PREFIX) :]:
        raise BadInputError(f"{name!r} is not a CLIP backbone name (clip:ViT-B-16/openai)")
    model_name, tag = _parse(name[len(CLIP_PREFIX) :])
    is_schema = model_name.startswith(SCHEMAS)
    if not is_schema and model_name not in open_clip.list_models():
        raise BadInputError(f"{model_name!r} is not an open_clip model (see `open_clip.list_models()`)")
    if tag is not None and not open_clip.get_pretrained_cfg(model_name, tag):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise BadInputError(f"open_clip has no pretrained tag {tag!r} for {model_name} (tags: {known})")
    return model_name, tag, is_schema


def _origin(name: str, model_name: str, tag: str | None, pretrained: bool, file: Path | None) -> BackboneOrigin:
    open_clip = require("open_clip")

    hub = ""
    if file is None and pretrained:
        hub = model_name.removeprefix("hf-hub:") if model_name.startswith("hf-hub:") else ""
        hub = hub or (open_clip.get_pretrained_cfg(model_name, tag).get("hf_hub", "") if tag else "")
    return BackboneOrigin(
        requested=name,
        name=name,
        architecture=model_name,
        tag=tag,
        source="open_clip",
        pretrained=pretrained or file is not None,
        hf_hub_id=hub.strip("/") or None,
        weights_file=str(file) if file is not None else None,
        weights_file_sha256=sha256_file(file) if file is not None else None,
    )


def describe_clip_backbone(name: str, model_kwargs: dict | None, weights: str | Path | None) -> BackboneDescription:
    """A `clip:` name checked without building the model (see `ntkcl.models.backbone.describe_backbone`)."""
    model_name, tag, _ = _resolve(name)
    if weights is not None:
        weights_file(weights)  # its content is open_clip's to read (OpenAI's TorchScript archives included)
    return BackboneDescription(_origin(name, model_name, tag, False, None), "open_clip CLIP", CLIP_FEATURES)


def create_clip_backbone(
    name: str,
    pretrained: bool = True,
    weights: str | Path | None = None,
    model_kwargs: dict | None = None,
    init_seed: int = 0,
    normalize: str = "clip",
    allow_partial: bool = False,
) -> ClipBackbone:
    """Create a frozen open_clip CLIP from a `clip:` name.

    Args:
        name: `clip:ViT-B-16/openai` (architecture/tag; the tag's weights come from the Hugging Face Hub cache
            and honour HF_HUB_OFFLINE), `clip:hf-hub:<repo>` or `clip:local-dir:<folder>`.
        pretrained: load the named weights; false builds the architecture with random weights.
        weights: a local open_clip checkpoint (file, or a folder holding one) loaded into the architecture;
            overrides `pretrained`. A tag in the name still selects the architecture variant (e.g. OpenAI's
            QuickGELU).
        model_kwargs: open_clip config overrides (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`, ...),
            e.g. a tiny CLIP for tests.
        init_seed: seed of the random initialisation, so the same backbone is rebuilt everywhere.
        normalize: input normalisation, see `ClipBackbone`.
        allow_partial: load a `weights` file that does not cover the model (non-strict) instead of refusing it.
    """
    open_clip = require("open_clip")

    model_name, tag, is_schema = _resolve(name)
    quick_gelu = bool(tag and open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
    kwargs = {"force_quick_gelu": quick_gelu, **(model_kwargs or {})}
    file = weights_file(weights) if weights is not None else None
    from_name = pretrained and file is None
    if from_name and not (tag or is_schema):
        raise BadInputError(f"{name!r} names no weights: add a tag (clip:{model_name}/openai) or pass --no-pretrained")
    try:
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = open_clip.create_model(
                model_name, pretrained=tag if from_name else None, load_weights=from_name, **kwargs
            )
            if file is not None:
                open_clip.load_checkpoint(model, str(file), strict=not allow_partial)
            tokenizer = open_clip.get_tokenizer(model_name, context_length=model.context_length)
    except BadInputError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(
            f"could not load CLIP backbone {name!r}: {first_line} (offline? pass --weights FILE or --no-pretrained)"
        ) from error
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "transformer") or not hasattr(model, "transformer"):
        raise BadInputError(f"{name!r} is not a CLIP with ViT image and transformer text towers")
    if not (visual.transformer.batch_first and model.transformer.batch_first):
        raise BadInputError(f"{name!r} has sequence-first transformers; ntkcl needs open_clip's batch-first layout")
    origin = _origin(name, model_name, tag, from_name, file)
    return ClipBackbone(model, tokenizer, origin, state_dict_sha256(model), normalize)
