"""`ntkcl report`: pictures and a summary table of one or more runs, as PNGs and one self-contained HTML page.

For runs `RUN_DIR ...` (finished or not: every finished task counts) it writes into the output folder:

    index.html                      summary table, the plots below (embedded, so the page stands alone), and each
                                    run's accuracy matrix as numbers
    all_seen_accuracy.png           accuracy over all seen classes after each task, one line per run
    forgetting.png                  forgetting of each task after the last one (max earlier accuracy - final),
                                    one bar per run and task
    accuracy_matrix-<run>.png       heatmap of R[t][i] for each run

Plots are drawn with matplotlib (`pip install 'ntkcl[report]'`), which nothing else needs.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ntkcl import __version__
from ntkcl.engine import rundir
from ntkcl.engine.metrics import AccuracyMatrix
from ntkcl.errors import BadInputError
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

    @classmethod
    def load(cls, path: Path) -> RunSummary:
        path = rundir.check_run_dir(path)
        metrics_file = path / rundir.METRICS_FILE
        if not metrics_file.is_file():
            raise BadInputError(f"{path} has no finished task yet (no {rundir.METRICS_FILE})")
        metrics = rundir.read_json(metrics_file)
        config = rundir.read_json(path / rundir.CONFIG_FILE)
        record = rundir.read_json(path / rundir.RUN_FILE)
        matrix = AccuracyMatrix(
            metrics["correct"], metrics["total"], metrics.get("zero_shot_correct"), metrics.get("zero_shot_total")
        )
        return cls(
            path=path,
            name=path.name,
            method=config["method"]["name"],
            stream=config["stream"]["dataset"],
            backbone=record["backbone"]["name"]
            + ("" if record["backbone"].get("pretrained", True) else f" ({RANDOM_INIT})"),
            num_tasks=len(record["task_sizes"]),
            matrix=matrix,
        )

    @property
    def heatmap_file(self) -> str:
        return f"accuracy_matrix-{self.name}.png"

    def row(self) -> dict:
        """The summary table's columns (accuracies in %)."""
        matrix = self.matrix
        return {
            "run": self.name,
            "method": self.method,
            "stream": self.stream,
            "backbone": self.backbone,
            "tasks": f"{matrix.num_tasks}/{self.num_tasks}",
            "final_accuracy": matrix.final_accuracy(),
            "mean_incremental_accuracy": matrix.mean_incremental_accuracy(),
            "forgetting": matrix.forgetting(),
            "backward_transfer": matrix.backward_transfer(),
        }


def _pyplot_free_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot state, no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise BadInputError("ntkcl report draws with matplotlib: pip install 'ntkcl[report]'") from error
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def draw_heatmap(run: RunSummary, path: Path) -> None:
    """R[t][i] as a heatmap with the value in each cell; blank where a task was not evaluated."""
    values = np.array([[np.nan if v is None else v for v in row] for row in run.matrix.matrix()], dtype=float)
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
    axes.set_xticks(range(columns), [f"T{i}" for i in range(columns)])
    axes.set_yticks(range(rows), [str(t) for t in range(rows)])
    axes.set_xlabel("evaluated task i")
    axes.set_ylabel("after training task t")
    axes.set_title(f"{run.method} on {run.stream}: R[t][i]", fontsize=10)
    figure.savefig(path)


def draw_all_seen(runs: list[RunSummary], path: Path) -> None:
    """Accuracy over all seen classes after each task, one line per run."""
    figure = _pyplot_free_figure(7.0, 4.2)
    axes = figure.subplots()
    for run in runs:
        curve = run.matrix.all_seen_accuracy()
        axes.plot(range(1, len(curve) + 1), curve, marker="o", label=run.name)
    axes.set_xlabel("tasks trained")
    axes.set_ylabel("accuracy on all seen classes (%)")
    axes.set_ylim(0, 100)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower left")
    figure.savefig(path)


def draw_forgetting(runs: list[RunSummary], path: Path) -> None:
    """Forgetting of each task i < L after the last task, grouped by task, one bar per run."""
    figure = _pyplot_free_figure(7.0, 4.2)
    axes = figure.subplots()
    width = 0.8 / len(runs)
    drawn = False
    for index, run in enumerate(runs):
        drops = run.matrix.forgetting_per_task()
        if drops is None:
            continue
        positions = np.arange(len(drops)) + (index - (len(runs) - 1) / 2) * width
        axes.bar(positions, drops, width=width, label=run.name)
        drawn = True
    axes.axhline(0, color="black", linewidth=0.8)
    tasks = max((run.matrix.num_tasks - 1 for run in runs), default=0)
    axes.set_xticks(range(tasks), [f"T{i}" for i in range(tasks)])
    axes.set_xlabel("task (after the last task trained)")
    axes.set_ylabel("forgetting (percentage points)")
    axes.grid(axis="y", alpha=0.3)
    if drawn:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "forgetting needs two finished tasks", ha="center", va="center", transform=axes.transAxes)
    figure.savefig(path)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _image(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


def _summary_table(runs: list[RunSummary]) -> str:
    headers = ["run", "method", "stream", "backbone", "tasks", "A_T", "mean incremental", "forgetting", "BWT"]
    lines = ["<table>", "<tr>" + "".join(f"<th>{name}</th>" for name in headers) + "</tr>"]
    for run in runs:
        row = run.row()
        text = [row["run"], row["method"], row["stream"], row["backbone"], row["tasks"]]
        numbers = [row[key] for key in ("final_accuracy", "mean_incremental_accuracy", "forgetting")]
        numbers.append(row["backward_transfer"])
        cells = [f"<td>{html.escape(value)}</td>" for value in text]
        cells += [f'<td class="number">{_percent(value)}</td>' for value in numbers]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _matrix_table(run: RunSummary) -> str:
    matrix = run.matrix.matrix()
    header = "<tr><th>after task</th>" + "".join(f"<th>T{i}</th>" for i in range(len(matrix[0]))) + "</tr>"
    body = [
        f"<tr><td>{t}</td>" + "".join(f'<td class="number">{_percent(value)}</td>' for value in row) + "</tr>"
        for t, row in enumerate(matrix)
    ]
    return "\n".join(["<table>", header, *body, "</table>"])


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.muted { color: #666; font-size: 0.85em; }
"""


def write_page(runs: list[RunSummary], out: Path) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>ntkcl report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>ntkcl report</h1>",
        f'<p class="muted">{len(runs)} run(s), written {stamp} by ntkcl {html.escape(__version__)}. '
        "Accuracies in %; A_T is the accuracy on all seen classes after the last finished task.</p>",
        "<h2>Summary</h2>",
        _summary_table(runs),
        "<h2>Accuracy on all seen classes</h2>",
        _image(out / ALL_SEEN_FILE, "accuracy on all seen classes after each task"),
        "<h2>Forgetting per task</h2>",
        _image(out / FORGETTING_FILE, "forgetting of each task after the last task"),
    ]
    for run in runs:
        sections += [
            f"<h2>{html.escape(run.name)}</h2>",
            f'<p class="muted">{html.escape(str(run.path))}</p>',
            _image(out / run.heatmap_file, f"accuracy matrix of {run.name}"),
            _matrix_table(run),
        ]
    sections.append("</body></html>")
    (out / INDEX_FILE).write_text("\n".join(sections) + "\n", encoding="utf-8")


def write_report(run_dirs: list[Path], out: Path) -> dict:
    """Draw the PNGs and write index.html for `run_dirs` into `out`; returns what was written."""
    runs = [RunSummary.load(Path(path)) for path in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise BadInputError("two run directories share a name; pass each run once")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"cannot create report folder {out}: {error.strerror or error}") from error
    for run in runs:
        draw_heatmap(run, out / run.heatmap_file)
    draw_all_seen(runs, out / ALL_SEEN_FILE)
    draw_forgetting(runs, out / FORGETTING_FILE)
    write_page(runs, out)
    files = [INDEX_FILE, ALL_SEEN_FILE, FORGETTING_FILE, *(run.heatmap_file for run in runs)]
    return {"out": str(out), "files": [str(out / name) for name in files], "runs": [run.row() for run in runs]}
