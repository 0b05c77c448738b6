"""`ntkcl export` and loading exports back: round trip per method, folder contents, card, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, ModelHubMixin
from PIL import Image
from safetensors import safe_open

import ntkcl
from ntkcl.config import load_config
from ntkcl.data.registry import get_dataset
from ntkcl.engine import rundir
from ntkcl.engine.builders import build_backbone, build_method
from ntkcl.errors import BadInputError
from ntkcl.export import (
    CARD_NAME,
    CONFIG_NAME,
    EXPORT_FILES,
    HUB_CONFIG_NAME,
    METRICS_NAME,
    WEIGHTS_NAME,
    ContinualModel,
    card_is_generated,
    load_pretrained,
    task_infos,
)
from ntkcl.export.card import EVALUATED, card_data
from ntkcl.export.checksums import write_checksums
from ntkcl.files import FOLDER_MARKER
from ntkcl.methods.registry import discover_methods
from tests.test_cli_bad_input import assert_one_line_error


def _method_cases():
    cases = []
    for name, item in discover_methods().items():
        marks = () if item.ok else pytest.mark.skip(reason=f"method {name} does not load: {item.error}")
        cases.append(pytest.param(name, marks=marks, id=name))
    return cases


def reference_model(run):
    """The method rebuilt from the run's last checkpoint through the engine's own builders."""
    config = load_config(run / rundir.CONFIG_FILE)
    record = rundir.read_json(run / rundir.RUN_FILE)
    checkpoints = rundir.finished_checkpoints(run)
    method = build_method(config, build_backbone(config))
    state, _ = rundir.load_checkpoint(checkpoints[-1])
    method.load_learned_state(state, task_infos(record["task_sizes"], record["tasks"])[: len(checkpoints)])
    return method.eval()


@pytest.mark.parametrize("method", _method_cases())
def test_round_trip_gives_bit_identical_logits(cli, run_of, tmp_path, method):
    run = run_of(method)
    folder = tmp_path / "export"
    result = cli("export", run, "--out", folder, "--json")
    assert result.code == 0, result.err
    assert result.json()["finished"] is True

    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        expected = reference_model(run).predict(images)
    loaded = ntkcl.load_pretrained(folder)
    assert not loaded.method.training
    assert torch.equal(loaded.predict(images), expected)
    assert loaded.class_names == rundir.read_json(run / rundir.RUN_FILE)["class_names"]

    pil = [Image.fromarray((np.random.default_rng(i).random((8, 8, 3)) * 255).astype(np.uint8)) for i in range(3)]
    batch = torch.stack([loaded.transform(image) for image in pil])
    assert torch.equal(loaded.predict(pil), loaded.predict(batch))
    assert len(loaded.classify(pil)) == 3

    scored = cli("eval", folder, "--json", "-q")
    assert scored.code == 0, scored.err
    assert scored.json()["matches_export"] is True
    assert scored.json()["final_accuracy"] == pytest.approx(
        json.loads((run / "metrics.json").read_text())["final_accuracy"]
    )


def test_folder_contents_and_config_schema(cli, run_of, tmp_path):
    run = run_of("finetune")
    folder = tmp_path / "export"
    assert cli("export", run, "--out", folder).code == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted([*EXPORT_FILES, FOLDER_MARKER])

    with safe_open(folder / WEIGHTS_NAME, "pt") as weights:
        assert weights.metadata() == {"format": "pt"}
        keys = set(weights.keys())
    assert keys and not any(key.startswith("backbone.") for key in keys)
    checkpoint_state, _ = rundir.load_checkpoint(rundir.finished_checkpoints(run)[-1])
    assert keys == set(checkpoint_state)

    text = (folder / CONFIG_NAME).read_text()
    document = json.loads(text)
    assert text == json.dumps(document, indent=2, sort_keys=True) + "\n"
    record = rundir.read_json(run / rundir.RUN_FILE)
    assert document["library_name"] == "ntkcl"
    assert document["ntkcl_version"] == ntkcl.__version__
    assert document["method"] == "finetune"
    assert document["method_params"] == load_config(run / "config.json").method.params
    assert document["base_model"] is None  # a random initialisation has no base model on the Hub
    assert document["base_model_sha256"] == record["backbone"]["weights_sha256"]
    # A random initialisation is named by its bare architecture, never by a tag of weights it does not hold.
    assert document["backbone"]["name"] == document["backbone_origin"]["name"] == "test_vit"
    assert document["backbone_origin"]["init"] == "random init"
    assert document["class_order"] == record["class_order"]
    assert document["class_names"] == record["class_names"]
    assert document["stream"]["dataset"] == "digits"
    assert document["protocol"] == "class-incremental"
    assert (document["task_sizes"], document["finished_tasks"], document["finished"]) == ([5, 5], 2, True)
    assert "data_root" not in document["stream"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert document["metrics"]["final_accuracy"] == metrics["final_accuracy"]
    assert json.loads((folder / METRICS_NAME).read_text()) == metrics


def test_model_card_renders_the_runs_metrics(cli, run_of, tmp_path):
    run = run_of("finetune")
    folder = tmp_path / "export"
    assert cli("export", run, "--out", folder, "--license", "cc-by-4.0").code == 0
    card = (folder / CARD_NAME).read_text()
    data = ModelCard(card).data
    assert (data.library_name, data.pipeline_tag, data.license) == ("ntkcl", "image-classification", "cc-by-4.0")
    assert data.base_model is None  # random initialisation: no base model on the Hub
    assert {"continual-learning", "class-incremental", "finetune", "digits"} <= set(data.tags)
    body = ModelCard(card).text
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"| {metrics['final_accuracy']:.2f} |" in body
    assert f"| {metrics['mean_incremental_accuracy']:.2f} |" in body
    assert f"| {metrics['forgetting']:.2f} |" in body
    row = metrics["accuracy_matrix"][1]
    assert f"| 1 | {row[0]:.2f} | {row[1]:.2f} |" in body
    assert "ntkcl train --stream digits --method finetune" in body
    assert "## Licence" not in body  # chosen with --license
    assert card_is_generated(card)
    assert not card_is_generated(card.replace("## Results", "## Results (edited)"))


def test_card_metadata_parses_back_as_hub_metadata(cli, run_of, tmp_path):
    run = run_of("ntk-cl")
    folder = tmp_path / "export"
    assert cli("export", run, "--out", folder).code == 0
    card = ModelCard.load(folder / CARD_NAME)
    data = card.data
    assert data.datasets is None and data.metrics == ["accuracy"]  # digits has no copy on the Hub
    assert (data.license, data.license_name) == ("other", "unspecified")
    assert data.license_link == get_dataset("digits").homepage and "## Licence" in card.text
    metrics = json.loads((run / "metrics.json").read_text())
    results = {result.metric_name: result for result in data.eval_results}
    assert set(results) == {name for _, _, name in EVALUATED}
    for key, metric_type, name in EVALUATED:
        assert (results[name].metric_type, results[name].metric_value) == (metric_type, round(metrics[key], 2))
        assert (results[name].task_type, results[name].dataset_type, results[name].dataset_split) == (
            "image-classification",
            "digits",
            "test",
        )
    assert card.text.count("@article{liu2024ntkcl") == 1  # one citation per method
    document = json.loads((folder / CONFIG_NAME).read_text())
    assert f"pip install 'ntkcl=={document['ntkcl_version']}'" in card.text
    assert f"| `optim.lr` | `{json.dumps(document['training']['optim']['lr'])}` |" in card.text
    for key, value in document["method_params"].items():
        assert f"| `method.params.{key}` | `{json.dumps(value)}` |" in card.text
    document["stream"]["dataset"] = "cifar100"  # a dataset the Hub has: its id, not the plugin name
    hub = card_data(document, metrics)
    assert hub.datasets == ["uoft-cs/cifar100"]
    assert {result.dataset_type for result in hub.eval_results} == {"uoft-cs/cifar100"}
    summary = json.loads((folder / HUB_CONFIG_NAME).read_text())
    assert (summary["method"], summary["ntkcl_config"], summary["weights"]) == ("ntk-cl", CONFIG_NAME, WEIGHTS_NAME)


def test_from_pretrained_and_save_pretrained_round_trip_bit_identical(cli, run_of, tmp_path):
    folder = tmp_path / "export"
    assert cli("export", run_of("ntk-cl"), "--out", folder).code == 0
    model = ContinualModel.from_pretrained(folder)
    assert isinstance(model, torch.nn.Module) and isinstance(model, ModelHubMixin)
    again = tmp_path / "again"
    model.save_pretrained(again)
    assert sorted(p.name for p in again.iterdir()) == sorted(EXPORT_FILES)
    for name in EXPORT_FILES:
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    images = torch.rand(4, 3, 32, 32)
    assert torch.equal(ContinualModel.from_pretrained(again)(images), model(images))


def test_default_run_is_the_latest_under_runs(cli, run_of, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli("export"), "no runs under runs")
    shutil.copytree(run_of("simplecil"), tmp_path / "runs" / "older")
    newer = shutil.copytree(run_of("finetune"), tmp_path / "runs" / "newer")
    record = json.loads((newer / "run.json").read_text())
    record["started_at"] = "2999-01-01T00:00:00+00:00"
    (newer / "run.json").write_text(json.dumps(record))
    result = cli("export", "--json")
    assert result.code == 0, result.err
    assert result.json()["export_dir"] == "exports/newer"
    assert json.loads((tmp_path / "exports" / "newer" / CONFIG_NAME).read_text())["method"] == "finetune"


def test_unfinished_run_exports_its_finished_tasks(cli, run_of, tmp_path):
    run = shutil.copytree(run_of("finetune"), tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "task-01")
    folder = tmp_path / "export"
    result = cli("export", run, "--out", folder, "--json")
    assert result.code == 0, result.err
    assert result.json()["finished"] is False and result.json()["finished_tasks"] == 1
    assert "finished 1 of 2 tasks" in result.err
    document = json.loads((folder / CONFIG_NAME).read_text())
    assert (document["finished"], document["finished_tasks"], document["num_tasks"]) == (False, 1, 2)
    assert "Partial export" in (folder / CARD_NAME).read_text()
    loaded = load_pretrained(folder)
    assert len(loaded.class_names) == 5
    assert loaded.predict(torch.rand(2, 3, 32, 32)).shape == (2, 5)

    shutil.rmtree(run / "checkpoints")
    assert_one_line_error(cli("export", run, "--out", tmp_path / "none"), "no finished task")
    assert not (tmp_path / "none").exists()


def _edit_config(folder, **changes):
    """Change adapter_config.json and record its new sha256, so the content itself is what is checked."""
    path = folder / CONFIG_NAME
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))
    write_checksums(folder)


def test_loading_bad_exports_is_one_line_exit_2(cli, run_of, tmp_path):
    source = tmp_path / "export"
    assert cli("export", run_of("finetune"), "--out", source).code == 0

    def copy(name):
        return shutil.copytree(source, tmp_path / name)

    newer = copy("newer")
    _edit_config(newer, ntkcl_version="99.0.0")
    assert_one_line_error(cli("eval", newer), "ntkcl 99.0.0", "upgrade")

    peft = copy("peft")
    (peft / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    assert_one_line_error(cli("eval", peft), "not written by ntkcl", "LORA")

    unknown = copy("unknown")
    _edit_config(unknown, method="ewc")
    assert_one_line_error(cli("eval", unknown), "unknown method 'ewc'")

    other = copy("other")
    _edit_config(other, method="simplecil", method_params={})
    assert_one_line_error(cli("eval", other), "does not fit method simplecil")

    with pytest.raises(BadInputError, match="finetune export, not simplecil"):
        load_pretrained(source, method="simplecil")

    mismatch = copy("mismatch")
    _edit_config(mismatch, base_model_sha256="0" * 64)
    assert_one_line_error(cli("eval", mismatch), "sha256", "--weights")

    assert_one_line_error(cli("eval", tmp_path / "missing"), "does not exist")
    (tmp_path / "plain").mkdir()
    assert_one_line_error(cli("eval", tmp_path / "plain"), "not an ntkcl run directory or export")
    assert_one_line_error(cli("eval", source, "--stream", "nope"), "unknown dataset 'nope'")


def test_export_refuses_to_clobber_a_foreign_folder(cli, run_of, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert_one_line_error(cli("export", run_of("finetune"), "--out", target), "not an ntkcl export")
    assert (target / "notes.txt").read_text() == "keep me"
    again = tmp_path / "again"
    assert cli("export", run_of("finetune"), "--out", again).code == 0
    assert cli("export", run_of("finetune"), "--out", again).code == 0
    assert sorted(p.name for p in again.iterdir()) == sorted([*EXPORT_FILES, FOLDER_MARKER])
    assert_one_line_error(cli("export", run_of("finetune"), "--repo-id", "a/b"), "only apply with --hub")
