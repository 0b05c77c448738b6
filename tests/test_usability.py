"""What a user meets first: help text, missing extras, logs off a terminal, --print-config, timm's flag names,
composite streams offline, partial weights, file permissions."""

from __future__ import annotations

import json
import re
import stat
import sys
from pathlib import Path

import pytest
import torch

from ntkcl._entry_points import DATASETS_GROUP, METHODS_GROUP, STREAMS_GROUP, entry_point_names
from tests.conftest import TINY_BACKBONE_FLAGS, only_run
from tests.test_cli_bad_input import assert_one_line_error

README = Path(__file__).resolve().parents[1] / "README.md"
# Types typer prints when an option has no metavar: not what a user should type.
TYPE_PLACEHOLDERS = re.compile(r"<(str|int|float|bool|path)( range)?>|<list\[")


def _commands() -> list[str]:
    from ntkcl.cli import register_commands

    return sorted(register_commands().commands)


@pytest.mark.parametrize("command", _commands())
def test_help_shows_what_to_type_and_literal_install_commands(cli, command):
    result = cli(command, "--help")
    assert result.code == 0, result.err
    options = [line for line in result.out.splitlines() if line.lstrip().startswith("-")]
    assert options, result.out
    for line in options:
        assert not TYPE_PLACEHOLDERS.search(line), line
    text = " ".join(result.out.split())
    if command == "train":
        assert "ntkcl[tensorboard], ntkcl[wandb]" in text
        assert "clip:ViT-B-16/openai" in text and "task-incremental" in text
        for alias in ("--model", "--output", "--workers", "--grad-accum-steps", "--print-config"):
            assert alias in text
    if command == "report":
        assert "pip install 'ntkcl[report]'" in text


def test_readme_lists_every_built_in_method_dataset_and_stream():
    text = README.read_text(encoding="utf-8")
    (method_row,) = [line for line in text.splitlines() if line.startswith("| `--method/-m NAME` |")]
    listed = set(re.findall(r"`([a-z0-9-]+)`", method_row.split("|")[2]))
    assert listed == set(entry_point_names(METHODS_GROUP))
    for name in [*entry_point_names(DATASETS_GROUP), *entry_point_names(STREAMS_GROUP)]:
        assert f"`{name}`" in text, name


def test_missing_optional_package_names_the_extra(cli, data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an install without the extra looks like
    result = cli("train", "--stream", "digits", "--method", "keeplora", "--out", tmp_path / "runs")
    assert_one_line_error(result, "CLIP backbones need open_clip: pip install 'ntkcl[clip]'")
    assert not (tmp_path / "runs").exists()


def test_print_config_names_the_layer_of_each_value_and_creates_nothing(cli, data_root, tmp_path):
    result = cli(
        "train",
        "--method",
        "simplecil",
        "--workers",
        "0",
        "--grad-accum-steps",
        "2",
        "--batch-size",
        "8",
        "--output",
        tmp_path / "runs",
        "--print-config",
        "--json",
    )
    assert result.code == 0, result.err
    answer = result.json()
    sources = answer["sources"]
    assert answer["config"]["optim"]["accumulation_steps"] == 2 and sources["optim.accumulation_steps"] == "flags"
    assert answer["config"]["runtime"]["num_workers"] == 0 and sources["runtime.num_workers"] == "flags"
    assert sources["optim.epochs"] == "method preset (simplecil.toml [digits])"
    assert sources["stream.augment"] == "stream preset (streams.toml [digits])"
    assert sources["optim.lr"] == "default"
    assert sources["stream.init_classes"].startswith("completed")  # the plugin's protocol
    assert not (tmp_path / "runs").exists()
    text = cli("train", "--method", "simplecil", "--print-config")
    assert text.code == 0 and re.search(r"^optim\.batch_size\s+= 16  \(default\)$", text.out, re.MULTILINE)


def test_model_alias_sets_the_backbone(cli, data_root):
    result = cli("train", "--model", "test_vit", "--no-pretrained", "--method", "simplecil", "--print-config", "--json")
    assert result.code == 0, result.err
    assert result.json()["config"]["backbone"]["name"] == "test_vit"  # random init: the bare architecture


def test_composite_of_offline_datasets_keeps_their_offline_backbone(cli, data_root):
    single = cli("train", "--stream", "digits", "--method", "simplecil", "--print-config", "--json").json()
    both = cli("train", "--stream", "digits,synthetic", "--method", "simplecil", "--print-config", "--json")
    assert both.code == 0, both.err
    assert both.json()["config"]["backbone"] == single["config"]["backbone"]
    assert both.json()["sources"]["backbone.name"] == "stream preset (streams.toml [digits,synthetic])"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """The tiny ViT's weights without one tensor of block 1, and without all of block 1."""
    import timm
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    state = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2)
    state = {key: value.contiguous() for key, value in state.state_dict().items()}
    one = {key: value for key, value in state.items() if key != "blocks.1.mlp.fc1.weight"}
    block = {key: value for key, value in state.items() if not key.startswith("blocks.1.")}
    save_file(one, folder / "one.safetensors")
    save_file(block, folder / "block.safetensors")
    return folder


@pytest.mark.parametrize(
    ("file", "named"), [("one", "missing blocks.1.mlp.fc1.weight "), ("block", "missing blocks.1.* ")]
)
def test_partial_weights_error_names_the_missing_keys_in_one_line(cli, data_root, tmp_path, tiny_weights, file, named):
    flags = [flag for flag in TINY_BACKBONE_FLAGS if flag != "--no-pretrained"]
    # Nothing may precede the one-line error (warnings are held until every check has passed).
    out = tmp_path / "runs"
    result = cli("train", "-m", "simplecil", *flags, "--weights", tiny_weights / f"{file}.safetensors", "-o", out)
    assert_one_line_error(result, named)
    assert not out.exists()


def test_run_log_names_the_folder_first_and_reads_in_percent(cli, data_root, tmp_path):
    result = cli(
        "train",
        "-m",
        "finetune",
        *TINY_BACKBONE_FLAGS,
        "--init-classes",
        "5",
        "--increment",
        "5",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--workers",
        "0",
        "-o",
        tmp_path / "runs",
    )
    assert result.code == 0, result.err
    run = only_run(tmp_path / "runs")
    lines = result.err.splitlines()
    assert lines[0] == f"run folder: {run}"
    assert not any("saved snapshot" in line for line in lines)  # routine snapshots only with --verbose
    (epoch_line,) = [line for line in lines if line.startswith("task 1/2 epoch")]
    assert epoch_line.endswith("s)")  # the whole record on its line
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    accuracy = [record["train_acc"] for record in records if record["event"] == "epoch_end"]
    assert f"train_acc {accuracy[0]:.4f}" in epoch_line
    assert all(0 <= value <= 100 for value in accuracy) and max(accuracy) > 1  # percent, not a fraction
    written = [run / "config.json", *run.glob("checkpoints/task-*/*.safetensors")]
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in written}
    assert len(set(modes.values())) == 1, modes  # checkpoints as readable as every other file of the run


def test_progress_lines_are_never_wrapped_off_a_terminal(capsys):
    from ntkcl.engine.progress import Reporter

    record = "task 1/5 epoch 1/5: " + ", ".join(f"term_{index} {index:.4f}" for index in range(30))
    Reporter().message(record)
    assert capsys.readouterr().err == record + "\n"


def test_batch_accuracy_is_a_percentage():
    from ntkcl.methods.base import batch_accuracy

    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert batch_accuracy(logits, torch.tensor([0, 1, 1, 1])).item() == 75.0
