"""`ntkcl diagnose RUN_DIR`: the NTK view of a finished run, written to its diagnostics.json."""

from __future__ import annotations

from pathlib import Path

import typer

from ntkcl.cli import _common
from ntkcl.errors import BadInputError


def _task_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError as error:
        raise BadInputError(f"--tasks takes comma-separated task indices (e.g. 0,1,4), got {value!r}") from error


def diagnose(
    run_dir: Path = typer.Argument(..., parser=_common.non_empty_path, metavar="RUN_DIR", help="A run directory."),
    probe: int = typer.Option(
        32, "--probe", min=2, metavar="N", help="Test and training images per task (seeded, recorded)."
    ),
    tasks: str | None = typer.Option(
        None, "--tasks", metavar="I,J,...", help="Checkpoints to measure, by task index (default: every task)."
    ),
    outputs: int = typer.Option(
        0,
        "--outputs",
        min=0,
        metavar="K",
        help="Differentiate a seeded Gaussian projection of the seen-class logits to this many outputs (0: the logits).",
    ),
    energy: float = typer.Option(
        0.9, "--energy", min=0.01, max=1.0, metavar="SHARE", help="Spectrum share kept by each task's feature subspace."
    ),
    seed: int = typer.Option(0, "--seed", metavar="SEED", help="Seed of the probe draw and of the projection."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, metavar="N", help="Images per Jacobian evaluation."),
    device: str | None = _common.device_option(None, "Where to compute (default: the run's device)."),
    data_root: Path | None = _common.DATA_ROOT_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    json_output: bool = _common.JSON_OPTION,
) -> None:
    """Measure a run through the neural tangent kernel of its tuned parameters.

    After every task: the cross-task NTK block norms, each task's effective rank and label alignment, and the drift of old tasks' kernels; after the last task: principal angles between the tasks' tangent-feature subspaces and cosines between prototypes of different tasks; the train/test accuracy gap of every task; and for methods that retrieve a task (PROTEUS) δ, κ and the retrieval-bound threshold per cluster beside the measured retrieval accuracy. Writes RUN_DIR/diagnostics.json; `ntkcl report RUN_DIR` draws it.
    """
    _common.set_json(json_output)
    from ntkcl.diagnostics import diagnose_run
    from ntkcl.engine.progress import Reporter

    document = diagnose_run(
        run_dir,
        probe=probe,
        tasks=_task_list(tasks),
        device=device,
        outputs=outputs,
        energy=energy,
        seed=seed,
        batch_size=batch_size,
        data_root=data_root,
        reporter=Reporter(enabled=not quiet),
    )
    if json_output:
        _common.emit(document)
        return
    _print_summary(document, run_dir)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_summary(document: dict, run_dir: Path) -> None:
    out = _common.stdout
    out.print(
        f"{document['run']}: {document['method']}, probe {document['probe']['per_task']} images per task",
        highlight=False,
    )
    for step in document["ntk"]:
        last_row = step["block_norms"][-1]
        out.print(
            f"after task {step['after_task']}: effective rank "
            + " ".join(_number(v, 1) for v in step["effective_rank"])
            + "; label alignment "
            + " ".join(_number(v, 2) for v in step["label_alignment"])
            + "; newest task vs others "
            + " ".join(_number(v, 2) for v in last_row[:-1])
            + (
                "; drift " + " ".join(_number(v, 3) for v in step["drift_from_previous"])
                if step["drift_from_previous"]
                else ""
            )
            + f" ({step['seconds_per_probe_image']:.3f} s per probe image)",
            highlight=False,
        )
    for gap in document["generalisation_gap"]:
        parts = [
            f"{name.replace('_', ' ')} {_number(value['gap'], 1)}"
            for name, value in gap.items()
            if name != "task" and value is not None
        ]
        out.print(f"task {gap['task']} train-test gap (points): " + ", ".join(parts), highlight=False)
    orthogonality = document["feature_orthogonality"]
    out.print(
        f"prototype cosine between tasks {_number(orthogonality['prototype_cosine_between_tasks'])}",
        highlight=False,
    )
    if "retrieval" in document:
        clusters = document["retrieval"]["clusters"]
        passed = sum(cluster["satisfied"] for cluster in clusters)
        out.print(f"retrieval bound: {passed}/{len(clusters)} clusters have δ > threshold", highlight=False)
    out.print(f"wrote {Path(run_dir) / 'diagnostics.json'}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("diagnose")(diagnose)
