"""The run directory: `runs/<stream>-<method>-<UTC stamp>/`.

config.json           the fully resolved RunConfig
run.json              versions, device, backbone + weight sha256, data manifest sha256, class order, seeds
log.jsonl             one JSON record per epoch / task event
metrics.json          accuracy matrix and summary metrics (rewritten after every task)
acc_matrix.csv        R[t][i] as a table
zero_shot.json        the evaluation before the first task (task-incremental runs of zero-shot methods)
train_files.tsv       mixed streams (VTAB-SimS): task, dataset, manifest row, stream label of every training image
checkpoints/task-XX/  learned state after task XX, written atomically (temporary folder + rename); the
                      part only needed to continue training (a method's `training_only` state) sits in its
                      own file, kept for the last finished task only
snapshots/            the latest in-task snapshot (training state, optimizer, schedule, position), written
                      atomically every `runtime.snapshot_epochs` epochs and on Ctrl+C; removed when the task ends
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file

from ntkcl.engine.metrics import AccuracyMatrix, retrieval_summary
from ntkcl.errors import BadInputError
from ntkcl.files import atomic_write_text, read_marker, staged_folder, write_marker, write_safetensors

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
MATRIX_FILE = "acc_matrix.csv"
ZERO_SHOT_FILE = "zero_shot.json"
TRAIN_FILES_FILE = "train_files.tsv"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "learned_state.safetensors"
TRAINING_STATE_FILE = "training_state.safetensors"
TASK_FILE = "task.json"
SNAPSHOT_DIR = "snapshots"
SNAPSHOT_STATE_FILE = "training_state.pt"
SNAPSHOT_FILE = "snapshot.json"
CHECKPOINT_KIND = "checkpoint"
SNAPSHOT_KIND = "snapshot"


def _holds_only(names: set[str]):
    """A test recognising folders written before folder markers by their file set (see `ntkcl.files`)."""

    def recognise(folder: Path) -> bool:
        entries = list(folder.iterdir())
        return bool(entries) and all(entry.name in names and entry.is_file() for entry in entries)

    return recognise


is_legacy_checkpoint = _holds_only({STATE_FILE, TRAINING_STATE_FILE, TASK_FILE})
is_legacy_snapshot = _holds_only({SNAPSHOT_STATE_FILE, SNAPSHOT_FILE})


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def new_run_dir(out: Path, stream: str, method: str) -> Path:
    """A fresh, unique run folder under `out` (never an existing one); an ad-hoc `a,b,c` stream reads `a+b+c`."""
    base = f"{stream.replace(',', '+')}-{method}-{utc_stamp()}"
    candidate, suffix = out / base, 1
    while candidate.exists():
        suffix += 1
        candidate = out / f"{base}-{suffix}"
    try:
        candidate.mkdir(parents=True)
    except OSError as error:
        raise BadInputError(f"cannot create run directory under {out}: {error.strerror or error}") from error
    if not os.access(candidate, os.W_OK):
        raise BadInputError(f"run directory {candidate} is not writable")
    return candidate


def check_run_dir(path: Path, started: bool = True) -> Path:
    """`path` if it is a run directory, else a BadInputError saying what is wrong.

    Args:
        path: the folder.
        started: require `run.json`, which is written before the first task. `--resume` passes False: a run
            stopped before then is started again in its folder from its `config.json`.
    """
    if not path.exists():
        raise BadInputError(f"run directory {path} does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise BadInputError(f"{path} is not an ntkcl run directory (no {CONFIG_FILE})")
    if started and not (path / RUN_FILE).is_file():
        raise BadInputError(
            f"{path} stopped before its first task began (no {RUN_FILE}), so no task finished; "
            f"start it from its config with `ntkcl train --resume {path}`"
        )
    return path


def latest_run(out: Path) -> Path:
    """The most recently started run under `out`."""
    runs = [p for p in out.glob("*") if (p / RUN_FILE).is_file()] if out.is_dir() else []
    if not runs:
        raise BadInputError(f"no runs under {out}; train one with `ntkcl train` or pass RUN_DIR")

    def started_at(run: Path) -> str:
        """run.json's start time ("" when it is unreadable: the reader of that run says what is wrong)."""
        try:
            record = json.loads((run / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ""
        stamp = record.get("started_at", "") if isinstance(record, dict) else ""
        return stamp if isinstance(stamp, str) else ""

    return max(runs, key=lambda p: (started_at(p), p.name))


def write_json(path: Path, document: dict) -> None:
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise BadInputError(f"cannot read {path}: {reason}") from error


def append_log(run_dir: Path, record: dict) -> None:
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def write_metrics(
    run_dir: Path,
    matrix: AccuracyMatrix,
    finished: bool,
    extra: dict | None = None,
    retrieval: AccuracyMatrix | None = None,
) -> dict:
    """metrics.json and acc_matrix.csv; `retrieval` adds the task-retrieval matrix of a retrieving method."""
    document = {"finished": finished, **matrix.summary(), **(extra or {})}
    if retrieval is not None:
        document["task_retrieval"] = retrieval_summary(retrieval)
    write_json(run_dir / METRICS_FILE, document)
    atomic_write_text(run_dir / MATRIX_FILE, matrix.to_csv(retrieval))
    return document


def write_task_metrics(
    run_dir: Path,
    records: list[dict],
    zero_shot: list[tuple[int, int]] | None,
    finished: bool,
    extra: dict | None = None,
) -> dict:
    """metrics.json and acc_matrix.csv from the finished tasks' records (task.json): accuracy, task retrieval
    (methods that retrieve a task per image) and the method's per-task diagnostics."""
    matrix = AccuracyMatrix.from_rows([record["counts"] for record in records], zero_shot)
    retrieval = None
    if all(record.get("retrieval") is not None for record in records):
        retrieval = AccuracyMatrix.from_rows([record["retrieval"] for record in records])
    if any("diagnostics" in record for record in records):
        extra = {**(extra or {}), "task_diagnostics": [record.get("diagnostics") for record in records]}
    return write_metrics(run_dir, matrix, finished, extra, retrieval)


def checkpoint_dir(run_dir: Path, task_index: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"task-{task_index:02d}"


def save_checkpoint(
    run_dir: Path,
    task_index: int,
    state: dict[str, torch.Tensor],
    record: dict,
    training_only: Callable[[str], bool] | None = None,
) -> Path:
    """Write the task's learned state and record into a temporary folder, then rename it into place.

    Keys for which `training_only(key)` holds go to `training_state.safetensors`, the rest (what predicts)
    to `learned_state.safetensors`.
    """
    final = checkpoint_dir(run_dir, task_index)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    training = {key: value for key, value in tensors.items() if training_only is not None and training_only(key)}
    predicting = {key: value for key, value in tensors.items() if key not in training}
    with staged_folder(final, CHECKPOINT_KIND, is_legacy_checkpoint) as staging:
        write_safetensors(staging / STATE_FILE, predicting)
        if training:
            write_safetensors(staging / TRAINING_STATE_FILE, training)
        write_json(staging / TASK_FILE, record)
    return final


def finished_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in task order (half-written temporary folders are ignored)."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("task-*") if (p / TASK_FILE).is_file() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's learned state (with its training-only part when it is still there) and task record."""
    state = load_file(path / STATE_FILE)
    if (path / TRAINING_STATE_FILE).is_file():
        state.update(load_file(path / TRAINING_STATE_FILE))
    return state, read_json(path / TASK_FILE)


def snapshot_name(task: int, epoch: int, step: int) -> str:
    return f"task-{task:02d}-epoch-{epoch:03d}-step-{step:06d}"


def save_snapshot(run_dir: Path, position: dict, training_state: dict) -> Path:
    """Write an in-task snapshot atomically, then remove every older one.

    `position` (task, epoch, step: the optimizer steps done in that epoch) goes to snapshot.json;
    `training_state` (tensors, optimizer and schedule state dicts) to a torch file read with weights_only.
    """
    folder = run_dir / SNAPSHOT_DIR
    final = folder / snapshot_name(position["task"], position["epoch"], position["step"])

    with staged_folder(final, SNAPSHOT_KIND, is_legacy_snapshot) as staging:
        torch.save(training_state, staging / SNAPSHOT_STATE_FILE)
        write_json(staging / SNAPSHOT_FILE, position)
    remove_snapshots(run_dir, keep=final)
    return final


def latest_snapshot(run_dir: Path, task: int) -> Path | None:
    """The newest complete snapshot of `task` (half-written temporary folders are ignored)."""
    folder = run_dir / SNAPSHOT_DIR
    if not folder.is_dir():
        return None
    found = [
        path
        for path in folder.glob(f"task-{task:02d}-epoch-*")
        if (path / SNAPSHOT_FILE).is_file() and (path / SNAPSHOT_STATE_FILE).is_file()
    ]
    return max(found, key=lambda path: path.name) if found else None


def load_snapshot(path: Path) -> tuple[dict, dict]:
    """(position, training state) of a snapshot, tensors on the CPU."""
    state = torch.load(path / SNAPSHOT_STATE_FILE, map_location="cpu", weights_only=True)
    return read_json(path / SNAPSHOT_FILE), state


def remove_snapshots(run_dir: Path, keep: Path | None = None) -> None:
    """Delete the snapshots (and leftover temporary folders) except `keep`."""
    folder = run_dir / SNAPSHOT_DIR
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def drop_training_state(path: Path) -> None:
    """Delete a checkpoint's training-only part: only the last finished task's is needed to resume.

    The checkpoint's marker is rewritten without its checksum; the others stay as recorded at write time.
    """
    marker = read_marker(path)
    if marker is not None and TRAINING_STATE_FILE in marker["sha256"]:
        recorded = {name: digest for name, digest in marker["sha256"].items() if name != TRAINING_STATE_FILE}
        write_marker(path, CHECKPOINT_KIND, recorded)
    (path / TRAINING_STATE_FILE).unlink(missing_ok=True)


def task_records(run_dir: Path, count: int) -> list[dict]:
    """The `task.json` records of tasks 0 .. count-1."""
    return [read_json(checkpoint_dir(run_dir, index) / TASK_FILE) for index in range(count)]
