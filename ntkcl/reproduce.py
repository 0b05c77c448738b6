"""`ntkcl reproduce`: run the configurations behind a published table as seed groups and compare.

The rows of a table (`ntkcl.results`) that share a configuration (method, stream, backbone, `--set`) share one
seed group `OUT/<method>-<stream>[-N]/seed-K/`, so a table's Ā and A_T columns come from the same runs. A
plan lists each group's members and their state, the datasets still to prepare (with the `ntkcl prepare`
command for each) and an estimate of the time left. Running trains the groups (finished members are skipped,
started ones resumed) with the runs whose data is ready first, ordered by stream so that each dataset's files
are read by consecutive runs. The comparison gives, for every row, the published mean ± sd, ntkcl's
mean ± sample sd over the members, the difference and whether it is within the row's tolerance.

Time estimates are measured, never assumed: the wall time of this configuration's finished members in its
own group, else of finished runs of the same method, stream and backbone anywhere under OUT (the sum of their
tasks' recorded seconds), times the members left. Without such a run the estimate is unknown; the first
finished seed provides it for the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ntkcl._entry_points import DATASETS_GROUP, METHODS_GROUP, STREAMS_GROUP, entry_point_names
from ntkcl.engine import rundir
from ntkcl.engine.groups import Group, is_group, member_name
from ntkcl.errors import BadInputError
from ntkcl.files import atomic_write_text
from ntkcl.results import PublishedResult, PublishedTable, compare_row

JSON_FILE = "reproduce.json"
MARKDOWN_FILE = "reproduce.md"
REPORT_DIR = "report"
METRIC_LABELS = {
    "final_accuracy": "A_T",
    "mean_incremental_accuracy": "Ā",
    "forgetting": "forgetting",
    "backward_transfer": "BWT",
    "transfer": "Transfer",
    "avg": "Avg",
    "last": "Last",
}


@dataclass
class DatasetNeed:
    """A dataset a run reads and whether it is ready; `command` prepares it."""

    name: str
    ready: bool
    command: str | None

    def record(self) -> dict:
        return {"dataset": self.name, "ready": self.ready, "prepare": self.command}


@dataclass
class PlannedRun:
    run_id: str
    method: str
    stream: str
    backbone: str
    set: tuple[str, ...]
    rows: list[PublishedResult]
    group_dir: Path
    seeds: list[int]
    config: object | None = None  # the resolved RunConfig, when the method exists and the input is valid
    problem: str | None = None  # why it cannot run: method missing, unknown stream, bad configuration
    datasets: list[DatasetNeed] = field(default_factory=list)
    member_states: dict[int, str] = field(default_factory=dict)
    estimate_s: float | None = None
    estimate_source: str = ""
    outcome: str = "planned"

    @property
    def data_ready(self) -> bool:
        return all(need.ready for need in self.datasets)

    @property
    def runnable(self) -> bool:
        """Its method and stream exist and its configuration was not refused (its data may still be missing)."""
        return self.problem is None

    def command(self) -> str:
        """The `ntkcl train` command that makes this group by hand."""
        parts = ["ntkcl train", f"--method {self.method}", f"--stream {self.stream}", f"--backbone {self.backbone}"]
        parts += [f"--set '{assignment}'" for assignment in self.set]
        parts += [f"--seeds {','.join(map(str, self.seeds))}", f"--out {self.group_dir.parent}"]
        parts.append(f"--group {self.group_dir.name}")
        return " ".join(parts)

    def record(self) -> dict:
        return {
            "run": self.run_id,
            "method": self.method,
            "stream": self.stream,
            "backbone": self.backbone,
            "set": list(self.set),
            "group_dir": str(self.group_dir),
            "seeds": self.seeds,
            "members": {str(seed): state for seed, state in self.member_states.items()},
            "problem": self.problem,
            "datasets": [need.record() for need in self.datasets],
            "estimate_s": self.estimate_s,
            "estimate_source": self.estimate_source,
            "command": self.command(),
            "outcome": self.outcome,
            "rows": [row.key for row in self.rows],
        }


def _dataset_names(stream: str) -> list[str]:
    """The dataset plugins a stream reads: itself, or a composite stream's members."""
    if stream in entry_point_names(DATASETS_GROUP):
        return [stream]
    from ntkcl.data.registry import get_stream

    return list(dict.fromkeys(member.dataset for member in get_stream(stream).members))


def dataset_needs(stream: str, root: Path, explicit_root: bool) -> list[DatasetNeed]:
    from ntkcl.data.registry import get_dataset

    needs = []
    for name in _dataset_names(stream):
        plugin = get_dataset(name)
        ready = not plugin.needs_download or plugin.is_prepared(root)
        command = None
        if not ready:
            command = f"ntkcl prepare {name}"
            if plugin.needs_manual_file:
                wanted = next(remote for remote in plugin.files if remote.manual)
                command += f" --from /path/to/{wanted.name}"
            if explicit_root:
                command += f" --data-root {root}"
        needs.append(DatasetNeed(name, ready, command))
    return needs


def _resolve(run: PlannedRun, data_root: Path | None, gpus: list[int] | None):
    """The run's complete RunConfig: the method's preset for the stream, its backbone and `set`, this host's GPUs.

    The backbone is named only where the presets pick another one: naming it replaces the presets' backbone
    settings (a CLIP preset's normalisation, for one).
    """
    from ntkcl.config import deep_merge, parse_assignments
    from ntkcl.engine.builders import complete_config
    from ntkcl.presets import resolve_config

    overrides: dict = {"stream": {"dataset": run.stream}, "method": {"name": run.method}}
    if data_root is not None:
        overrides["stream"]["data_root"] = str(data_root)
    if gpus is not None:
        overrides["runtime"] = {"gpus": gpus, "nproc": len(gpus)}
    assigned, replaced = parse_assignments(list(run.set))
    overrides = deep_merge(overrides, assigned)
    config = complete_config(resolve_config(None, overrides, replaced))
    if config.backbone.name != run.backbone:
        overrides = deep_merge(overrides, {"backbone": {"name": run.backbone}})
        config = complete_config(resolve_config(None, overrides, replaced))
    return config


def _measured_seconds(run_dir: Path) -> float | None:
    """Wall time of a finished run: the sum of its tasks' recorded seconds."""
    metrics_file = run_dir / rundir.METRICS_FILE
    if not metrics_file.is_file() or not rundir.read_json(metrics_file).get("finished"):
        return None
    records = [rundir.read_json(path / rundir.TASK_FILE) for path in rundir.finished_checkpoints(run_dir)]
    return sum(float(record.get("seconds", 0.0)) for record in records) or None


def _same_configuration(run_dir: Path, run: PlannedRun) -> bool:
    config = rundir.read_json(run_dir / rundir.CONFIG_FILE)
    return (config["method"]["name"], config["stream"]["dataset"], config["backbone"]["name"]) == (
        run.method,
        run.stream,
        run.config.backbone.name if run.config is not None else run.backbone,
    )


def _estimate(run: PlannedRun, out: Path) -> None:
    """Seconds left for the run's unfinished members, from measured runs (see the module docstring)."""
    left = sum(1 for state in run.member_states.values() if state != "finished")
    if left == 0:
        run.estimate_s, run.estimate_source = 0.0, "all members finished"
        return
    own = [run.group_dir / member_name(seed) for seed in run.seeds]
    measured = [(path, _measured_seconds(path)) for path in own]
    measured = [(path, seconds) for path, seconds in measured if seconds]
    if not measured and out.is_dir():
        candidates = [path.parent for path in sorted(out.glob("**/" + rundir.METRICS_FILE))]
        candidates = [path for path in candidates if (path / rundir.CONFIG_FILE).is_file()]
        measured = [(path, _measured_seconds(path)) for path in candidates if _same_configuration(path, run)]
        measured = [(path, seconds) for path, seconds in measured if seconds]
    if not measured:
        run.estimate_source = "unknown: no finished run of this configuration yet (the first seed measures it)"
        return
    per_member = sum(seconds for _, seconds in measured) / len(measured)
    run.estimate_s = per_member * left
    run.estimate_source = f"measured: mean of {len(measured)} finished run(s), {per_member:.0f} s each"


@dataclass
class Plan:
    table: PublishedTable
    out: Path
    rows: list[PublishedResult]
    runs: list[PlannedRun]

    @property
    def missing_methods(self) -> list[str]:
        available = set(entry_point_names(METHODS_GROUP))
        return sorted({row.method for row in self.rows if row.method not in available})

    def datasets_to_prepare(self) -> list[DatasetNeed]:
        needs: dict[str, DatasetNeed] = {}
        for run in self.runs:
            if run.runnable:
                for need in run.datasets:
                    if not need.ready:
                        needs.setdefault(need.name, need)
        return list(needs.values())

    def estimate(self) -> tuple[float | None, int]:
        """Seconds known for the runnable runs, and how many of them have no estimate."""
        runnable = [run for run in self.runs if run.runnable]
        known = [run.estimate_s for run in runnable if run.estimate_s is not None]
        return (sum(known) if known else None), len(runnable) - len(known)

    def record(self) -> dict:
        seconds, unknown = self.estimate()
        return {
            "table": self.table.name,
            "paper": self.table.paper.citation,
            "caption": self.table.spec.caption,
            "out": str(self.out),
            "rows": len(self.rows),
            "missing_methods": self.missing_methods,
            "runs": [run.record() for run in self.runs],
            "datasets_to_prepare": [need.record() for need in self.datasets_to_prepare()],
            "estimate_s": seconds,
            "runs_without_estimate": unknown,
        }


def make_plan(
    table: PublishedTable,
    rows: list[PublishedResult],
    out: Path,
    seeds: list[int] | None = None,
    data_root: Path | None = None,
    gpus: list[int] | None = None,
) -> Plan:
    """Group the rows by configuration and check each group: method, stream, configuration, data, members."""
    from ntkcl.data.registry import default_data_root

    methods = set(entry_point_names(METHODS_GROUP))
    streams = set(entry_point_names(DATASETS_GROUP)) | set(entry_point_names(STREAMS_GROUP))
    by_configuration: dict[tuple, list[PublishedResult]] = {}
    for row in rows:
        by_configuration.setdefault(row.configuration, []).append(row)
    runs: list[PlannedRun] = []
    taken: set[str] = set()
    for (method, stream, backbone, assignments), grouped in by_configuration.items():
        base = f"{method}-{stream.replace(',', '+')}"
        run_id, suffix = base, 1
        while run_id in taken:
            suffix += 1
            run_id = f"{base}-{suffix}"
        taken.add(run_id)
        run = PlannedRun(
            run_id, method, stream, backbone, assignments, grouped, out / run_id, list(seeds or table.run_seeds)
        )
        runs.append(run)
        if method not in methods:
            run.problem = f"method {method} is not in this ntkcl (its name as the table's row would use it)"
            run.outcome = "method missing"
            continue
        if stream not in streams:
            run.problem, run.outcome = f"stream {stream} is not in this ntkcl (see `ntkcl datasets`)", "stream missing"
            continue
        run.datasets = dataset_needs(stream, data_root or default_data_root(), data_root is not None)
        try:
            run.config = _resolve(run, data_root, gpus)
        except BadInputError as error:
            # A composite stream's configuration is only complete once its members are prepared: then wait.
            if run.data_ready:
                run.problem, run.outcome = f"configuration refused: {error}", "configuration refused"
                continue
        group = Group.load(run.group_dir) if is_group(run.group_dir) else None
        for seed in run.seeds:
            run.member_states[seed] = group.member(seed).state if group else "new"
        _estimate(run, out)
    # Runs with their data first, by stream, so that consecutive runs read the same prepared files.
    runs.sort(key=lambda run: (not run.runnable, not run.data_ready, run.stream, run.method))
    return Plan(table, out, rows, runs)


def execute(plan: Plan, reporter) -> None:
    """Train every runnable group whose data is ready; the others keep the reason in `outcome`."""
    from ntkcl.engine.groups import open_group, train_group

    for run in plan.runs:
        if not run.runnable:
            continue
        if not run.data_ready:
            waiting = ", ".join(need.name for need in run.datasets if not need.ready)
            run.outcome = f"not run: prepare {waiting} first"
            continue
        reporter.message(f"{plan.table.name}: {run.run_id} (seeds {','.join(map(str, run.seeds))})")
        group = open_group(run.group_dir, run.config, run.seeds)
        train_group(group, run.config, run.seeds, reporter)
        run.member_states = {seed: group.member(seed).state for seed in run.seeds}
        run.outcome = "trained"


def compare(plan: Plan) -> list[dict]:
    """One record per published row: published and ntkcl mean ± sd, difference, verdict, run folders."""
    records = []
    for run in plan.runs:
        group = Group.load(run.group_dir) if is_group(run.group_dir) else None
        members = [group.member(seed) for seed in run.seeds] if group else []
        metrics = [member.metrics() for member in members if member.finished]
        for row in run.rows:
            record = compare_row(row, [m.get(row.metric) for m in metrics], len(run.seeds))
            if run.problem is not None:
                record["verdict"] = run.outcome
            record["run"] = run.run_id
            record["run_dirs"] = [str(member.path) for member in members if member.finished]
            records.append(record)
    return records


def _number(value: float | None, sd: float | None = None, n: int | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.2f}"
    if sd is not None:
        text += f" ± {sd:.2f}"
    if n is not None:
        text += f" (n={n})"
    return text


def comparison_lines(records: list[dict]) -> list[list[str]]:
    """Rows of the comparison table as text cells (shared by the terminal, Markdown and HTML outputs)."""
    lines = []
    for record in records:
        published = _number(record["mean"], record["sd"], record["seeds"])
        measured = _number(record["ntkcl_mean"], record["ntkcl_sd"], record["ntkcl_n"] or None)
        difference = "-" if record["difference"] is None else f"{record['difference']:+.2f}"
        lines.append(
            [
                record["method"],
                record["stream"],
                METRIC_LABELS[record["metric"]],
                published,
                measured,
                difference,
                f"{record['tolerance']:.2f}",
                record["verdict"],
            ]
        )
    return lines


COMPARISON_HEADERS = ["method", "stream", "metric", "published", "ntkcl", "difference", "tolerance", "verdict"]


def _markdown(plan: Plan, records: list[dict]) -> str:
    table = plan.table
    lines = [
        f"# {table.name}: {table.spec.table} of {table.paper.citation}",
        "",
        f"{table.spec.caption}. Published values are mean ± sd over the paper's runs (n = its seed count); ntkcl "
        "values are mean ± sample sd over the finished seeds of each group. Difference = ntkcl - published.",
        "",
        "| " + " | ".join(COMPARISON_HEADERS) + " |",
        "|" + "---|" * len(COMPARISON_HEADERS),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in comparison_lines(records)]
    lines += ["", "## Runs", ""]
    for run in plan.runs:
        details = [f"{member_name(seed)} {state}" for seed, state in run.member_states.items()]
        details += [run.problem] if run.problem else []
        lines.append(f"* `{run.group_dir}`: {'; '.join([run.outcome, *details])}")
        if run.runnable:
            lines.append(f"  `{run.command()}`")
    lines += ["", "## Sources", ""]
    lines += [f"* {record['key']}: {record['source']}" for record in records]
    return "\n".join(lines) + "\n"


def write_outputs(plan: Plan, records: list[dict]) -> dict:
    """reproduce.json, reproduce.md and the report page (groups with their comparison) in `plan.out`."""
    plan.out.mkdir(parents=True, exist_ok=True)
    document = {**plan.record(), "comparison": records}
    atomic_write_text(plan.out / JSON_FILE, json.dumps(document, indent=2, sort_keys=True) + "\n")
    atomic_write_text(plan.out / MARKDOWN_FILE, _markdown(plan, records))
    files = [str(plan.out / JSON_FILE), str(plan.out / MARKDOWN_FILE)]
    groups = [run.group_dir for run in plan.runs if any(record["run"] == run.run_id for record in records)]
    reportable = [path for path in groups if is_group(path) and _has_finished_task(Group.load(path))]
    if reportable:
        from ntkcl.report import write_report

        written = write_report(reportable, plan.out / REPORT_DIR, comparison=records)
        files.append(str(Path(written["out"]) / "index.html"))
    return {"files": files, "document": document}


def _has_finished_task(group: Group) -> bool:
    return any(member.metrics() is not None for member in group.members)
