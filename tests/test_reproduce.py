"""Published results as data and `ntkcl reproduce`: every packaged table parses and traces each number to its
printed cell; a made-up table on digits and synthetic goes through a dry run and a real run."""

import json
import re
import statistics
from pathlib import Path

import pytest

from ntkcl._entry_points import DATASETS_GROUP, METHODS_GROUP, STREAMS_GROUP, entry_point_names
from ntkcl.engine import rundir
from ntkcl.errors import BadInputError
from ntkcl.results import PRINTED, load_tables, packaged_files, parse_results
from tests.conftest import run_cli

REFERENCE = Path("/work/shared/reference")
TINY = ["backbone.pretrained=false", "backbone.model_kwargs={img_size=32, patch_size=8, depth=2}", "optim.epochs=1"]
TINY_SET = json.dumps(TINY)

# Made-up published numbers: a row no accuracy can be within (0 ± 0 with the 0.5 floor), a row every accuracy
# is within (tolerance 100), a method ntkcl lacks, and a stream whose data is not prepared.
TEST_RESULTS = f"""
[paper]
key = "test"
title = "A test table"
citation = "Test et al."

[tables.test-table]
table = "Table 9"
caption = "digits and synthetic"
page = "7"
transcribed_from = "this test"
backbone = "test_vit.r160_in1k"
seeds = 2
run_seeds = [0, 1]

[[tables.test-table.rows]]
method = "simplecil"
stream = "digits"
metric = "final_accuracy"
mean = 0.0
sd = 0.0
row = "SimpleCIL"
column = "digits A_T"
printed = "0.00±0.00"
set = {TINY_SET}

[[tables.test-table.rows]]
method = "simplecil"
stream = "digits"
metric = "mean_incremental_accuracy"
mean = 50.0
row = "SimpleCIL"
column = "digits mean"
printed = "50.0"
tolerance = 100.0
set = {TINY_SET}

[[tables.test-table.rows]]
method = "simplecil"
stream = "synthetic"
metric = "final_accuracy"
mean = 40.0
sd = 2.5
row = "SimpleCIL"
column = "synthetic A_T"
printed = "40.0±2.5"
set = {json.dumps([*TINY, "stream.init_classes=5", "stream.increment=5"])}

[[tables.test-table.rows]]
method = "no-such-method"
stream = "digits"
metric = "final_accuracy"
mean = 90.0
sd = 1.0
row = "Missing"
column = "digits A_T"
printed = "90.0±1.0"

[[tables.test-table.rows]]
method = "simplecil"
stream = "cifar100"
metric = "final_accuracy"
mean = 80.0
sd = 1.0
row = "SimpleCIL"
column = "CIFAR-100 A_T"
printed = "80.0±1.0"
"""


def test_packaged_results_parse_and_name_real_streams():
    tables = load_tables()
    assert {"ntk-cl-table-2", "ntk-cl-table-3", "ntk-cl-table-4", "ntk-cl-table-5"} <= set(tables)
    assert len(packaged_files()) == 4
    streams = set(entry_point_names(DATASETS_GROUP)) | set(entry_point_names(STREAMS_GROUP))
    methods = set(entry_point_names(METHODS_GROUP))
    for table in tables.values():
        for row in table.results():
            assert row.stream in streams, row.key
            assert row.tolerance == max(row.sd or 0.0, 0.5) or row.tolerance > 0
            # mean and sd read back from the printed cell, which the source string quotes.
            match = PRINTED.fullmatch(row.printed)
            assert float(match["mean"]) == row.mean and (match["sd"] and float(match["sd"])) == (row.sd or None)
            assert repr(row.printed) in row.source and table.paper.citation in row.source
    # A method ntkcl lacks is reported as such by `--list`, from the registry, never dropped.
    listed = run_cli("reproduce", "--list", "--json").json()["tables"]
    for entry in listed:
        rows = tables[entry["table"]].results()
        assert entry["rows"] == len(rows)
        assert entry["missing_methods"] == sorted({row.method for row in rows} - methods)
    table_2 = next(entry for entry in listed if entry["table"] == "ntk-cl-table-2")
    assert "ntk-cl" not in table_2["missing_methods"]
    assert {"l2p", "dualprompt", "coda-prompt", "ovor", "ease", "inflora"} <= set(table_2["methods"])


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="the research notes are not on this machine")
def test_packaged_numbers_are_in_the_research_notes():
    """Each printed cell appears, as a whole number, in the notes the tables were written from, on a line that
    names its row or its column (or on the line before, where the notes wrap a sentence)."""
    notes = "\n".join(path.read_text() for path in REFERENCE.glob("*.md")).replace("*", "")
    for table in load_tables().values():
        for row in table.spec.rows:
            cell = re.compile(rf"(?<![0-9.]){re.escape(row.printed)}(?![0-9])")
            lines = notes.splitlines()
            found = [lines[i - 1] + " " + line for i, line in enumerate(lines) if cell.search(line)]
            named = [text for text in found if row.row in text or row.column.split()[0] in text]
            assert named, (table.name, row.row, row.column, row.printed)


def test_a_mistyped_number_is_refused():
    text = TEST_RESULTS.replace('printed = "40.0±2.5"', 'printed = "40.0±2.6"')
    with pytest.raises(BadInputError, match=re.escape("do not read back from printed '40.0±2.6'")):
        parse_results(text, "test.toml")


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    results = root / "test.toml"
    results.write_text(TEST_RESULTS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NTKCL_DATA_ROOT", str(root / "data"))
        common = ["reproduce", "test-table", "--results", results, "--out", root / "out", "-q", "--json"]
        dry = run_cli(*common, "--dry-run")
        dry.wrote_nothing = not (root / "out").exists()
        real = run_cli(*common)
        again = run_cli(*common, "--dry-run")
    return root / "out", dry, real, again


def test_dry_run_lists_runs_missing_data_and_methods(reproduced):
    out, dry, _, _ = reproduced
    assert dry.code == 0, dry.err
    plan = dry.json()
    assert plan["dry_run"] and plan["rows"] == 5
    runs = {run["run"]: run for run in plan["runs"]}
    assert set(runs) == {"simplecil-digits", "simplecil-synthetic", "no-such-method-digits", "simplecil-cifar100"}
    assert len(runs["simplecil-digits"]["rows"]) == 2  # A_T and mean incremental share one group
    assert runs["simplecil-digits"]["members"] == {"0": "new", "1": "new"}
    assert runs["simplecil-digits"]["group_dir"] == str(out / "simplecil-digits")
    assert runs["no-such-method-digits"]["outcome"] == "method missing"
    assert plan["missing_methods"] == ["no-such-method"]
    assert [need["dataset"] for need in plan["datasets_to_prepare"]] == ["cifar100"]
    assert plan["datasets_to_prepare"][0]["prepare"] == f"ntkcl prepare cifar100 --data-root {out.parent / 'data'}"
    assert runs["simplecil-digits"]["estimate_source"].startswith("unknown")
    # Runs with their data come first.
    assert [run["run"] for run in plan["runs"]][:2] == ["simplecil-digits", "simplecil-synthetic"]
    assert dry.wrote_nothing


def test_real_run_compares_with_the_right_differences_and_verdicts(reproduced):
    out, _, real, _ = reproduced
    assert real.code == 0, real.err
    document = real.json()
    assert sorted(Path(path).name for path in document["files"]) == ["index.html", "reproduce.json", "reproduce.md"]
    assert json.loads((out / "reproduce.json").read_text())["comparison"] == document["comparison"]
    rows = {(row["stream"], row["method"], row["metric"]): row for row in document["comparison"]}
    members = [
        json.loads((out / "simplecil-digits" / f"seed-{seed}" / rundir.METRICS_FILE).read_text()) for seed in (0, 1)
    ]
    final = [metrics["final_accuracy"] for metrics in members]
    impossible = rows[("digits", "simplecil", "final_accuracy")]
    assert impossible["ntkcl_mean"] == pytest.approx(statistics.mean(final))
    assert impossible["ntkcl_sd"] == pytest.approx(statistics.stdev(final))
    assert impossible["ntkcl_n"] == 2
    assert impossible["difference"] == pytest.approx(statistics.mean(final) - 0.0)
    assert impossible["tolerance"] == 0.5 and impossible["verdict"] == "outside"
    generous = rows[("digits", "simplecil", "mean_incremental_accuracy")]
    average = statistics.mean(metrics["mean_incremental_accuracy"] for metrics in members)
    assert generous["difference"] == pytest.approx(average - 50.0) and generous["verdict"] == "within"
    synthetic = rows[("synthetic", "simplecil", "final_accuracy")]
    expected = "within" if abs(synthetic["difference"]) <= 2.5 else "outside"
    assert synthetic["tolerance"] == 2.5 and synthetic["verdict"] == expected
    assert synthetic["run_dirs"] == [
        str(out / "simplecil-synthetic" / "seed-0"),
        str(out / "simplecil-synthetic" / "seed-1"),
    ]
    assert rows[("digits", "no-such-method", "final_accuracy")]["verdict"] == "method missing"
    assert rows[("cifar100", "simplecil", "final_accuracy")]["verdict"] == "not run"
    assert "Test et al., Table 9, page 7" in impossible["source"]
    markdown = (out / "reproduce.md").read_text()
    assert f"| simplecil | digits | A_T | 0.00 ± 0.00 (n=2) | {statistics.mean(final):.2f} ±" in markdown
    assert "ntkcl prepare cifar100" not in markdown or "not run" in markdown
    page = (out / "report" / "index.html").read_text()
    assert "Published results" in page and "outside" in page


def test_repeat_finds_finished_groups_and_measures_the_time(reproduced):
    out, _, _, again = reproduced
    plan = again.json()
    runs = {run["run"]: run for run in plan["runs"]}
    assert runs["simplecil-digits"]["members"] == {"0": "finished", "1": "finished"}
    assert runs["simplecil-digits"]["estimate_s"] == 0.0


def test_unknown_table_and_rows_exit_2(cli, tmp_path):
    result = cli("reproduce", "no-such-table", "--dry-run")
    assert result.code == 2 and "reproduce --list" in result.err
    result = cli("reproduce", "ntk-cl-table-2", "--rows", "nothing/*", "--dry-run")
    assert result.code == 2 and "matches no row" in result.err
    result = cli("reproduce", "ntk-cl-table-2", "--rows", "ntk-cl/*", "--dry-run", "--json", "--out", tmp_path)
    assert result.code == 0, result.err
    assert {run["run"] for run in result.json()["runs"]} == {
        "ntk-cl-cifar100",
        "ntk-cl-imagenet-r",
        "ntk-cl-imagenet-a",
    }
