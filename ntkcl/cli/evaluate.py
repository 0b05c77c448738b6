"""`ntkcl eval PATH`: recompute the accuracy matrix of a run from its checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from ntkcl.cli import _common
from ntkcl.engine.progress import Reporter


def evaluate(
    path: str = typer.Argument(..., help="A run directory."),
    data_root: str | None = _common.DATA_ROOT_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    json_output: bool = _common.JSON_OPTION,
) -> None:
    """Reload every task's checkpoint and recompute R[t][i], A_T, mean incremental accuracy, forgetting."""
    _common.set_json(json_output)
    from ntkcl.engine.evaluate import evaluate_run

    result = evaluate_run(Path(path), _common.as_path(data_root), Reporter(enabled=not quiet))
    if json_output:
        _common.emit(result)
        return
    _common.print_metrics(result["metrics"], title=f"{Path(path).name}: accuracy (%) recomputed from checkpoints")
    verdict = "identical to" if result["matches_training"] else "DIFFERENT from"
    _common.stdout.print(f"recomputed matrix is {verdict} the one training reported", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
