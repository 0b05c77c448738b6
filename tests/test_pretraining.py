"""The formula-driven generator, the pre-training script, the shipped backbone's load path and records, and
the no-training reference every run reports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ntkcl.engine import loop
from ntkcl.engine.metrics import AccuracyMatrix
from ntkcl.engine.reference import (
    REFERENCE_CACHE_FOLDER,
    read_cached_reference,
    reference_cache_file,
    write_cached_reference,
)
from ntkcl.errors import BadInputError
from ntkcl.files import sha256_file
from ntkcl.models import shipped
from ntkcl.models.backbone import create_backbone
from ntkcl.models.shipped import NTKCL_TINY_FDSL
from ntkcl.pretraining import pretrain
from ntkcl.pretraining.contours import ContourSettings, line_coverage
from ntkcl.pretraining.contours import generate as generate_contours
from ntkcl.pretraining.fractals import FractalSettings, generate, sample_categories
from tests.conftest import metrics_of, only_run

TINY_DATA = FractalSettings(seed=3, num_categories=4, instances_per_category=3, image_size=32)


def test_the_generator_is_a_function_of_its_seed():
    images, labels = generate(TINY_DATA)
    again, _ = generate(TINY_DATA)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert np.array_equal(images, again)
    # A category on its own is drawn as it is in the whole set.
    alone, alone_labels = generate(TINY_DATA, categories=range(2, 3))
    assert np.array_equal(alone, images[6:9]) and alone_labels.tolist() == [2, 2, 2]
    other, _ = generate(FractalSettings(seed=4, num_categories=4, instances_per_category=3))
    assert not np.array_equal(other, images)


def test_categories_are_different_contracting_systems_and_instances_vary():
    systems = sample_categories(FractalSettings(seed=0, num_categories=20))
    for system in systems:
        assert 2 <= len(system.probability) <= 4 and np.isclose(system.probability.sum(), 1.0)
        assert (np.linalg.svd(system.linear, compute_uv=False) < 1.0).all()  # every map contracts
    assert len({system.offset.tobytes() for system in systems}) == 20
    images, _ = generate(TINY_DATA)
    assert not np.array_equal(images[0], images[1])  # instances of one category differ (placement, colour)
    assert (images.reshape(12, -1).std(axis=1) > 0).all()  # no blank image


def test_contour_categories_are_seeded_line_drawings():
    settings = ContourSettings(seed=3, num_categories=3, instances_per_category=2)
    images, labels = generate_contours(settings)
    assert images.shape == (6, 32, 32, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(images, generate_contours(settings)[0])
    assert np.array_equal(generate_contours(settings, categories=range(1, 2))[0], images[2:4])
    assert not np.array_equal(images[0], images[1]) and (images.reshape(6, -1).std(axis=1) > 0).all()


def test_a_segment_covers_the_pixels_within_half_its_width():
    segment = np.array([[[2.0, 4.5], [8.0, 4.5]]])  # horizontal, through the centres of row 4
    coverage = line_coverage(segment, 10, width=1.0)
    assert coverage[4, 2:8].tolist() == [1.0] * 6  # on the line
    assert coverage[3].max() == 0.0 and coverage[5].max() == 0.0  # one pixel away, beyond half the width
    assert coverage[4, 0] == 0.0 and coverage[4, 9] == 0.0  # past the ends


def test_pretraining_is_deterministic_and_records_its_settings(tmp_path, capsys):
    arguments = ["--categories", "4", "--instances", "32", "--contour-categories", "2", "--contour-instances", "8"]
    arguments += ["--epochs", "1", "--batch-size", "32", "--threads", "1"]
    assert pretrain.main(["--output", str(tmp_path / "a"), *arguments]) == 0
    assert pretrain.main(["--output", str(tmp_path / "b"), *arguments]) == 0
    first = json.loads((tmp_path / "a" / "pretraining.json").read_text())
    second = json.loads((tmp_path / "b" / "pretraining.json").read_text())
    assert first["weights_sha256"] == second["weights_sha256"] == sha256_file(tmp_path / "a" / "model.safetensors")
    assert [generator["kind"] for generator in first["generators"]] == ["ifs-fractals", "radial-contours"]
    assert first["generators"][0]["num_categories"] == 4 and first["training"]["epochs"] == 1
    assert first["cpu_seconds"] > 0 and len(first["epochs"]) == 1
    assert not any(key.startswith("head.") for key in load_file(tmp_path / "a" / "model.safetensors"))
    card = (tmp_path / "a" / "README.md").read_text()
    assert "ntkcl-tiny-fdsl" in card and first["weights_sha256"] in card
    assert pretrain.main(["--output", str(tmp_path / "c"), "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
    assert pretrain.main(["--output", str(tmp_path / "a"), *arguments]) == 0  # its own folder is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert pretrain.main(["--output", str(tmp_path / "other"), *arguments]) == 2
    assert "refusing to replace it" in capsys.readouterr().err


def test_the_shipped_weights_load_strictly_under_their_own_name():
    backbone = create_backbone("ntkcl-tiny-fdsl")
    record = backbone.record()
    assert (record["name"], record["source"], record["init"]) == ("ntkcl-tiny-fdsl", "ntkcl", "pre-trained")
    assert record["architecture"] == "vit_tiny_patch16_224" and record["tag"] is None
    assert record["weights_file_sha256"] == sha256_file(NTKCL_TINY_FDSL.weights_file)
    assert record["weights_file_sha256"] == NTKCL_TINY_FDSL.recorded_sha256()
    saved = load_file(NTKCL_TINY_FDSL.weights_file)
    assert set(saved) == set(backbone.vit.state_dict())
    assert {tensor.dtype for tensor in saved.values()} == {torch.float16}  # stored in half, loaded as fp32
    assert torch.equal(backbone.vit.blocks[3].mlp.fc2.weight, saved["blocks.3.mlp.fc2.weight"].float())
    assert NTKCL_TINY_FDSL.weights_file.stat().st_size < 4 * 2**20
    settings = json.loads(NTKCL_TINY_FDSL.settings_file.read_text())
    assert settings["backbone"]["model_kwargs"] == NTKCL_TINY_FDSL.model_kwargs
    assert all({"kind", "seed", "num_categories"} <= set(generator) for generator in settings["generators"])


def test_shipped_weights_that_changed_or_do_not_fit_are_refused(tmp_path, monkeypatch):
    state = load_file(NTKCL_TINY_FDSL.weights_file)
    truncated = tmp_path / "truncated.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.3.")}, truncated)
    with pytest.raises(BadInputError, match=r"missing blocks\.3\.\*"):
        create_backbone("ntkcl-tiny-fdsl", weights=truncated)
    # Other weights in the shipped architecture are not the shipped backbone.
    other = create_backbone("ntkcl-tiny-fdsl", weights=NTKCL_TINY_FDSL.weights_file)
    assert other.record()["name"] == "vit_tiny_patch16_224"

    folder = tmp_path / NTKCL_TINY_FDSL.name
    shutil.copytree(NTKCL_TINY_FDSL.folder, folder)
    state["norm.bias"] = state["norm.bias"] + 1
    save_file(state, folder / shipped.WEIGHTS_FILE_NAME)
    monkeypatch.setattr(shipped, "SHIPPED_FOLDER", tmp_path)
    with pytest.raises(BadInputError, match="differs from the ntkcl-tiny-fdsl weights ntkcl shipped"):
        create_backbone("ntkcl-tiny-fdsl")


def test_a_random_backbone_is_recorded_as_the_bare_architecture():
    backbone = create_backbone("ntkcl-tiny-fdsl", pretrained=False)
    assert backbone.record()["name"] == "vit_tiny_patch16_224" and backbone.record()["init"] == "random init"
    assert backbone.name == "vit_tiny_patch16_224 (random init)"
    assert backbone.vit.patch_embed.patch_size == (16, 16) and len(backbone.blocks) == 4  # the shipped architecture


def test_random_init_runs_say_so_and_report_simplecil_as_the_no_training_reference(
    cli, data_root, tmp_path, monkeypatch
):
    """Two runs of two tasks on the random initialisation of the shipped architecture: SimpleCIL, then
    finetune, whose no-training reference must be exactly that SimpleCIL run; a second finetune run reads it from
    the cache."""
    common = ["--stream", "digits", "--backbone", "ntkcl-tiny-fdsl", "--no-pretrained", "--init-classes", "5"]
    common += ["--increment", "5"]
    common += ["--num-workers", "0", "-q"]
    simplecil = cli("train", *common, "--method", "simplecil", "--json", "--out", tmp_path / "simplecil")
    assert simplecil.code == 0, simplecil.err
    expected = simplecil.json()["metrics"]
    assert "no_training_reference" not in expected  # SimpleCIL is its own reference
    (run,) = (tmp_path / "simplecil").iterdir()
    recorded = json.loads((run / "run.json").read_text())["backbone"]
    assert (recorded["name"], recorded["init"], recorded["pretrained"]) == (
        "vit_tiny_patch16_224",
        "random init",
        False,
    )
    assert recorded["weights_file"] is None and recorded["tag"] is None
    config = json.loads((run / "config.json").read_text())["backbone"]
    assert config["name"] == "vit_tiny_patch16_224" and config["model_kwargs"] == NTKCL_TINY_FDSL.model_kwargs
    report = cli("report", run, "--out", tmp_path / "report", "--json")
    assert report.code == 0, report.err
    assert "vit_tiny_patch16_224 (random init)" in (tmp_path / "report" / "index.html").read_text()

    finetune = cli("train", *common, "--method", "finetune", "--epochs", "1", "--out", tmp_path / "finetune")
    assert finetune.code == 0, finetune.err
    (run,) = (tmp_path / "finetune").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    reference = metrics["no_training_reference"]
    assert reference["method"] == "simplecil" and reference["accuracy_matrix"] == expected["accuracy_matrix"]
    line = (
        f"finetune A_T {metrics['final_accuracy']:.2f} (forgetting {metrics['forgetting']:.2f}) vs "
        f"{expected['final_accuracy']:.2f} (forgetting {expected['forgetting']:.2f}) with no training (simplecil)"
    )
    lines = finetune.out.splitlines()
    assert line in lines and lines.index(line) == len(lines) - 2  # after the summary, before the run folder

    # A later run of the same backbone and stream takes the reference from the data root's cache.
    (cached,) = (data_root / REFERENCE_CACHE_FOLDER).iterdir()
    recomputed = []
    monkeypatch.setattr(loop, "reference_matrix", lambda *args: recomputed.append(args))
    again = cli("train", *common[:-1], "--method", "finetune", "--epochs", "1", "--out", tmp_path / "again")
    assert again.code == 0, again.err
    assert not recomputed and "no-training reference (simplecil): A_T" in again.err and "(cached)" in again.err
    assert metrics_of(only_run(tmp_path / "again"))["no_training_reference"] == reference


def test_the_cached_reference_is_read_only_for_its_exact_identity(tmp_path):
    identity = {"backbone": {"weights_sha256": "ab"}, "class_order": [1, 0]}
    matrix = AccuracyMatrix.from_rows([[(3, 4)], [(2, 4), (1, 5)]])
    path = reference_cache_file(tmp_path, identity)
    write_cached_reference(path, identity, matrix)
    assert read_cached_reference(path, identity) == matrix
    other = {**identity, "class_order": [0, 1]}
    assert reference_cache_file(tmp_path, other) != path and read_cached_reference(path, other) is None
    path.write_text(path.read_text()[:-10])  # a torn or hand-edited file is recomputed, not trusted
    assert read_cached_reference(path, identity) is None
    assert read_cached_reference(tmp_path / "absent.json", identity) is None
