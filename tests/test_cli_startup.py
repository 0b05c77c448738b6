"""A fast, conventional command line: light imports, shell completion, choices in help, JSON parser errors."""

import json
import subprocess
import sys

import pytest

from tests.test_cli_bad_input import assert_one_line_error

HEAVY_MODULES = ("torch", "timm", "torchvision", "ntkcl.engine.loop")


def test_help_version_and_datasets_never_import_torch(tmp_path):
    """`import ntkcl.cli`, every subcommand's registration, --help, --version and `ntkcl datasets`."""
    script = f"""
import contextlib, io, sys
import ntkcl.cli
from ntkcl.cli import main
for argv in (["--help"], ["train", "--help"], ["--version"], ["datasets", "--json", "--data-root", {str(tmp_path)!r}]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exit_:
            assert exit_.code in (0, None), (argv, exit_.code)
print([name for name in {HEAVY_MODULES!r} if name in sys.modules])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_completion_script_and_candidates(cli, monkeypatch):
    monkeypatch.setenv("_NTKCL_COMPLETE", "source_bash")
    script = cli()
    assert script.code == 0 and "_ntkcl_completion" in script.out and "complete " in script.out

    monkeypatch.setenv("_NTKCL_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "ntkcl train --method simp")
    monkeypatch.setenv("COMP_CWORD", "3")
    assert cli().out.split() == ["simplecil"]
    monkeypatch.setenv("COMP_WORDS", "ntkcl prepare dig")
    monkeypatch.setenv("COMP_CWORD", "2")
    assert cli().out.split() == ["digits"]
    monkeypatch.setenv("COMP_WORDS", "ntkcl train --precision ")
    monkeypatch.setenv("COMP_CWORD", "3")
    assert cli().out.split() == ["auto", "fp32", "bf16"]


def test_choices_are_shown_in_help(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option
    help_text = cli("train", "--help").out
    assert "auto|fp32|bf16" in help_text
    assert "auto|cpu|cuda|cuda:N" in help_text
    assert_one_line_error(cli("train", "--precision", "fp16"), "--precision", "fp16")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--json", "--epochs", "x"],
        ["train", "--json", "--no-such-flag"],
        ["eval", "--json"],
        ["prepare", "--json", "--data-root", ""],
    ],
)
def test_parser_errors_honour_json(cli, argv):
    result = cli(*argv)
    assert result.code == 2
    document = json.loads(result.out)
    assert document["ok"] is False and document["exit_code"] == 2 and document["error"]
    assert len(result.err.strip().splitlines()) == 1


def test_empty_paths_are_refused(cli, tmp_path):
    for option in ("--out", "--config", "--weights", "--resume", "--data-root"):
        result = cli("train", option, "", "--out" if option != "--out" else "--quiet", tmp_path / "runs")
        assert_one_line_error(result, option, "must not be empty")
    assert not (tmp_path / "runs").exists()
