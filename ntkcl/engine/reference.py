"""The no-training reference of a run: SimpleCIL on the same backbone, stream, transforms and class order.

SimpleCIL (Zhou et al., arXiv 2303.07338) trains nothing: each class is the mean frozen-backbone feature of
its training images and prediction is the nearest one by cosine. What a trained method adds is its accuracy
beyond this. Its prototypes are independent rows set once per task, so the whole accuracy matrix comes from
one pass over the training images and one over the test images: the row after task t is the argmax over the
first `total_classes(t)` columns of the full logits, which is exactly what SimpleCIL scores at step t.

That pass is still one more over every image of the stream (about 60,000 ViT-B/16 passes on CIFAR-100), and
every method run on the same backbone and stream would repeat it. So the result is cached under the data root
(`.no-training-references/<key>.json`), keyed by everything the matrix depends on: the backbone's record
(weights sha256 included) and settings, the dataset's manifest, the class order and task sizes, the stream's
transforms, the precision, the evaluation batch size, the device type and the ntkcl and torch versions. A
seed group or `ntkcl reproduce` of several methods then computes it once per seed. Delete the folder to
recompute; a cache file that does not read back is recomputed and replaced.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

import ntkcl
from ntkcl.data.scenarios import CLASS_INCREMENTAL
from ntkcl.engine.evaluate import ScoringLoader, TaskImages, autocast_for
from ntkcl.engine.metrics import AccuracyMatrix
from ntkcl.files import atomic_write_text
from ntkcl.methods.base import ContinualMethod
from ntkcl.methods.registry import get_method, validate_params

REFERENCE_METHOD = "simplecil"
REFERENCE_CACHE_FOLDER = ".no-training-references"  # under the data root


def has_reference(method: ContinualMethod, scoring: ScoringLoader) -> bool:
    """Class-incremental streams of a method other than the reference itself, whose tasks' training images are
    of their own classes (the reference takes no mixed task data, such as VTAB-SimS's)."""
    stream = scoring.stream
    own_classes_only = stream.train_task is None or get_method(REFERENCE_METHOD).mixed_task_data
    return stream.scenario == CLASS_INCREMENTAL and method.name != REFERENCE_METHOD and own_classes_only


@torch.no_grad()
def reference_matrix(backbone, scoring: ScoringLoader) -> AccuracyMatrix:
    """SimpleCIL's accuracy matrix on `scoring`'s stream with `backbone` (every process takes part)."""
    stream, ctx = scoring.stream, scoring.ctx
    method_class = get_method(REFERENCE_METHOD)
    reference = method_class(backbone, validate_params(method_class, {})).to(ctx.device).eval()
    tasks = stream.tasks()
    with autocast_for(ctx.device, scoring.precision):
        for task in tasks:
            reference.begin_task(task)
            reference.to(ctx.device)
            reference.end_task(task, TaskImages(scoring, task))
    task_of_label = torch.as_tensor(stream.task_of_label(), device=ctx.device)
    last = tasks[-1]
    correct = torch.zeros(len(tasks), len(tasks), dtype=torch.int64, device=ctx.device)
    total = torch.zeros(len(tasks), dtype=torch.int64, device=ctx.device)
    for images, labels in scoring.batches(stream.test, stream.test_indices(last)):
        with autocast_for(ctx.device, scoring.precision):
            logits = reference.predict(images).float()
        image_tasks = task_of_label[labels]
        total.index_add_(0, image_tasks, torch.ones_like(labels))
        for step, task in enumerate(tasks):
            # Only images of tasks seen by `step` are scored after it, against the classes seen so far.
            seen = image_tasks <= step
            predictions = logits[seen, : task.total_classes].argmax(dim=1)
            correct[step].index_add_(0, image_tasks[seen], (predictions == labels[seen]).long())
    ctx.all_reduce_sum(correct)
    ctx.all_reduce_sum(total)
    totals = total.tolist()
    rows = [list(zip(correct[step, : step + 1].tolist(), totals[: step + 1])) for step in range(len(tasks))]
    return AccuracyMatrix.from_rows(rows)


def reference_summary(matrix: AccuracyMatrix) -> dict:
    """What metrics.json keeps under `no_training_reference`."""
    return {
        "method": REFERENCE_METHOD,
        "final_accuracy": matrix.final_accuracy(),
        "forgetting": matrix.forgetting(),
        "accuracy_matrix": matrix.matrix(),
    }


def reference_identity(config, record: dict) -> dict:
    """Everything the reference's accuracy matrix depends on, from the run's config and `run.json` record."""
    stream = config.stream.model_dump(mode="json", exclude={"data_root"})
    return {
        "method": REFERENCE_METHOD,
        "versions": {"ntkcl": ntkcl.__version__, "torch": torch.__version__},
        "device_type": record["device_type"],
        "backbone": record["backbone"],
        "backbone_config": config.backbone.model_dump(mode="json"),
        "dataset": record["dataset"],
        "stream": stream,
        "class_order": record["class_order"],
        "task_sizes": record["task_sizes"],
        "precision": config.runtime.precision,
        "eval_batch_size": config.optim.eval_batch_size,
    }


def reference_cache_file(root: Path, identity: dict) -> Path:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return root / REFERENCE_CACHE_FOLDER / f"{key}.json"


def read_cached_reference(path: Path, identity: dict) -> AccuracyMatrix | None:
    """The cached matrix when `path` holds one for exactly `identity`; None otherwise (absent or unreadable)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document["identity"] != identity:
            return None
        return AccuracyMatrix.from_rows(document["counts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached_reference(path: Path, identity: dict, matrix: AccuracyMatrix) -> None:
    """Keep `matrix` for later runs of the same identity (its exact counts, so it reads back bit for bit)."""
    counts = [list(zip(correct, total)) for correct, total in zip(matrix.correct, matrix.total)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"identity": identity, "counts": counts}, indent=1) + "\n")
