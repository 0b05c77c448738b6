"""Seed groups on the command line: `ntkcl train --seeds`, and the mean ± sd tables `train`, `eval` and `report`
print for a group folder."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ntkcl.cli import _common
from ntkcl.errors import BadInputError


def default_group_name(config) -> str:
    """`<stream>-<method>`: the same command finds its group again; another configuration needs `--group`."""
    return f"{config.stream.dataset.replace(',', '+')}-{config.method.name}"


def check_group_name(name: str) -> str:
    if not name.strip() or "/" in name or "\\" in name or name in (".", ".."):
        raise BadInputError(f"--group must be a plain folder name, got {name!r}")
    return name


def summary_table(summary: dict, title: str) -> Table:
    """One row per metric: mean ± sample sd and the number of members it is over."""
    from ntkcl.engine.groups import GROUP_METRICS, METRIC_LABELS

    table = Table(title=title, title_justify="left")
    for name, justify in (("metric", "left"), ("mean", "right"), ("sd", "right"), ("n", "right")):
        table.add_column(name, justify=justify)
    for key in GROUP_METRICS:
        value = summary[key]
        if value["n"] == 0:
            continue
        sd = "-" if value["sd"] is None else f"{value['sd']:.2f}"
        table.add_row(METRIC_LABELS[key], f"{value['mean']:.2f}", sd, str(value["n"]))
    return table


def curve_line(summary: dict) -> str:
    steps = summary["all_seen_accuracy"]
    from ntkcl.engine.groups import format_mean_sd

    return "all-seen accuracy after task " + ", ".join(
        f"{t + 1}: {format_mean_sd(value)}" for t, value in enumerate(steps)
    )


def print_group(result: dict, title: str) -> None:
    members = result["members"]
    for seed, metrics in members.items():
        if metrics is None:
            state = "no finished task"
        else:
            state = f"A_T {metrics['final_accuracy']:.2f} after {metrics['num_tasks']} task(s)"
            state += "" if metrics["finished"] else " (unfinished)"
        _common.stdout.print(f"seed {seed}: {state}", highlight=False)
    _common.stdout.print(summary_table(result["summary"], title))


def train_seed_group(config, seeds: list[int], group_dir: Path, quiet: bool, json_output: bool) -> None:
    """Open (or join) the group at `group_dir`, train the members of `seeds`, print the group's metrics."""
    from ntkcl.engine.groups import group_metrics, open_group, train_group
    from ntkcl.engine.progress import Reporter

    group = open_group(group_dir, config, seeds)
    reporter = Reporter(enabled=not quiet)
    try:
        outcomes = train_group(group, config, seeds, reporter)
    except KeyboardInterrupt:
        _common.fail(f"interrupted; finished tasks are saved; run the same command again to continue {group_dir}", 130)
    result = group_metrics(group, seeds)
    result["runs"] = outcomes
    if json_output:
        _common.emit(result)
        return
    title = f"{config.stream.dataset} / {config.method.name}: seeds {','.join(map(str, seeds))}, mean ± sample sd"
    print_group(result, title)
    _common.stdout.print(f"group folder: {group_dir}", highlight=False)


def evaluate_group(path: Path, data_root: Path | None, quiet: bool, json_output: bool) -> None:
    """Recompute every member with a finished task from its checkpoints; summarise the recomputed metrics."""
    from ntkcl.engine import rundir
    from ntkcl.engine.evaluate import evaluate_run
    from ntkcl.engine.groups import GROUP_METRICS, Group, summarize
    from ntkcl.engine.progress import Reporter

    group = Group.load(path)
    reporter = Reporter(enabled=not quiet)
    members, recomputed, comparisons = {}, [], {}
    for member in group.members:
        if member.metrics() is None:
            members[str(member.seed)] = None
            continue
        result = evaluate_run(member.path, data_root, reporter)
        metrics = result["metrics"]
        recomputed.append(metrics)
        comparisons[str(member.seed)] = result["training_metrics"]
        members[str(member.seed)] = {
            "run_dir": str(member.path),
            "finished": metrics["num_tasks"] == len(rundir.read_json(member.path / rundir.RUN_FILE)["task_sizes"]),
            "num_tasks": metrics["num_tasks"],
            **{key: metrics.get(key) for key in GROUP_METRICS},
        }
    if not recomputed:
        raise BadInputError(f"group {path} has no member with a finished task yet")
    result = {
        "group": str(path),
        "seeds": group.seeds,
        "members": members,
        "training_metrics": comparisons,
        "summary": summarize(recomputed),
    }
    if json_output:
        _common.emit(result)
        return
    print_group(result, f"{path.name}: recomputed from checkpoints, mean ± sample sd")
    differing = [seed for seed, verdict in comparisons.items() if verdict == "different"]
    if differing:
        _common.stdout.print(f"seeds whose recomputed matrix DIFFERS from training: {', '.join(differing)}")
