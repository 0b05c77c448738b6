"""Backbone choice: presets never override a named backbone, every timm name form resolves and is recorded,
pre-trained weights load strictly, and architectures a method cannot hook into are refused before a run."""

import json
import logging

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from ntkcl.config import parse_assignments
from ntkcl.errors import BadInputError
from ntkcl.export.constants import CONFIG_NAME
from ntkcl.files import sha256_file
from ntkcl.models.backbone import (
    FUSED_QKV_ATTENTION,
    PRE_NORM_BLOCKS,
    VIT_TOKENS,
    check_backbone_for_method,
    create_backbone,
    describe_backbone,
)
from ntkcl.presets import resolve_config
from tests.conftest import FAKE_HUB_COMMIT, FAKE_HUB_REPO, TINY_BACKBONE_FLAGS
from tests.test_cli_bad_input import assert_one_line_error

SMALL = {"img_size": 32}  # test_vit (6 blocks, width 64) at 32 pixels: 4 patches


def test_a_named_backbone_replaces_the_presets_backbone(caplog):
    caplog.set_level(logging.WARNING, logger="ntkcl")
    keeplora = {"stream": {"dataset": "digits"}, "method": {"name": "keeplora"}}
    digits = resolve_config(overrides=keeplora)  # keeplora.toml[digits]: a tiny random CLIP
    assert (digits.backbone.pretrained, digits.backbone.normalize) == (False, "clip")

    named = resolve_config(overrides={**keeplora, "backbone": {"name": "clip:ViT-B-16/openai"}})
    assert named.backbone.pretrained is True and named.backbone.model_kwargs == {}
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "keeplora digits preset" in warning and '"embed_dim": 32' in warning and "pretrained=false" in warning

    caplog.clear()
    given = {"name": "test_vit", "pretrained": False, "model_kwargs": {"depth": 2}, "normalize": "none"}
    explicit = resolve_config(overrides={**keeplora, "backbone": given})
    assert explicit.backbone.model_kwargs == {"depth": 2} and not caplog.records  # nothing of the user's dropped
    # The digits stream preset names only its backbone: naming another one drops nothing, so warns of nothing.
    resolve_config(overrides={"stream": {"dataset": "digits"}, "backbone": {"name": "vit_small_patch16_224"}})
    assert not caplog.records


def test_unset_and_whole_tables_delete_preset_keys():
    overrides, replaced = parse_assignments(["stream.dataset_options={}", "optim.lr=0.5"])
    assert replaced == ["stream.dataset_options"]
    cleared = resolve_config(overrides={"stream": {"dataset": "digits"}, **overrides}, unset=replaced)
    assert cleared.stream.dataset_options == {} and cleared.optim.lr == 0.5
    assert cleared.backbone.name == "ntkcl-tiny-fdsl"  # the rest of the preset stays

    reverted = resolve_config(overrides={"stream": {"dataset": "digits"}}, unset=["stream.augment"])
    assert reverted.stream.augment == "paper" and reverted.backbone.name == "ntkcl-tiny-fdsl"
    with pytest.raises(BadInputError, match="x is not a config field"):  # the same check as `--unset`
        resolve_config(overrides={"stream": {"dataset": "digits"}}, unset=["x.y"])


def test_bare_and_deprecated_names_resolve_to_their_tag():
    assert describe_backbone("vit_base_patch16_224").origin.name == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    deprecated = describe_backbone("vit_base_patch16_224_in21k").origin
    assert (deprecated.name, deprecated.requested) == (
        "vit_base_patch16_224.augreg_in21k",
        "vit_base_patch16_224_in21k",
    )
    with pytest.raises(BadInputError, match="not a timm model"):
        describe_backbone("vit_nonexistent_patch3")


def test_features_decide_what_a_method_can_hook_into():
    assert {VIT_TOKENS, PRE_NORM_BLOCKS, FUSED_QKV_ATTENTION} <= describe_backbone("test_vit").features
    post_norm = describe_backbone("vit_base_patch16_rpn_224")
    assert VIT_TOKENS in post_norm.features and PRE_NORM_BLOCKS not in post_norm.features
    with pytest.raises(BadInputError, match=r"method m needs .*pre-norm.*ResPostBlock"):
        check_backbone_for_method("m", (VIT_TOKENS, PRE_NORM_BLOCKS), post_norm)
    assert describe_backbone("resnet18").features == frozenset()


@pytest.mark.parametrize(
    ("backbone", "fragments"),
    [
        ("resnet18", ("method ntk-cl", "resnet18.a1_in1k (ResNet)", "ViT token pipeline")),
        ("vit_base_patch16_rpn_224", ("method ntk-cl", "vit_base_patch16_rpn_224.sw_in1k", "ResPostBlock")),
    ],
)
def test_incompatible_architectures_exit_2_before_anything_runs(cli, data_root, tmp_path, backbone, fragments):
    result = cli(
        "train",
        "-s",
        "digits",
        "--backbone",
        backbone,
        "--no-pretrained",
        "--unset",
        "backbone.model_kwargs",
        "--out",
        tmp_path / "runs",
    )
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "runs").exists()


def test_a_file_that_is_no_checkpoint_exits_2(cli, data_root, tmp_path):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    result = cli("train", "-s", "digits", *TINY_BACKBONE_FLAGS, "--weights", text, "--out", tmp_path / "runs")
    assert_one_line_error(result, str(text), "not a readable checkpoint of test_vit")
    assert not (tmp_path / "runs").exists()


def test_hub_weights_load_strictly_and_record_their_origin(fake_hf_cache):
    backbone = create_backbone("test_vit", model_kwargs=SMALL)
    origin = backbone.record()
    assert origin["name"] == "test_vit.r160_in1k" and origin["hf_hub_id"] == FAKE_HUB_REPO
    assert origin["revision"] == FAKE_HUB_COMMIT and origin["pretrained"] is True
    assert origin["weights_file_sha256"] == sha256_file(fake_hf_cache.weights)
    saved = load_file(fake_hf_cache.weights)
    assert torch.equal(backbone.vit.blocks[5].mlp.fc2.weight, saved["blocks.5.mlp.fc2.weight"])
    assert backbone.vit.pos_embed.shape[1] == 1 + 4  # timm resampled the 160-pixel position embedding

    from_hub = create_backbone(f"hf-hub:{FAKE_HUB_REPO}", model_kwargs=SMALL)
    assert (from_hub.origin.source, from_hub.name) == ("hf-hub", "test_vit.r160_in1k")
    assert from_hub.weights_sha256 == backbone.weights_sha256

    from_folder = create_backbone(f"local-dir:{fake_hf_cache.snapshot}", model_kwargs=SMALL)
    assert from_folder.origin.source == "local-dir" and from_folder.origin.revision is None
    assert from_folder.origin.weights_file == str(fake_hf_cache.snapshot / "model.safetensors")
    assert from_folder.weights_sha256 == backbone.weights_sha256


def test_partial_weights_are_refused_unless_allowed(fake_hf_cache, tmp_path, caplog):
    with pytest.raises(BadInputError, match=r"unexpected blocks\.4\.\*, blocks\.5\.\* \(set backbone") as refused:
        create_backbone("test_vit", model_kwargs={**SMALL, "depth": 4})
    assert "allow_partial" in str(refused.value)

    state = {k: v for k, v in load_file(fake_hf_cache.weights).items() if not k.startswith(("blocks.5.", "norm."))}
    truncated = tmp_path / "truncated.safetensors"
    save_file(state, truncated)
    with pytest.raises(BadInputError, match=r"missing blocks\.5\.\*, norm\.weight, norm\.bias \("):
        create_backbone("test_vit", weights=truncated, model_kwargs=SMALL)

    caplog.set_level(logging.WARNING, logger="ntkcl")
    partial = create_backbone("test_vit", weights=truncated, model_kwargs=SMALL, allow_partial=True)
    assert torch.equal(partial.vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert "PARTIAL WEIGHTS" in caplog.text and "missing blocks.5.*, norm.weight, norm.bias" in caplog.text


def test_a_pretrained_run_records_the_resolved_backbone(cli, data_root, fake_hf_cache, tmp_path):
    result = cli(
        "train", "-s", "digits", "--method", "simplecil", "--backbone", "test_vit",
        "--set", "backbone.model_kwargs={img_size=32}", "--init-classes", "5", "--increment", "5",
        "--num-workers", "0", "-q", "--json", "--out", tmp_path / "runs",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "dropped" not in result.err  # the digits preset names only its backbone: nothing else to drop
    run = tmp_path / "runs" / json.loads(result.out)["run_dir"].rsplit("/", 1)[-1]
    recorded = json.loads((run / "run.json").read_text())["backbone"]
    assert recorded["name"] == "test_vit.r160_in1k" and recorded["requested"] == "test_vit.r160_in1k"
    assert (recorded["hf_hub_id"], recorded["revision"]) == (FAKE_HUB_REPO, FAKE_HUB_COMMIT)
    assert json.loads((run / "config.json").read_text())["backbone"]["name"] == "test_vit.r160_in1k"

    exported = cli("export", run, "--out", tmp_path / "export")
    assert exported.code == 0, exported.err
    document = json.loads((tmp_path / "export" / CONFIG_NAME).read_text())
    assert (document["base_model"], document["base_model_revision"]) == (FAKE_HUB_REPO, FAKE_HUB_COMMIT)
    assert document["backbone_origin"]["weights_file_sha256"] == sha256_file(fake_hf_cache.weights)
    card = ModelCard.load(tmp_path / "export" / "README.md").data
    assert (card.base_model, card.to_dict()["base_model_relation"]) == (FAKE_HUB_REPO, "adapter")
    assert card.license == "apache-2.0"  # the pre-trained weights' licence from timm's config
