"""Scoring a loaded export on the test images of its stream (or of another prepared dataset)."""

from __future__ import annotations

from pathlib import Path

from ntkcl.errors import BadInputError
from ntkcl.export.document import run_config_of
from ntkcl.export.pretrained import ContinualModel


def evaluate_pretrained(
    model: ContinualModel,
    dataset: str | None = None,
    data_root: Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    precision: str = "auto",
) -> dict:
    """Accuracy of a loaded export on the test images of its stream (or of another prepared dataset).

    Another dataset must have the same number of classes: it is cut with the export's class order and task
    sizes, and scored against the export's class indices. The result is the last row of the accuracy matrix
    (per-task accuracy after the last exported task) and A_T.
    """
    from ntkcl.data.registry import get_dataset
    from ntkcl.engine.builders import build_stream
    from ntkcl.engine.distributed import init_distributed
    from ntkcl.engine.evaluate import ScoringLoader, evaluate

    document = model.config
    config = run_config_of(document)
    if dataset is not None and dataset != config.stream.dataset:
        plugin = get_dataset(dataset)
        if plugin.num_classes != len(document["class_order"]):
            raise BadInputError(
                f"{dataset} has {plugin.num_classes} classes, the export was trained on "
                f"{len(document['class_order'])}; --stream needs the same label space"
            )
        config.stream.dataset = dataset
        config.stream.dataset_options = {}
    if data_root is not None:
        config.stream.data_root = data_root
    ctx = init_distributed("cpu" if model.device.type == "cpu" else str(model.device))
    stream, _ = build_stream(config, ctx)
    finished = document.get("finished_tasks", stream.num_tasks)
    scoring = ScoringLoader(stream, model.transform, ctx, batch_size, num_workers, precision)
    counts = evaluate(model.method, scoring, stream.task(finished - 1)).counts
    accuracy = [100.0 * c / t if t else None for c, t in counts]
    correct, total = sum(c for c, _ in counts), sum(t for _, t in counts)
    final = 100.0 * correct / total if total else None
    exported = document.get("metrics") or {}
    same_stream = config.stream.dataset == document["stream"]["dataset"]
    return {
        "source": model.source,
        "method": document["method"],
        "dataset": config.stream.dataset,
        "finished_tasks": finished,
        "num_tasks": document["num_tasks"],
        "task_accuracy": accuracy,
        "correct": [c for c, _ in counts],
        "total": [t for _, t in counts],
        "final_accuracy": final,
        "exported_final_accuracy": exported.get("final_accuracy"),
        "matches_export": bool(
            same_stream
            and exported.get("correct")
            and exported["correct"][finished - 1] == [c for c, _ in counts]
            and exported["total"][finished - 1] == [t for _, t in counts]
        ),
    }
