"""Composite streams (one dataset per task) from generated data: label offsets, per-task label spaces,
zero-shot rows, resume, capability checks."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ntkcl.data.plugin import Samples
from ntkcl.engine import rundir
from ntkcl.engine.builders import build_stream, complete_config
from ntkcl.engine.distributed import init_distributed
from ntkcl.errors import BadInputError
from ntkcl.export.constants import CONFIG_NAME
from ntkcl.presets import resolve_config
from tests._zero_shot_probe import ZeroShotProbe
from tests.conftest import TINY_BACKBONE_FLAGS, crashing_at_task

# Three generated datasets of 3, 5 and 4 classes, 8 training and 2 test images per class.
SIZES = (3, 5, 4)
MEMBERS = [
    {"dataset": "synthetic", "options": {"classes": classes, "per_class": 10, "seed": seed}}
    for seed, classes in enumerate(SIZES, start=1)
]
MEMBERS_TOML = (
    "["
    + ", ".join(
        f'{{dataset="synthetic", options={{classes={m["options"]["classes"]}, per_class=10, seed={m["options"]["seed"]}}}}}'
        for m in MEMBERS
    )
    + "]"
)


def composite_run(method: str, *extra) -> list:
    return [
        "train",
        "--stream",
        "three-synthetic",
        "--set",
        f"stream.members={MEMBERS_TOML}",
        "--method",
        method,
        *TINY_BACKBONE_FLAGS,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--num-workers",
        "0",
        "-q",
        "--json",
        *extra,
    ]


def zs_bench_run(*extra) -> list:
    """The third-party stream `zs-bench` with the zero-shot test method."""
    return [
        "train", "--stream", "zs-bench", "--method", "zero-shot-probe", *TINY_BACKBONE_FLAGS,
        "--epochs", "1", "--batch-size", "32", "--num-workers", "0", "-q", "--json", *extra,
    ]  # fmt: skip


def make_distribution(site: Path, name: str, module: str, source: str, entry_points: str) -> None:
    (site / f"{module}.py").write_text(source)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


STREAM_SOURCE = textwrap.dedent(
    """
    from ntkcl.data.composite import Member, SimilarityMixing, StreamDefinition

    members = tuple(Member("synthetic", {"classes": c, "per_class": 10, "seed": s}) for s, c in ((1, 3), (2, 5), (3, 4)))
    benchmark = StreamDefinition(
        "zs-bench", members, scenario="task-incremental", requires_zero_shot=True,
        description="three generated datasets, task-incremental, zero-shot scored",
    )
    mixed = StreamDefinition(
        "mixed-bench", members, mixing=SimilarityMixing(50, seed=3, groups={"synthetic": "generated"}),
    )
    missing = StreamDefinition("half-missing", (Member("digits"), Member("eurosat")))
    """
)
ENTRY_POINTS = (
    "[ntkcl.streams]\nzs-bench = ntkcl_zs_bench:benchmark\nmixed-bench = ntkcl_zs_bench:mixed\n"
    "half-missing = ntkcl_zs_bench:missing\n"
)


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    """A third-party stream (`zs-bench`) and the zero-shot test method, installed as distributions."""
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "ntkcl_zs_bench", "ntkcl_zs_bench", STREAM_SOURCE, ENTRY_POINTS)
    make_distribution(
        site, "ntkcl_probe", "ntkcl_probe", "from tests._zero_shot_probe import ZeroShotProbe\n",
        "[ntkcl.methods]\nzero-shot-probe = ntkcl_probe:ZeroShotProbe\n",
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    return site


def test_label_offsets_over_three_datasets(data_root):
    overrides = {"stream": {"dataset": "three-synthetic", "members": MEMBERS}, "method": {"name": "simplecil"}}
    config = complete_config(resolve_config(overrides=overrides))
    assert config.stream.class_order_seed is None and config.stream.scenario == "class-incremental"
    stream, provenance = build_stream(config, init_distributed("cpu"))
    assert stream.sizes == list(SIZES) and stream.order == list(range(12))
    tasks = stream.tasks()
    assert [t.known_classes for t in tasks] == [0, 3, 8] and [t.dataset for t in tasks] == ["synthetic"] * 3
    for task in tasks:
        train_labels = stream.train.labels[stream.train_indices(task)]
        assert (
            sorted(set(train_labels.tolist())) == list(task.classes) and len(train_labels) == 8 * task.num_new_classes
        )
        assert task.class_names == tuple(f"pattern-{c:03d}" for c in range(task.num_new_classes))
        assert task.templates == ("a photo of a {}.",)
    assert np.bincount(stream.test.labels).tolist() == [2] * 12
    assert stream.task_of_label().tolist() == [0] * 3 + [1] * 5 + [2] * 4
    record = provenance.record()
    assert [m["options"]["classes"] for m in record["members"]] == list(SIZES)
    assert len({m["manifest_sha256"] for m in record["members"]}) == 3


def test_concatenate_keeps_files_and_arrays_of_any_shape(tmp_path):
    grey = Samples(np.array([0, 1]), arrays=np.zeros((2, 8, 8), np.uint8), class_names=["a", "b"])
    colour = Samples(np.array([0]), arrays=np.ones((1, 4, 4, 3), np.uint8), class_names=["c"])
    files = Samples(np.array([0]), paths=[tmp_path / "x.jpg"], class_names=["d"])
    mixed = Samples.concatenate([grey, files, colour])
    assert mixed.labels.tolist() == [0, 1, 0, 0] and mixed.class_names == ["a", "b", "d", "c"]
    assert mixed.image(2) == tmp_path / "x.jpg" and mixed.image(3).shape == (4, 4, 3)
    assert mixed.subset([3, 0]).image(1).shape == (8, 8)
    same = Samples.concatenate([grey, grey])
    assert same.arrays.shape == (4, 8, 8) and same.paths is None


def test_task_incremental_scores_each_task_among_its_own_classes(cli, data_root, tmp_path):
    incremental = cli(*composite_run("simplecil", "--out", tmp_path / "ci"))
    assert incremental.code == 0, incremental.err
    aware = cli(*composite_run("simplecil", "--scenario", "task-incremental", "--out", tmp_path / "ti"))
    assert aware.code == 0, aware.err
    ci, ti = incremental.json()["metrics"], aware.json()["metrics"]
    assert ti["total"] == ci["total"] and ti["zero_shot_accuracy"] is None and ti["last"] is None
    # A nearest-prototype prediction that is right among all seen classes is right among its task's classes.
    for row_ci, row_ti in zip(ci["correct"], ti["correct"]):
        assert all(t >= c for c, t in zip(row_ci, row_ti))
    assert sum(map(sum, ti["correct"])) > sum(map(sum, ci["correct"]))
    run = next((tmp_path / "ti").iterdir())
    record = json.loads((run / "run.json").read_text())
    assert record["scenario"] == "task-incremental" and record["task_sizes"] == list(SIZES)
    assert run.name.startswith("three-synthetic-simplecil-")
    exported = cli("export", run, "--out", tmp_path / "export", "--json")
    assert exported.code == 0, exported.err
    card = (tmp_path / "export" / "README.md").read_text()
    assert "task-incremental, one dataset per task (synthetic, synthetic, synthetic)" in card
    document = json.loads((tmp_path / "export" / CONFIG_NAME).read_text())
    assert [m["options"]["classes"] for m in document["stream"]["members"]] == list(SIZES)


def test_zero_shot_method_gets_a_full_matrix_and_resumes_to_the_same_metrics(cli, data_root, extensions, tmp_path):
    reference = cli(*zs_bench_run("--out", tmp_path / "ref"))
    assert reference.code == 0, reference.err
    metrics = reference.json()["metrics"]
    assert len(metrics["zero_shot_accuracy"]) == 3 and all(len(row) == 3 for row in metrics["accuracy_matrix"])
    matrix = metrics["accuracy_matrix"]
    assert metrics["transfer"] == pytest.approx((matrix[0][1] + (matrix[0][2] + matrix[1][2]) / 2) / 2)
    assert metrics["last"] == pytest.approx(sum(matrix[2]) / 3)
    assert metrics["avg"] == pytest.approx(sum(sum(row) for row in matrix) / 9)

    with crashing_at_task(ZeroShotProbe, 2):
        crashed = cli(*zs_bench_run("--out", tmp_path / "crash"))
    assert crashed.code == 1
    run = next((tmp_path / "crash").iterdir())
    assert (run / rundir.ZERO_SHOT_FILE).is_file()
    assert (run / rundir.MATRIX_FILE).read_text().splitlines()[1].startswith("zero-shot,")
    resumed = cli("train", "--resume", run, "-q", "--json")
    assert resumed.code == 0, resumed.err
    for key in ("correct", "total", "zero_shot_correct", "transfer", "avg", "last"):
        assert resumed.json()["metrics"][key] == metrics[key], key
    evaluated = cli("eval", run, "--json", "-q")
    assert evaluated.code == 0, evaluated.err and evaluated.json()["matches_training"] is True


@pytest.mark.parametrize(
    ("stream", "method", "fragment"),
    [
        ("zs-bench", "simplecil", "cannot classify a task it has not trained"),
        ("mtil-order1", "finetune", "zero-shot transfer"),
        ("vtab-sim50", "simplecil", "mixes images of other tasks"),
        ("half-missing", "simplecil", "not prepared"),
    ],
)
def test_streams_a_method_cannot_run_exit_2_before_anything(
    cli, data_root, extensions, tmp_path, stream, method, fragment
):
    out = tmp_path / "runs"
    refused = cli("train", "--stream", stream, "--method", method, *TINY_BACKBONE_FLAGS, "--out", out)
    assert refused.code == 2 and refused.err.count("\n") == 1 and fragment in refused.err, refused.err
    assert not out.exists()


def test_datasets_lists_streams_and_their_missing_members(cli, data_root, extensions):
    listing = cli("datasets", "--json")
    assert listing.code == 0, listing.err
    streams = {row["name"]: row for row in listing.json()["streams"]}
    assert streams["zs-bench"]["distribution"] == "ntkcl_zs_bench" and streams["zs-bench"]["status"] == "ready"
    assert streams["zs-bench"]["classes"] == 12 and streams["zs-bench"]["zero_shot_required"]
    assert streams["half-missing"]["missing"] == ["eurosat (not prepared)"]
    assert streams["mtil-order2"]["tasks"] == 11 and streams["mtil-order2"]["classes"] == 1201
    assert streams["vtab5t-large"]["classes"] == 196 and streams["vtab-sim75"]["mixing"] == "VTAB-Sim75"
    assert [m["dataset"] for m in streams["mtil-order1"]["members"]][:3] == ["fgvc-aircraft", "caltech101", "cifar100"]
    human = cli("datasets")
    assert "mixed-bench" in human.out and "Composite streams" in human.out


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--init-classes", "2"], "--init-classes"),
        (["--set", "stream.dataset_options={classes=3}"], "stream.members[i].options"),
        (["--set", 'stream.members=[{dataset="imagenet-z"}]'], "unknown dataset 'imagenet-z'"),
        (["--stream", "digits,,synthetic"], "empty dataset name"),
    ],
)
def test_composite_bad_input_is_one_line(cli, data_root, tmp_path, flags, fragment):
    stream = [] if "--stream" in flags else ["--stream", "digits,synthetic"]
    result = cli("train", *stream, *flags, "--method", "simplecil", "--out", tmp_path)
    assert result.code == 2 and result.err.count("\n") == 1 and fragment in result.err, result.err


def test_capability_check_on_its_own():
    from ntkcl.data.composite import Member, SimilarityMixing, StreamDefinition
    from ntkcl.engine.builders import check_capabilities
    from ntkcl.methods.simplecil import SimpleCIL

    mixed = StreamDefinition("mixed", (Member("eurosat"),), mixing=SimilarityMixing(50))
    with pytest.raises(BadInputError, match="mixes images of other tasks"):
        check_capabilities(SimpleCIL, mixed, "class-incremental")
    check_capabilities(ZeroShotProbe, None, "task-incremental")


def test_sims_rule_proportions_and_determinism():
    from ntkcl.data.stream import mix_training_sets

    sizes, groups = [100, 50, 40, 30, 70], ["s", "n", "n", "s", "s"]  # VTAB5T's groups
    plan = mix_training_sets(sizes, groups, similarity=50, seed=0)
    counts = [[(source, len(indices)) for source, indices in parts] for parts in plan]
    # Task 0 keeps 50 of 100 and takes 25 from each of tasks 3 and 4; task 3 keeps 15 of 30, then 7 + 8.
    assert counts[0] == [(0, 50), (3, 25), (4, 25)] and counts[3] == [(3, 15), (0, 7), (4, 8)]
    assert counts[1] == [(1, 25), (2, 25)] and counts[2] == [(2, 20), (1, 20)]
    for parts in plan:
        for source, indices in parts:
            assert len(set(indices.tolist())) == len(indices) and indices.max() < sizes[source]
    assert [[i.tolist() for _, i in p] for p in plan] == [
        [i.tolist() for _, i in p] for p in mix_training_sets(sizes, groups, 50, seed=0)
    ]
    assert plan[0][1][1].tolist() != mix_training_sets(sizes, groups, 50, seed=1)[0][1][1].tolist()
    alone = mix_training_sets([100, 10], ["a", "a"], similarity=75, seed=0)
    assert [len(i) for _, i in alone[0]] == [25, 10]  # a source smaller than its share gives all it has
    assert [len(i) for _, i in mix_training_sets([5, 6], ["a", None], 50, 0)[1]] == [6]


def test_mixed_stream_records_its_file_list(cli, data_root, extensions, tmp_path):
    result = cli(
        "train", "--stream", "mixed-bench", "--method", "zero-shot-probe", *TINY_BACKBONE_FLAGS,
        "--epochs", "1", "--num-workers", "0", "--out", tmp_path / "runs", "-q", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    run = next((tmp_path / "runs").iterdir())
    rows = [line.split("\t") for line in (run / rundir.TRAIN_FILES_FILE).read_text().splitlines()]
    # 24, 40 and 32 training images; each task keeps half of its own and takes the rest from the other two.
    own = [(3 * 0, 3), (3, 8), (8, 12)]
    for task, (first, last) in enumerate(own):
        labels = [int(label) for t, _, _, label in rows if int(t) == task]
        assert len(labels) == [24, 40, 32][task]
        assert sum(first <= label < last for label in labels) == [12, 20, 16][task]
    record = json.loads((run / "run.json").read_text())
    assert len(record["dataset"]["train_files_sha256"]) == 64 and len(record["dataset"]["members"]) == 3
    assert rows[0][2].startswith("images.npz#")
