"""`ntkcl report RUN_DIR [RUN_DIR ...]`: accuracy heatmaps, curves and a summary table as PNGs and one HTML page."""

from __future__ import annotations

from pathlib import Path

import typer

from ntkcl.cli import _common


def report(
    run_dirs: list[Path] = typer.Argument(
        ...,
        parser=_common.non_empty_path,
        metavar="RUN_DIR...",
        help="One or more run directories or seed group folders (ntkcl train --seeds).",
    ),
    out: Path = typer.Option(
        Path("report"),
        "--out",
        "-o",
        parser=_common.non_empty_path,
        metavar="DIR",
        help="Folder that receives index.html and the PNGs.",
    ),
    json_output: bool = _common.JSON_OPTION,
) -> None:
    """Compare runs by looking: one self-contained HTML page and its PNGs.

    Draws each run's accuracy matrix as a heatmap, the accuracy on all seen classes after each task of every run on one plot, the forgetting of each task, and a summary table (A_T, mean incremental accuracy, forgetting, BWT, trainable parameters, wall time, epochs). A seed group counts as one entry: mean ± sample sd over its members, with error bars. Published rows whose configuration matches an entry are compared. Needs matplotlib: pip install 'ntkcl[report]'.
    """
    _common.set_json(json_output)
    from ntkcl.report import INDEX_FILE, write_report

    written = write_report(run_dirs, out)
    if json_output:
        _common.emit(written)
        return
    from ntkcl.engine.groups import format_mean_sd

    for row in written["runs"]:
        value = row["final_accuracy"]
        shown = format_mean_sd(value) if isinstance(value, dict) else f"{value:.2f}"
        _common.stdout.print(f"{row['label']}: A_T {shown} after {row['tasks']} tasks", highlight=False)
    for path in written["files"]:
        _common.stdout.print(path, highlight=False)
    _common.stdout.print(f"open {Path(written['out']) / INDEX_FILE} in a browser", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
