"""The open_clip CLIP backbone, attention hooks and the zero-shot text classifier on a tiny random CLIP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ntkcl.errors import BadInputError
from ntkcl.models.backbone import create_backbone
from ntkcl.models.clip import attention_context
from ntkcl.models.heads import TextClassifier, clip_logits
from tests.conftest import TINY_CLIP

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    settings = {key: value for key, value in TINY_CLIP.items() if key != "name"}
    return create_backbone(TINY_CLIP["name"], **settings)


def test_clip_backbone_has_the_backbone_interface_and_open_clip_outputs(clip):
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        features = clip(images)
        expected = clip.clip.encode_image((images - clip.mean) / clip.std)
    torch.testing.assert_close(features, expected, atol=0, rtol=0)
    assert (clip.kind, clip.embed_dim, clip.feature_dim, clip.num_tokens, clip.img_size) == ("clip", 64, 32, 17, 32)
    assert len(clip.blocks) == len(clip.text_blocks) == 2 and clip.context_length == 16
    assert not any(parameter.requires_grad for parameter in clip.parameters())
    tokens = clip.tokenize(["a photo of a 3."])
    assert tokens.shape == (1, 16) and clip.encode_text(tokens).shape == (1, 32)
    settings = {key: value for key, value in TINY_CLIP.items() if key != "name"}
    assert create_backbone(TINY_CLIP["name"], **settings).weights_sha256 == clip.weights_sha256


@pytest.mark.parametrize("tower", ["visual", "text"])
def test_attention_context_is_the_out_projection_input(clip, tower):
    attention = clip.attention_layers()[tower][1]
    mask = clip.text_attention_mask() if tower == "text" else None
    inputs = torch.randn(2, 16 if tower == "text" else 17, 64)
    with torch.no_grad():
        output = attention(inputs, inputs, inputs, need_weights=False, attn_mask=mask)[0]
        context = attention_context(attention, inputs, mask)
    torch.testing.assert_close(F.linear(context, attention.out_proj.weight, attention.out_proj.bias), output)


def test_text_classifier_averages_normalised_prompt_features(clip):
    classifier = TextClassifier()
    classifier.add_classes(0, ["cat", "dog"], ["a photo of a {}.", "a {}."], clip.tokenize)
    classifier.add_classes(2, ["car"], ["a photo of a {}."], clip.tokenize)
    assert classifier.has_classes(range(3)) and not classifier.has_classes(range(2, 4))
    with torch.no_grad():
        embeddings = classifier.embeddings(clip.encode_text, range(0, 3))
        prompts = F.normalize(
            clip.encode_text(clip.tokenize(["a photo of a cat.", "a cat.", "a photo of a dog."])), dim=-1
        )
        dog_and_car = classifier.embeddings(clip.encode_text, range(1, 3))
    torch.testing.assert_close(embeddings[0], F.normalize(prompts[0] + prompts[1], dim=-1))
    torch.testing.assert_close(dog_and_car, embeddings[1:])
    image_features = torch.randn(4, 32)
    expected = clip.logit_scale * F.normalize(image_features, dim=-1) @ embeddings.T
    torch.testing.assert_close(clip_logits(image_features, embeddings, clip.logit_scale), expected)


@pytest.mark.parametrize(
    ("name", "pretrained", "message"),
    [
        ("clip:", False, "not a CLIP backbone name"),
        ("clip:ViT-X-1", False, "not an open_clip model"),
        ("clip:ViT-B-16/nope", False, "no pretrained tag"),
        ("clip:ViT-B-16", True, "names no weights"),
    ],
)
def test_bad_clip_names_are_bad_input(name, pretrained, message):
    with pytest.raises(BadInputError, match=message):
        create_backbone(name, pretrained=pretrained)


def test_missing_clip_weights_file_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="do not exist"):
        create_backbone("clip:ViT-B-16/openai", weights=tmp_path / "missing.bin")


def test_local_weights_file_loads_strictly(clip, tmp_path):
    file = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.clip.state_dict(), file)
    config = TINY_CLIP["model_kwargs"]
    loaded = create_backbone(TINY_CLIP["name"], weights=tmp_path, model_kwargs=config, init_seed=7, normalize="clip")
    assert loaded.weights_sha256 == clip.weights_sha256
    truncated = {key: value for key, value in clip.clip.state_dict().items() if "resblocks.1." not in key}
    torch.save(truncated, file)
    with pytest.raises(BadInputError, match="could not load CLIP backbone"):
        create_backbone(TINY_CLIP["name"], weights=file, model_kwargs=config)
