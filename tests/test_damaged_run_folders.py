"""A damaged run folder or export is named in one line (exit 2) with what can still be done, never trusted.

The table is generated: every file of a run folder crossed with every way of damaging a file, plus the
damages specific to checkpoints (another method's tensors, swapped tensors, unexpected or extra folders).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ntkcl.engine import rundir
from ntkcl.engine.run_reader import read_run_folder
from ntkcl.errors import BadInputError
from ntkcl.export.constants import CHECKSUMS_NAME, CONFIG_NAME, METRICS_NAME, WEIGHTS_NAME
from ntkcl.files import FOLDER_MARKER, folder_checksums, write_marker
from tests.test_cli_bad_input import assert_one_line_error

RUN_FILES = {
    "config": rundir.CONFIG_FILE,
    "run record": rundir.RUN_FILE,
    "task record": f"{rundir.CHECKPOINT_DIR}/task-01/{rundir.TASK_FILE}",
    "first task record": f"{rundir.CHECKPOINT_DIR}/task-00/{rundir.TASK_FILE}",
    "checkpoint": f"{rundir.CHECKPOINT_DIR}/task-01/{rundir.STATE_FILE}",
    "checkpoint marker": f"{rundir.CHECKPOINT_DIR}/task-01/{FOLDER_MARKER}",
}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _empty(path):
    path.write_bytes(b"")


def _latin1(path):
    path.write_bytes(path.read_bytes().replace(b"}", "\u00e9}".encode("latin-1"), 1))


def _json_list(path):
    path.write_text("[1, 2]")


def _folder(path):
    path.unlink()
    path.mkdir()


DAMAGES = {"truncated": _truncate, "emptied": _empty, "latin-1": _latin1, "JSON list": _json_list, "folder": _folder}


def _reseal(checkpoint):
    """Record the damaged files' sha256 as if written so: the damage must then be found by content."""
    write_marker(checkpoint, rundir.CHECKPOINT_KIND, folder_checksums(checkpoint))


def _replace_state(run, tensors):
    checkpoint = run / rundir.CHECKPOINT_DIR / "task-01"
    save_file(tensors, checkpoint / rundir.STATE_FILE)
    _reseal(checkpoint)


def _other_methods_tensors(run):
    _replace_state(run, {"lora.0.down": torch.zeros(4, 64), "lora.0.up": torch.zeros(64, 4)})


def _transposed_tensor(run):
    state = load_file(run / rundir.CHECKPOINT_DIR / "task-01" / rundir.STATE_FILE)
    _replace_state(run, {key: value.t().contiguous() for key, value in state.items()})


def _empty_tensors(run):
    state = load_file(run / rundir.CHECKPOINT_DIR / "task-01" / rundir.STATE_FILE)
    _replace_state(run, {key: value[:0].contiguous() for key, value in state.items()})


def _swapped_rows(run):
    """Same names and shapes, other values (two tensors or rows swapped): only the recorded sha256 can tell."""
    path = run / rundir.CHECKPOINT_DIR / "task-01" / rundir.STATE_FILE
    state = load_file(path)
    save_file({key: value.flip(0).contiguous() for key, value in state.items()}, path)


def _unexpected_folder(run):
    shutil.copytree(run / rundir.CHECKPOINT_DIR / "task-01", run / rundir.CHECKPOINT_DIR / "task-xx")


def _extra_checkpoint(run):
    shutil.copytree(run / rundir.CHECKPOINT_DIR / "task-01", run / rundir.CHECKPOINT_DIR / "task-02")


def _gap(run):
    shutil.rmtree(run / rundir.CHECKPOINT_DIR / "task-00")


def _unknown_method(run):
    config = json.loads((run / rundir.CONFIG_FILE).read_text())
    config["method"]["name"] = "no-such-method"
    (run / rundir.CONFIG_FILE).write_text(json.dumps(config))


def _unknown_dataset(run):
    config = json.loads((run / rundir.CONFIG_FILE).read_text())
    config["stream"]["dataset"] = "no-such-dataset"
    (run / rundir.CONFIG_FILE).write_text(json.dumps(config))


def _wrong_type_in_run_record(run):
    record = json.loads((run / rundir.RUN_FILE).read_text())
    record["task_sizes"] = ["5", "xx"]
    (run / rundir.RUN_FILE).write_text(json.dumps(record))


def _run_record_without_backbone(run):
    record = json.loads((run / rundir.RUN_FILE).read_text())
    del record["backbone"]
    (run / rundir.RUN_FILE).write_text(json.dumps(record))


def _task_record_counts_as_strings(run):
    path = run / rundir.CHECKPOINT_DIR / "task-01" / rundir.TASK_FILE
    record = json.loads(path.read_text())
    record["counts"] = [["79", "178"], [86, 182]]
    path.write_text(json.dumps(record))
    _reseal(path.parent)


CASES = {
    **{
        f"{what} {damage}": (lambda run, f=file, d=function: d(run / f), file.split("/")[-1])
        for what, file in RUN_FILES.items()
        for damage, function in DAMAGES.items()
    },
    "another method's tensors": (_other_methods_tensors, "does not fit method simplecil"),
    "transposed tensor": (_transposed_tensor, "has shape"),
    "empty tensors": (_empty_tensors, "has shape"),
    "swapped values": (_swapped_rows, "sha256 recorded"),
    "unexpected checkpoint folder": (_unexpected_folder, "task-xx: unexpected"),
    "extra checkpoint": (_extra_checkpoint, "the stream has 2 tasks"),
    "missing first checkpoint": (_gap, "task-00: missing"),
    "unknown method": (_unknown_method, "unknown method 'no-such-method'"),
    "unknown dataset": (_unknown_dataset, "unknown dataset 'no-such-dataset'"),
    "strings for task sizes": (_wrong_type_in_run_record, "task_sizes"),
    "run record without backbone": (_run_record_without_backbone, "backbone"),
    "task record counts as strings": (_task_record_counts_as_strings, "counts"),
}


@pytest.fixture
def damaged(run_of, tmp_path):
    def make(case):
        run = tmp_path / "run"
        shutil.copytree(run_of("simplecil"), run)
        CASES[case][0](run)
        return run

    return make


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_damage_is_one_line_naming_the_file(damaged, case):
    run = damaged(case)
    with pytest.raises(BadInputError) as error:
        read_run_folder(run, check_tensors=True)
    message = str(error.value)
    assert "\n" not in message
    assert CASES[case][1] in message, message


def test_damage_in_the_last_task_says_which_tasks_remain(damaged):
    run = damaged("checkpoint truncated")
    with pytest.raises(BadInputError, match="tasks 0-0 are intact.*continues after task-00"):
        read_run_folder(run)


@pytest.mark.parametrize("damage", ["missing", "emptied", "JSON list"])
def test_metrics_json_is_rebuilt_exactly_from_the_task_records(run_of, tmp_path, damage):
    original = run_of("simplecil")
    run = tmp_path / "run"
    shutil.copytree(original, run)
    path = run / rundir.METRICS_FILE
    if damage == "missing":
        path.unlink()
    else:
        DAMAGES[damage](path)
    folder = read_run_folder(run)
    assert len(folder.notes) == 1 and "rebuilt it exactly" in folder.notes[0]
    expected = json.loads((original / rundir.METRICS_FILE).read_text())
    rebuilt = json.loads(path.read_text())
    assert {key: rebuilt[key] for key in ("correct", "total", "accuracy_matrix", "final_accuracy")} == {
        key: expected[key] for key in ("correct", "total", "accuracy_matrix", "final_accuracy")
    }
    assert read_run_folder(run).notes == []


def test_commands_refuse_a_damaged_run_in_one_line(cli, damaged, tmp_path):
    run = damaged("extra checkpoint")
    out = tmp_path / "export"
    assert_one_line_error(cli("export", run, "--out", out), "the stream has 2 tasks")
    assert not out.exists()
    shutil.rmtree(run / rundir.CHECKPOINT_DIR / "task-02")
    (run / rundir.CHECKPOINT_DIR / "task-01" / rundir.TASK_FILE).write_bytes(b"\xff\xfe{")
    for command in (("eval", run, "-q"), ("export", run, "--out", out), ("train", "--resume", run, "-q")):
        assert_one_line_error(cli(*command), "task-01/task.json: differs from the sha256", "tasks 0-0 are intact")
    assert not out.exists()


def _export(cli, run, folder):
    assert cli("export", run, "--out", folder).code == 0
    return folder


def _edit_config(folder, change):
    document = json.loads((folder / CONFIG_NAME).read_text())
    change(document)
    (folder / CONFIG_NAME).write_text(json.dumps(document))


EXPORT_DAMAGES = {
    "truncated weights": (lambda f: _truncate(f / WEIGHTS_NAME), "sha256 recorded"),
    "emptied weights": (lambda f: _empty(f / WEIGHTS_NAME), "sha256 recorded"),
    "edited metrics": (lambda f: (f / METRICS_NAME).write_text("{}"), "metrics.json does not match"),
    "no checksums": (lambda f: (f / CHECKSUMS_NAME).unlink(), "lacks checksums.sha256"),
    "damaged checksums": (lambda f: (f / CHECKSUMS_NAME).write_text("nonsense\n"), "line 1"),
    "too many finished tasks": (
        lambda f: _edit_config(f, lambda d: d.update(finished_tasks=len(d["task_sizes"]) + 1)),
        "finished_tasks",
    ),
    "config without stream": (lambda f: _edit_config(f, lambda d: d.pop("stream")), "stream"),
    "config a list": (lambda f: (f / CONFIG_NAME).write_text("[]"), "not an object"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_DAMAGES))
def test_damaged_exports_are_refused_on_load(cli, run_of, tmp_path, case):
    import ntkcl

    folder = _export(cli, run_of("simplecil"), tmp_path / "export")
    damage, fragment = EXPORT_DAMAGES[case]
    damage(folder)
    with pytest.raises(BadInputError) as error:
        ntkcl.load_pretrained(folder)
    assert "\n" not in str(error.value) and fragment in str(error.value), str(error.value)


@pytest.mark.parametrize("export_format", [2, 3])
def test_an_export_from_before_markers_is_replaced_and_loaded(cli, run_of, tmp_path, export_format):
    """Format-2 exports (no marker, no checksums.sha256) are recognised by their five files and config; formats
    2 and 3 name two files as PEFT does (adapter_model.safetensors, adapter_config.json) and are still read."""
    import ntkcl
    from ntkcl.export.checksums import write_checksums
    from ntkcl.export.constants import LEGACY_NAMES

    folder = _export(cli, run_of("simplecil"), tmp_path / "export")
    (folder / FOLDER_MARKER).unlink()
    (folder / CHECKSUMS_NAME).unlink()
    _edit_config(folder, lambda d: d.update(export_format=export_format))
    for name, legacy in LEGACY_NAMES.items():
        (folder / name).rename(folder / legacy)
    if export_format == 3:
        write_checksums(folder)
        assert "adapter_model.safetensors" in (folder / CHECKSUMS_NAME).read_text()
    assert ntkcl.load_pretrained(folder).predict(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    assert cli("eval", folder, "--json").code == 0
    if export_format == 2:
        _export(cli, run_of("simplecil"), folder)
        assert (folder / CHECKSUMS_NAME).is_file() and (folder / FOLDER_MARKER).is_file()
        assert not any((folder / legacy).exists() for legacy in LEGACY_NAMES.values())
