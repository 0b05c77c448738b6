"""`ntkcl eval PATH_OR_REPO_ID`: recompute a run's accuracy matrix, or score an export on a stream."""

from __future__ import annotations

from pathlib import Path

import typer

from ntkcl.cli import _common
from ntkcl.errors import BadInputError
from ntkcl.files import expand_user


def _print_export_result(result: dict) -> None:
    tasks = "  ".join(
        f"T{i} {value:.2f}" if value is not None else f"T{i} -" for i, value in enumerate(result["task_accuracy"])
    )
    _common.stdout.print(
        f"{result['source']}: {result['method']} after {result['finished_tasks']}/{result['num_tasks']} tasks "
        f"on {result['dataset']}",
        highlight=False,
    )
    _common.stdout.print(f"per-task accuracy (%): {tasks}", highlight=False)
    _common.stdout.print(f"A_T {result['final_accuracy']:.2f}", highlight=False)
    if result["matches_export"]:
        _common.stdout.print("identical to the accuracy recorded in the export", highlight=False)


def evaluate(
    path: str = typer.Argument(
        ...,
        metavar="PATH",
        help="A run directory, a seed group folder, an export folder, or a Hub repo id (user/name).",
    ),
    stream: str | None = typer.Option(
        None,
        "--stream",
        "-s",
        metavar="NAME",
        help="Exports only: score on another prepared dataset with the same classes (default: the export's).",
        autocompletion=_common.complete_datasets,
    ),
    revision: str | None = typer.Option(
        None, "--revision", metavar="REF", help="Hub branch, tag or commit of a repo id."
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        parser=_common.non_empty_path,
        metavar="PATH",
        help="Local base backbone weights (offline use).",
    ),
    device: str = _common.device_option("auto", "Device for exports."),
    data_root: Path | None = _common.DATA_ROOT_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    json_output: bool = _common.JSON_OPTION,
) -> None:
    """Score a run directory, an export folder or a Hub repo.

    A run directory: reload every task's checkpoint and recompute the accuracy matrix, A_T, mean incremental accuracy and forgetting.

    A seed group folder (ntkcl train --seeds): recompute every member's, then print each metric as mean ± sample sd over the members.

    An export folder or Hub repo id: rebuild the model (base backbone from timm or --weights, its sha256 checked) and report its accuracy on the test classes of each exported task and A_T. The stream must be prepared; --stream scores it on another prepared dataset with the same classes.
    """
    _common.set_json(json_output)
    from ntkcl.engine import rundir
    from ntkcl.export.constants import CONFIG_NAME, export_path

    local = expand_user(path)
    from ntkcl.engine.groups import is_group

    if is_group(local):
        if stream is not None or revision is not None or weights is not None:
            raise BadInputError("--stream, --revision and --weights apply to exports; a group is scored on its stream")
        from ntkcl.cli._seed_groups import evaluate_group

        evaluate_group(local, data_root, quiet, json_output)
        return
    # A run folder stopped before run.json holds config.json alone; an export holds config.json beside its own.
    started_run = (local / rundir.RUN_FILE).is_file()
    if started_run or ((local / rundir.CONFIG_FILE).is_file() and not export_path(local, CONFIG_NAME).is_file()):
        if stream is not None or revision is not None or weights is not None:
            raise BadInputError(
                "--stream, --revision and --weights apply to exports; a run is scored on its own stream"
            )
        _evaluate_run(local, data_root, quiet, json_output)
        return
    from ntkcl.export import evaluate_pretrained, load_pretrained

    model = load_pretrained(path, revision=revision, weights=weights, device=device)
    result = evaluate_pretrained(model, stream, data_root)
    if json_output:
        _common.emit(result)
        return
    _print_export_result(result)


def _evaluate_run(path: Path, data_root: Path | None, quiet: bool, json_output: bool) -> None:
    from ntkcl.engine.evaluate import evaluate_run
    from ntkcl.engine.progress import Reporter

    result = evaluate_run(path, data_root, Reporter(enabled=not quiet))
    if json_output:
        _common.emit(result)
        return
    _common.print_metrics(result["metrics"], title=f"{path.name}: accuracy (%) recomputed from checkpoints")
    _common.stdout.print(_verdict(result, path), highlight=False)


def _verdict(result: dict, path: Path) -> str:
    comparison = result["training_metrics"]
    if comparison == "identical":
        return "recomputed matrix is identical to the one training reported"
    if comparison == "different":
        return "recomputed matrix is DIFFERENT from the one training reported"
    last = result["metrics"]["num_tasks"] - 1
    recorded = {0: "", 1: " for task 0"}.get(last, f" for tasks 0-{last - 1}")
    earlier = f"matches the one training reported{recorded}" if last else "has no recorded task to compare with"
    return (
        f"recomputed matrix {earlier}; the metrics of task {last} were not recorded yet (the run stopped after "
        f"saving its checkpoint); `ntkcl train --resume {path}` records them"
    )


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
