"""Bad input: exit code 2 and one line on stderr, never a traceback; nothing written is lost."""

import json

import pytest

from tests.conftest import TINY_BACKBONE_FLAGS


def assert_one_line_error(result, *fragments):
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_stream_lists_valid_names(cli, data_root):
    result = cli("train", "--stream", "imagenet-z", "--method", "simplecil")
    assert_one_line_error(result, "unknown dataset 'imagenet-z'", "digits", "synthetic")


def test_unknown_method_lists_valid_names(cli, data_root):
    result = cli("train", "--stream", "digits", "--method", "ewc")
    assert_one_line_error(result, "unknown method 'ewc'", "finetune", "simplecil")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--init-classes", "11"], "init_classes=11"),
        (["--init-classes", "4", "--increment", "7"], "increment=7"),
        (["--epochs", "-1"], "optim.epochs"),
        (["--set", "optim.momentum=2"], "optim.momentum"),
        (["--set", "method.params.bottleneck=0"], "method.params.bottleneck"),
    ],
)
def test_invalid_protocol_and_values(cli, data_root, tmp_path, flags, fragment):
    result = cli("train", "--stream", "digits", "--method", "finetune", *flags, "--out", tmp_path / "runs")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists()


def test_missing_and_corrupt_config_files(cli, data_root, tmp_path):
    assert_one_line_error(cli("train", "--config", tmp_path / "nope.toml"), "does not exist")
    corrupt = tmp_path / "bad.yaml"
    corrupt.write_text("optim: [unclosed\n")
    assert_one_line_error(cli("train", "--config", corrupt), "cannot be parsed")


def test_eval_and_resume_of_something_that_is_not_a_run(cli, tmp_path):
    assert_one_line_error(cli("eval", tmp_path / "missing"), "does not exist")
    (tmp_path / "folder").mkdir()
    assert_one_line_error(cli("eval", tmp_path / "folder"), "not an ntkcl run directory")
    assert_one_line_error(cli("train", "--resume", tmp_path / "folder"), "not an ntkcl run directory")


def test_unwritable_output_directory(cli, data_root, tmp_path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("keep me")
    result = cli("train", "--stream", "digits", "--method", "simplecil", *TINY_BACKBONE_FLAGS, "--out", blocker)
    assert_one_line_error(result, "cannot create run directory")
    assert blocker.read_text() == "keep me"


def test_json_mode_reports_errors_on_stdout(cli, data_root):
    result = cli("train", "--stream", "nope", "--json")
    assert result.code == 2
    document = json.loads(result.out)
    assert document["ok"] is False and "unknown dataset" in document["error"]


def test_unknown_option_is_one_line_exit_2(cli):
    assert_one_line_error(cli("train", "--no-such-flag"), "--no-such-flag")
