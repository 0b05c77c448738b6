"""`ntkcl report`: pictures and a summary table of one or more runs, as PNGs and one self-contained HTML page.

For runs `RUN_DIR ...` and seed groups `GROUP_DIR ...` (finished or not: every finished task counts) it writes
into the output folder:

    index.html                      summary table (a group's numbers as mean ± sample sd over its members, with
                                    trainable parameters, wall time and epochs per task), the comparison with a
                                    published table where one matches, the plots below (embedded, so the page
                                    stands alone), and each run's accuracy matrix as numbers
    all_seen_accuracy.png           accuracy over all seen classes after each task, one line per run or group
                                    (a group's with ± 1 sd error bars); the x-axis counts tasks from 1 and says
                                    how many classes have been seen
    forgetting.png                  forgetting of each task after the last one (max earlier accuracy - final),
                                    one bar per run or group (mean ± sd) and task
    accuracy_matrix-<run>.png       heatmap of R[t][i] for each run (a group's: the mean over its members)
    phase_times-<run>.png           where each task's wall time went (data wait, forward+backward, optimizer,
                                    statistics, evaluation, checkpoints, compilation, ...), a stacked bar per
                                    task, for runs whose log.jsonl records phase times

Legends read `method / stream` (with the backbone or folder name added only where two entries share them).

Plots are drawn with matplotlib (`pip install 'ntkcl[report]'`), which nothing else needs.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ntkcl import __version__
from ntkcl.engine import rundir
from ntkcl.engine.groups import GROUP_METRICS, Group, is_group, mean_sd
from ntkcl.engine.metrics import AccuracyMatrix
from ntkcl.errors import BadInputError
from ntkcl.extras import require
from ntkcl.models.shipped import RANDOM_INIT

INDEX_FILE = "index.html"
ALL_SEEN_FILE = "all_seen_accuracy.png"
FORGETTING_FILE = "forgetting.png"
DPI = 110


@dataclass
class RunSummary:
    """What the report shows of one run."""

    path: Path
    name: str
    method: str
    stream: str
    backbone: str
    num_tasks: int  # of the stream
    matrix: AccuracyMatrix
    config: dict = field(default_factory=dict)
    task_sizes: list[int] = field(default_factory=list)
    wall_time_s: float | None = None  # the finished tasks' recorded seconds
    trainable_parameters: int | None = None  # while training the last finished task
    label: str = ""  # the legend, set once every entry is known (see `_set_labels`)

    @classmethod
    def load(cls, path: Path) -> RunSummary:
        from ntkcl.engine.run_reader import read_run_folder

        run = read_run_folder(path)  # validated: a damaged file is one line naming it, never a wrong plot
        path, metrics, record = run.path, run.metrics, run.record
        if not run.checkpoints:
            raise BadInputError(f"{path} has no finished task yet (no {rundir.METRICS_FILE})")
        config = run.config.model_dump(mode="json")
        matrix = AccuracyMatrix(
            metrics["correct"], metrics["total"], metrics.get("zero_shot_correct"), metrics.get("zero_shot_total")
        )
        tasks = run.task_records
        return cls(
            path=path,
            name=path.name,
            method=config["method"]["name"],
            stream=config["stream"]["dataset"],
            backbone=record["backbone"]["name"]
            + ("" if record["backbone"].get("pretrained", True) else f" ({RANDOM_INIT})"),
            num_tasks=len(record["task_sizes"]),
            matrix=matrix,
            config=config,
            task_sizes=list(record["task_sizes"]),
            wall_time_s=sum(float(task.get("seconds", 0.0)) for task in tasks) if tasks else None,
            trainable_parameters=tasks[-1].get("trainable_parameters") if tasks else None,
        )

    @property
    def heatmap_file(self) -> str:
        return f"accuracy_matrix-{self.name}.png"

    @property
    def seeds(self) -> int:
        return 1

    @property
    def finished_tasks(self) -> int:
        return self.matrix.num_tasks

    def metric(self, key: str) -> dict:
        """The metric as {"mean", "sd", "n"} (one run: no sd), so runs and groups print alike."""
        return mean_sd([self.matrix.summary()[key]])

    def curve(self) -> list[dict]:
        return [mean_sd([value]) for value in self.matrix.all_seen_accuracy()]

    def forgetting_bars(self) -> list[dict] | None:
        drops = self.matrix.forgetting_per_task()
        return None if drops is None else [mean_sd([value]) for value in drops]

    def mean_matrix(self) -> list[list[float | None]]:
        return self.matrix.matrix()

    def epochs_per_task(self) -> str:
        optim = self.config.get("optim", {})
        task_epochs = optim.get("task_epochs")
        return ",".join(map(str, task_epochs)) if task_epochs else str(optim.get("epochs", "-"))

    def row(self) -> dict:
        """The summary table's columns (accuracies in %)."""
        matrix = self.matrix
        return {
            "run": self.name,
            "label": self.label,
            "method": self.method,
            "stream": self.stream,
            "backbone": self.backbone,
            "seeds": self.seeds,
            "tasks": f"{self.finished_tasks}/{self.num_tasks}",
            "final_accuracy": matrix.final_accuracy(),
            "mean_incremental_accuracy": matrix.mean_incremental_accuracy(),
            "forgetting": matrix.forgetting(),
            "backward_transfer": matrix.backward_transfer(),
            "transfer": matrix.transfer(),
            "avg": matrix.average(),
            "last": matrix.last(),
            "trainable_parameters": self.trainable_parameters,
            "wall_time_s": self.wall_time_s,
            "epochs_per_task": self.epochs_per_task(),
        }


@dataclass
class GroupSummary:
    """A seed group: its members with a finished task, shown as mean ± sample sd."""

    path: Path
    name: str
    members: list[RunSummary]
    label: str = ""

    @classmethod
    def load(cls, path: Path) -> GroupSummary:
        group = Group.load(path)
        members = [RunSummary.load(member.path) for member in group.members if member.metrics() is not None]
        if not members:
            raise BadInputError(f"group {path} has no member with a finished task yet")
        return cls(path=path, name=path.name, members=members)

    def __getattr__(self, name: str):
        # What members share (method, stream, backbone, config, task sizes) is read from the first one.
        if name in ("method", "stream", "backbone", "config", "task_sizes", "num_tasks", "epochs_per_task"):
            return getattr(self.members[0], name)
        raise AttributeError(name)

    @property
    def heatmap_file(self) -> str:
        return f"accuracy_matrix-{self.name}.png"

    @property
    def seeds(self) -> int:
        return len(self.members)

    @property
    def finished_tasks(self) -> int:
        return min(member.finished_tasks for member in self.members)

    def metric(self, key: str) -> dict:
        return mean_sd([member.matrix.summary()[key] for member in self.members])

    def curve(self) -> list[dict]:
        curves = [member.matrix.all_seen_accuracy() for member in self.members]
        return [mean_sd([curve[t] for curve in curves if t < len(curve)]) for t in range(max(map(len, curves)))]

    def forgetting_bars(self) -> list[dict] | None:
        drops = [member.matrix.forgetting_per_task() for member in self.members]
        drops = [values for values in drops if values is not None]
        if not drops:
            return None
        return [mean_sd([values[i] for values in drops if i < len(values)]) for i in range(max(map(len, drops)))]

    def mean_matrix(self) -> list[list[float | None]]:
        """R[t][i] averaged over the members that evaluated it (members share the task layout)."""
        matrices = [member.matrix.matrix() for member in self.members]
        rows = max(len(matrix) for matrix in matrices)
        width = max(len(matrix[0]) for matrix in matrices)
        return [
            [mean_sd([m[t][i] for m in matrices if t < len(m) and i < len(m[t])])["mean"] for i in range(width)]
            for t in range(rows)
        ]

    def row(self) -> dict:
        walls = [member.wall_time_s for member in self.members]
        return {
            "run": self.name,
            "label": self.label,
            "method": self.method,
            "stream": self.stream,
            "backbone": self.backbone,
            "seeds": self.seeds,
            "tasks": f"{self.finished_tasks}/{self.num_tasks}",
            **{key: self.metric(key) for key in GROUP_METRICS},
            "trainable_parameters": self.members[-1].trainable_parameters,
            "wall_time_s": mean_sd(walls),
            "epochs_per_task": self.epochs_per_task(),
            "members": [member.name for member in self.members],
        }


def load_entry(path: Path) -> RunSummary | GroupSummary:
    """A run directory or a seed group folder."""
    return GroupSummary.load(path) if is_group(path) else RunSummary.load(path)


def _set_labels(entries: list) -> None:
    """Legends by method and stream; the backbone, then the folder name, only where they are needed to tell apart."""
    for entry in entries:
        entry.label = f"{entry.method} / {entry.stream}"
    for extra in (lambda entry: entry.backbone, lambda entry: entry.name):
        clashes: dict[str, list] = {}
        for entry in entries:
            clashes.setdefault(entry.label, []).append(entry)
        for same in clashes.values():
            if len(same) > 1 and len({extra(entry) for entry in same}) > 1:
                for entry in same:
                    entry.label = f"{entry.label} ({extra(entry)})"
    for entry in entries:
        if isinstance(entry, GroupSummary):
            entry.label += f", {entry.seeds} seeds"


def _pyplot_free_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot state, no display needed)."""
    return require("matplotlib.figure").Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def draw_heatmap(run: RunSummary | GroupSummary, path: Path) -> None:
    """R[t][i] as a heatmap with the value in each cell; blank where a task was not evaluated."""
    values = np.array([[np.nan if v is None else v for v in row] for row in run.mean_matrix()], dtype=float)
    rows, columns = values.shape
    figure = _pyplot_free_figure(max(4.0, 0.6 * columns + 2.4), max(3.0, 0.5 * rows + 1.8))
    axes = figure.subplots()
    image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    if rows * columns <= 400:  # numbers stay legible up to 20 x 20
        for t in range(rows):
            for i in range(columns):
                if not np.isnan(values[t, i]):
                    shade = "black" if values[t, i] > 60 else "white"
                    axes.text(i, t, f"{values[t, i]:.1f}", ha="center", va="center", fontsize=8, color=shade)
    # Tasks are counted from 1 everywhere in the report.
    axes.set_xticks(range(columns), [str(i + 1) for i in range(columns)])
    axes.set_yticks(range(rows), [str(t + 1) for t in range(rows)])
    axes.set_xlabel("evaluated task")
    axes.set_ylabel("after training task")
    mean = f", mean of {run.seeds} seeds" if isinstance(run, GroupSummary) else ""
    axes.set_title(f"{run.label}: accuracy matrix{mean}", fontsize=10)
    figure.savefig(path)


def _task_ticks(axes, entries: list) -> None:
    """x ticks at tasks 1..T with the classes seen after each (from the entry with the most tasks)."""
    longest = max(entries, key=lambda entry: len(entry.curve()))
    steps = len(longest.curve())
    seen = np.cumsum(longest.task_sizes)[:steps]
    every = max(1, steps // 20)  # at most about 20 labels
    ticks = list(range(1, steps + 1, every))
    axes.set_xticks(ticks, [f"{t}\n{seen[t - 1]}" for t in ticks])
    axes.set_xlabel("tasks trained (top) and classes seen (bottom)")


def draw_all_seen(runs: list, path: Path) -> None:
    """Accuracy over all seen classes after each task, one line per run or group (± 1 sd error bars)."""
    figure = _pyplot_free_figure(7.0, 4.2)
    axes = figure.subplots()
    for run in runs:
        curve = run.curve()
        steps = range(1, len(curve) + 1)
        means = [point["mean"] for point in curve]
        sds = [point["sd"] or 0.0 for point in curve]
        if isinstance(run, GroupSummary):
            axes.errorbar(steps, means, yerr=sds, marker="o", capsize=3, label=run.label)
        else:
            axes.plot(steps, means, marker="o", label=run.label)
    axes.set_ylabel("accuracy on all seen classes (%)")
    axes.set_ylim(0, 100)
    _task_ticks(axes, runs)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower left")
    figure.savefig(path)


def draw_forgetting(runs: list, path: Path) -> None:
    """Forgetting of each task i < L after the last task, grouped by task, one bar per run or group."""
    figure = _pyplot_free_figure(7.0, 4.2)
    axes = figure.subplots()
    width = 0.8 / len(runs)
    drawn = False
    for index, run in enumerate(runs):
        bars = run.forgetting_bars()
        if bars is None:
            continue
        positions = np.arange(len(bars)) + 1 + (index - (len(runs) - 1) / 2) * width
        errors = [bar["sd"] or 0.0 for bar in bars] if isinstance(run, GroupSummary) else None
        axes.bar(positions, [bar["mean"] for bar in bars], width=width, yerr=errors, capsize=2, label=run.label)
        drawn = True
    axes.axhline(0, color="black", linewidth=0.8)
    tasks = max((run.finished_tasks - 1 for run in runs), default=0)
    axes.set_xticks(range(1, tasks + 1), [str(i) for i in range(1, tasks + 1)])
    axes.set_xlabel("task (after the last task trained)")
    axes.set_ylabel("forgetting (percentage points)")
    axes.grid(axis="y", alpha=0.3)
    if drawn:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "forgetting needs two finished tasks", ha="center", va="center", transform=axes.transAxes)
    figure.savefig(path)


def phase_times_file(run: RunSummary) -> str:
    return f"phase_times-{run.name}.png"


def task_phase_times(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    """(task, seconds per phase) of each finished task from log.jsonl's `task_end` records (the last one of
    a task that was logged again after a resume); empty for runs written before phases were recorded."""
    log = run_dir / rundir.LOG_FILE
    if not log.is_file():
        return []
    latest: dict[int, dict[str, float]] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("event") == "task_end" and isinstance(record.get("phases"), dict):
            latest[int(record["task"])] = {key: float(value) for key, value in record["phases"].items()}
    return sorted(latest.items())


def draw_phase_times(run: RunSummary, tasks: list[tuple[int, dict[str, float]]], path: Path) -> None:
    """A stacked bar of seconds per phase for each task of `run`."""
    figure = _pyplot_free_figure(max(5.0, 0.45 * len(tasks) + 3.5), 4.2)
    axes = figure.subplots()
    names = list(dict.fromkeys(name for _, phases in tasks for name in phases))
    bottom = np.zeros(len(tasks))
    positions = [task for task, _ in tasks]
    for name in names:
        seconds = np.array([phases.get(name, 0.0) for _, phases in tasks])
        if seconds.any():
            axes.bar(positions, seconds, bottom=bottom, label=name.replace("_", " "))
            bottom += seconds
    axes.set_xticks(positions, [f"T{task}" for task in positions])
    axes.set_xlabel("task")
    axes.set_ylabel("seconds")
    axes.set_title(f"{run.method} on {run.stream}: time per phase", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path)


def _percent(value: float | dict | None) -> str:
    """A number, or a {"mean", "sd", "n"} as `mean ± sd`."""
    if isinstance(value, dict):
        if value["mean"] is None:
            return "-"
        return f"{value['mean']:.2f}" + ("" if value["sd"] is None else f" ± {value['sd']:.2f}")
    return "-" if value is None else f"{value:.2f}"


def _seconds(value: float | dict | None) -> str:
    if isinstance(value, dict):
        if value["mean"] is None:
            return "-"
        return f"{value['mean']:.0f}" + ("" if value["sd"] is None else f" ± {value['sd']:.0f}")
    return "-" if value is None else f"{value:.0f}"


def _image(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


MTIL_COLUMNS = (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last"))


def _summary_table(runs: list) -> str:
    rows = [run.row() for run in runs]
    # MTIL's columns appear only where a task-incremental run defines them.
    mtil = [(key, name) for key, name in MTIL_COLUMNS if any(_percent(row[key]) != "-" for row in rows)]
    headers = ["run", "method / stream", "backbone", "seeds", "tasks", "A_T", "mean incremental", "forgetting", "BWT"]
    headers += [name for _, name in mtil] + ["trainable parameters", "wall time (s)", "epochs per task"]
    lines = ["<table>", "<tr>" + "".join(f"<th>{name}</th>" for name in headers) + "</tr>"]
    for row in rows:
        text = [row["run"], row["label"], row["backbone"], str(row["seeds"]), row["tasks"]]
        keys = ["final_accuracy", "mean_incremental_accuracy", "forgetting", "backward_transfer"]
        numbers = [_percent(row[key]) for key in keys + [key for key, _ in mtil]]
        parameters = row["trainable_parameters"]
        numbers += [
            "-" if parameters is None else f"{parameters:,}",
            _seconds(row["wall_time_s"]),
            row["epochs_per_task"],
        ]
        cells = [f"<td>{html.escape(value)}</td>" for value in text]
        cells += [f'<td class="number">{html.escape(value)}</td>' for value in numbers]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _matrix_table(run) -> str:
    matrix = run.mean_matrix()
    header = "<tr><th>after task</th>" + "".join(f"<th>{i + 1}</th>" for i in range(len(matrix[0]))) + "</tr>"
    body = [
        f"<tr><td>{t + 1}</td>" + "".join(f'<td class="number">{_percent(value)}</td>' for value in row) + "</tr>"
        for t, row in enumerate(matrix)
    ]
    return "\n".join(["<table>", header, *body, "</table>"])


def matching_comparison(runs: list) -> list[dict]:
    """Each packaged published row whose configuration one of the runs or groups has, compared with it."""
    from ntkcl.results import compare_row, load_tables, matches_config

    records = []
    for table in load_tables().values():
        for row in table.results():
            for run in runs:
                members = run.members if isinstance(run, GroupSummary) else [run]
                if not matches_config(row, run.config):
                    continue
                finished = [member for member in members if member.finished_tasks == member.num_tasks]
                values = [member.matrix.summary()[row.metric] for member in finished]
                records.append({**compare_row(row, values, len(finished) or 1), "run": run.name})
    return records


def _comparison_table(records: list[dict]) -> str:
    from ntkcl.reproduce import COMPARISON_HEADERS, comparison_lines

    lines = ["<table>", "<tr>" + "".join(f"<th>{name}</th>" for name in ["run", *COMPARISON_HEADERS]) + "</tr>"]
    for record, cells in zip(records, comparison_lines(records)):
        lines.append("<tr>" + "".join(f"<td>{html.escape(value)}</td>" for value in [record["run"], *cells]) + "</tr>")
    lines.append("</table>")
    sources = "".join(f"<li>{html.escape(record['key'])}: {html.escape(record['source'])}</li>" for record in records)
    return "\n".join(lines) + f'\n<ul class="muted">{sources}</ul>'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.muted { color: #666; font-size: 0.85em; }
"""


def write_page(runs: list, out: Path, comparison: list[dict] | None = None) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>ntkcl report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>ntkcl report</h1>",
        f'<p class="muted">{len(runs)} run(s) or seed group(s), written {stamp} by ntkcl {html.escape(__version__)}. '
        "Accuracies in %; A_T is the accuracy on all seen classes after the last finished task; a group's values "
        "are mean ± sample sd over its members. Tasks are counted from 1.</p>",
        "<h2>Summary</h2>",
        _summary_table(runs),
    ]
    if comparison:
        sections += ["<h2>Published results</h2>", _comparison_table(comparison)]
    sections += [
        "<h2>Accuracy on all seen classes</h2>",
        _image(out / ALL_SEEN_FILE, "accuracy on all seen classes after each task"),
        "<h2>Forgetting per task</h2>",
        _image(out / FORGETTING_FILE, "forgetting of each task after the last task"),
    ]
    for run in runs:
        sections += [
            f"<h2>{html.escape(run.label)}: {html.escape(run.name)}</h2>",
            f'<p class="muted">{html.escape(str(run.path))}</p>',
            _image(out / run.heatmap_file, f"accuracy matrix of {run.name}"),
            _matrix_table(run),
        ]
        if task_phase_times(run.path):
            sections.append(_image(out / phase_times_file(run), f"time per phase of each task of {run.name}"))
    diagnosed = [(run, document) for run in runs if (document := load_diagnostics(run)) is not None]
    if diagnosed:
        sections.append("<h2>Diagnostics</h2>")
        for run, document in diagnosed:
            sections += diagnostics_section(run, document, out)
    sections.append("</body></html>")
    (out / INDEX_FILE).write_text("\n".join(sections) + "\n", encoding="utf-8")


def write_report(run_dirs: list[Path], out: Path, comparison: list[dict] | None = None) -> dict:
    """Draw the PNGs and write index.html for `run_dirs` (runs or seed groups) into `out`; returns what was written.

    Args:
        run_dirs: run directories and group folders.
        out: the report folder.
        comparison: published-vs-ntkcl records to show (`ntkcl reproduce` passes its own); by default every
            packaged published row whose configuration one of the entries has.
    """
    runs = [load_entry(Path(path)) for path in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise BadInputError("two run directories share a name; pass each run once")
    _set_labels(runs)
    if comparison is None:
        comparison = matching_comparison(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"cannot create report folder {out}: {error.strerror or error}") from error
    phase_files = []
    for run in runs:
        draw_heatmap(run, out / run.heatmap_file)
        tasks = task_phase_times(run.path)
        if tasks:
            draw_phase_times(run, tasks, out / phase_times_file(run))
            phase_files.append(phase_times_file(run))
    draw_all_seen(runs, out / ALL_SEEN_FILE)
    draw_forgetting(runs, out / FORGETTING_FILE)
    diagnostic_files = []
    for run in runs:
        document = load_diagnostics(run)
        if document is not None:
            diagnostic_files += draw_diagnostics(run, document, out)
    write_page(runs, out, comparison)
    files = [
        INDEX_FILE,
        ALL_SEEN_FILE,
        FORGETTING_FILE,
        *(run.heatmap_file for run in runs),
        *phase_files,
        *diagnostic_files,
    ]
    return {
        "out": str(out),
        "files": [str(out / name) for name in files],
        "runs": [run.row() for run in runs],
        "comparison": comparison,
    }


# ----------------------------------------------------------------------------------------------- diagnostics
def load_diagnostics(run: RunSummary) -> dict | None:
    """The run's diagnostics.json (`ntkcl diagnose`), or None when it has none."""
    from ntkcl.diagnostics.run import DIAGNOSTICS_FILE, KIND

    path = run.path / DIAGNOSTICS_FILE
    if not path.is_file():
        return None
    document = rundir.read_json(path)
    if document.get("kind") != KIND:
        raise BadInputError(f"{path} was not written by ntkcl diagnose")
    return document


def diagnostics_files(run: RunSummary) -> dict[str, str]:
    names = ("ntk_blocks", "ntk_drift", "subspace_angles", "generalisation_gap")
    return {name: f"{name}-{run.name}.png" for name in names}


def _matrix_axes(axes, values: np.ndarray, title: str, vmin: float, vmax: float, cmap: str = "magma"):
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax)
    size = len(values)
    if size <= 12:
        for i in range(size):
            for j in range(size):
                if not np.isnan(values[i, j]):
                    axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color="grey")
    axes.set_xticks(range(size), [f"T{j}" for j in range(size)])
    axes.set_yticks(range(size), [f"T{i}" for i in range(size)])
    axes.set_title(title, fontsize=9)
    return image


def _as_array(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if value is None else value for value in row] for row in rows], dtype=float)


def draw_diagnostics(run: RunSummary, document: dict, out: Path) -> list[str]:
    """The cross-task NTK heatmap after each task, the kernel drift, the subspace angles and the gap bars."""
    files = diagnostics_files(run)
    steps = document["ntk"]
    columns = min(len(steps), 4)
    rows = -(-len(steps) // columns)
    figure = _pyplot_free_figure(2.6 * columns + 1.0, 2.5 * rows + 0.6)
    grid = figure.subplots(rows, columns, squeeze=False)
    image = None
    for position, axes in enumerate(grid.flat):
        if position >= len(steps):
            axes.set_axis_off()
            continue
        step = steps[position]
        image = _matrix_axes(axes, _as_array(step["block_norms"]), f"after task {step['after_task']}", 0, 1)
    figure.colorbar(image, ax=grid, label="‖Θ_ij‖ / sqrt(‖Θ_ii‖ ‖Θ_jj‖)")
    figure.savefig(out / files["ntk_blocks"])

    figure = _pyplot_free_figure(6.0, 3.8)
    axes = figure.subplots()
    later = [step for step in steps if step["drift_from_previous"] is not None]
    for task in range(len(steps[-1]["block_norms"]) - 1):
        points = [
            (s["after_task"], s["drift_from_previous"][task]) for s in later if task < len(s["drift_from_previous"])
        ]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            axes.plot(*zip(*points), marker="o", label=f"T{task}")
    axes.set_xlabel("after training task")
    axes.set_ylabel("kernel drift of task block (1 − CKA)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(out / files["ntk_drift"])

    orthogonality = document["feature_orthogonality"]
    figure = _pyplot_free_figure(4.6, 3.8)
    axes = figure.subplots()
    image = _matrix_axes(axes, _as_array(orthogonality["mean_angle_deg"]), "mean principal angle (°)", 0, 90, "viridis")
    figure.colorbar(image, ax=axes, label="degrees")
    figure.savefig(out / files["subspace_angles"])

    figure = _pyplot_free_figure(6.0, 3.8)
    axes = figure.subplots()
    gaps = document["generalisation_gap"]
    positions = np.arange(len(gaps))
    for offset, key, label in (
        (-0.2, "after_own_task", "after its task"),
        (0.2, "after_last_task", "after the last task"),
    ):
        values = [np.nan if gap[key] is None else gap[key]["gap"] for gap in gaps]
        axes.bar(positions + offset, values, width=0.4, label=label)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(positions, [f"T{gap['task']}" for gap in gaps])
    axes.set_ylabel("train − test accuracy on the probe (points)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(out / files["generalisation_gap"])
    return list(files.values())


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _retrieval_table(retrieval: dict) -> str:
    headers = ["task", "cluster", "images", "δ", "κ", "σ²", "threshold", "δ > threshold", "retrieval (%)"]
    lines = ["<table>", "<tr>" + "".join(f"<th>{name}</th>" for name in headers) + "</tr>"]
    for cluster in retrieval["clusters"]:
        values = [
            str(cluster["task"]),
            str(cluster["cluster"]),
            str(cluster["images"]),
            _number(cluster["delta"]),
            _number(cluster["kappa"]),
            _number(cluster["sigma_squared"]),
            _number(cluster["threshold"]),
            "yes" if cluster["satisfied"] else "no",
            _number(cluster["retrieval_accuracy"], 1),
        ]
        lines.append("<tr>" + "".join(f'<td class="number">{value}</td>' for value in values) + "</tr>")
    lines.append("</table>")
    accuracy = ", ".join(f"T{t} {_number(v, 1)}" for t, v in enumerate(retrieval["test_retrieval_accuracy"]))
    lines.append(f'<p class="muted">Retrieval accuracy on the test probe (%): {accuracy}</p>')
    return "\n".join(lines)


def diagnostics_section(run: RunSummary, document: dict, out: Path) -> list[str]:
    """HTML of a run's Diagnostics section (plots drawn by `draw_diagnostics`)."""
    files = diagnostics_files(run)
    probe = document["probe"]
    kernel = document["kernel"]
    seconds = np.mean([step["seconds_per_probe_image"] for step in document["ntk"]])
    parts = [
        f"<h3>Diagnostics of {html.escape(run.name)}</h3>",
        f'<p class="muted">{probe["per_task"]} test and {probe["per_task"]} training images per task (seed '
        f"{probe['seed']}); empirical NTK of {len(kernel['tuned_parameters'])} tuned tensors, outputs: "
        f"{html.escape(kernel['outputs'])}, {html.escape(kernel['reduction'])}; {seconds:.3f} s per probe image "
        f"on {html.escape(document['device'])}.</p>",
        _image(out / files["ntk_blocks"], "normalised cross-task NTK block norms after each task"),
        _image(out / files["ntk_drift"], "kernel drift of old tasks between consecutive tasks"),
        _image(out / files["subspace_angles"], "mean principal angle between task feature subspaces"),
        _image(out / files["generalisation_gap"], "train minus test accuracy per task"),
    ]
    orthogonality = document["feature_orthogonality"]
    parts.append(
        f'<p class="muted">Mean cosine between class prototypes of different tasks: '
        f"{_number(orthogonality['prototype_cosine_between_tasks'])}.</p>"
    )
    if "retrieval" in document:
        parts.append(_retrieval_table(document["retrieval"]))
    return parts
