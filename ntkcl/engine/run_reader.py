"""The one reader of a run folder: every file is validated before anything of it is trusted.

`read_run_folder` checks, in order: `config.json` (the RunConfig schema, a known method and dataset or
stream), `run.json` (its schema, and that its class order and task sizes agree), the `checkpoints/` folder
(only `task-XX` folders, contiguous from task 0, no more than the stream's tasks), each checkpoint (the
sha256 its marker recorded when it was written, `task.json`'s schema, readable safetensors), the zero-shot
row and `metrics.json`. With `check_tensors` it also rebuilds the method's structure for the last finished
task and compares the checkpoint's tensor names and shapes with it, so any method, a new one included, is
covered by its own `learned_state` and `load_learned_state`.

A problem is one `BadInputError` line: which file, what is wrong, and what can still be done (resume after
the intact tasks, re-run eval). The one exact recovery is `metrics.json`, which is a function of the task
records: a missing or damaged one is rebuilt from them, written back and said in `notes`.

Checkpoints written before folder markers carry no recorded sha256; they are checked by schema, names and
shapes only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file

from ntkcl.config import RunConfig, describe_validation_error, load_config
from ntkcl.engine import rundir
from ntkcl.errors import BadInputError
from ntkcl.files import FOLDER_MARKER, STAGING_MARK, read_marker, verify_checksums

CHECKPOINT_NAME = re.compile(r"task-(\d{2,})")
Count = Annotated[StrictInt, Field(ge=0)]
Sha256 = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


class _Record(BaseModel):
    """Fields the reader relies on are typed strictly; others a newer ntkcl adds are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True)


class BackboneRecord(_Record):
    weights_sha256: Sha256


class DatasetRecord(_Record):
    manifest_sha256: StrictStr | None = None


class RunRecord(_Record):
    """run.json."""

    backbone: BackboneRecord
    dataset: DatasetRecord
    class_order: list[StrictInt]
    class_names: list[StrictStr]
    task_sizes: list[Annotated[StrictInt, Field(gt=0)]] = Field(min_length=1)
    tasks: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RunRecord:
        classes = sum(self.task_sizes)
        if len(self.class_order) != classes or len(self.class_names) != classes:
            raise ValueError(
                f"class_order ({len(self.class_order)}) and class_names ({len(self.class_names)}) must list the "
                f"{classes} classes of task_sizes"
            )
        if self.tasks is not None and len(self.tasks) != len(self.task_sizes):
            raise ValueError(f"tasks lists {len(self.tasks)} tasks, task_sizes {len(self.task_sizes)}")
        return self


Pair = Annotated[list[Count], Field(min_length=2, max_length=2)]


class TaskRecord(_Record):
    """A checkpoint's task.json."""

    task: Count
    counts: list[Pair] = Field(min_length=1)
    retrieval: list[Pair] | None = None

    @model_validator(mode="after")
    def _counts(self) -> TaskRecord:
        for correct, total in [*self.counts, *(self.retrieval or [])]:
            if correct > total:
                raise ValueError(f"a count of {correct} correct out of {total} images")
        return self


class MetricsRecord(_Record):
    """metrics.json (the entries the reader and export rely on)."""

    finished: bool
    correct: list[list[Count]]
    total: list[list[Count]]


class ZeroShotRecord(_Record):
    counts: list[Pair] = Field(min_length=1)


@dataclass
class RunFolder:
    """A validated run folder.

    Attributes:
        path: the folder.
        config: config.json.
        record: run.json (as written).
        checkpoints: the finished tasks' checkpoint folders, task 0 first.
        task_records: their task.json documents.
        zero_shot: the zero-shot row (zero-shot methods on task-incremental streams), else None.
        metrics: metrics.json, rebuilt from the task records when it was missing or damaged ({} when no
            task finished).
        notes: one line per recovery made while reading.
    """

    path: Path
    config: RunConfig
    record: dict
    checkpoints: list[Path]
    task_records: list[dict]
    zero_shot: list[tuple[int, int]] | None
    metrics: dict
    notes: list[str] = field(default_factory=list)

    @property
    def task_sizes(self) -> list[int]:
        return list(self.record["task_sizes"])

    @property
    def finished_tasks(self) -> int:
        return len(self.checkpoints)

    def load_state(self, index: int, training: bool = True) -> dict[str, torch.Tensor]:
        """Checkpoint `index`'s learned state (with its training-only part when `training` and still there)."""
        folder = self.checkpoints[index]
        names = [rundir.STATE_FILE]
        if training and (folder / rundir.TRAINING_STATE_FILE).is_file():
            names.append(rundir.TRAINING_STATE_FILE)
        state = {}
        for name in names:
            state.update(_load_tensors(self, index, folder / name))
        return state

    def predicting_state(self) -> dict[str, torch.Tensor]:
        """The last checkpoint's state without its training-only part: what an export ships."""
        return self.load_state(self.finished_tasks - 1, training=False)

    def damaged(self, path: Path, problem: str, intact: int | None = None) -> BadInputError:
        """The one-line error for a damaged `path`, saying what can still be done with the first `intact` tasks."""
        return BadInputError(f"{path}: {problem}; {_what_remains(self.path, intact)}")


def _what_remains(run_dir: Path, intact: int | None) -> str:
    if intact is None:
        return "the run folder cannot be used as it is (restore the file, or start the run again)"
    if intact == 0:
        return f"no task is intact: move {run_dir / rundir.CHECKPOINT_DIR} away and `ntkcl train --resume {run_dir}`"
    last = rundir.checkpoint_dir(run_dir, intact - 1).name
    return (
        f"tasks 0-{intact - 1} are intact: move the later checkpoints away and `ntkcl train --resume {run_dir}` "
        f"continues after {last}"
    )


def _load_tensors(run: RunFolder, index: int, path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise run.damaged(path, f"not a readable safetensors file ({reason})", index) from error


def _read_document(path: Path, model: type[BaseModel], intact: int | None, run_dir: Path) -> BaseModel:
    """`path` parsed as JSON and validated by `model`; a one-line BadInputError otherwise."""
    import json

    what = _what_remains(run_dir, intact)
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError as error:
        raise BadInputError(f"{path}: a directory where a file belongs; {what}") from error
    except UnicodeDecodeError as error:
        raise BadInputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); {what}") from error
    except OSError as error:
        raise BadInputError(f"{path}: cannot be read ({error.strerror or error}); {what}") from error
    try:
        data = json.loads(text)
    except ValueError as error:
        problem = "empty" if not text.strip() else f"not valid JSON ({str(error).splitlines()[0]})"
        raise BadInputError(f"{path}: {problem}; {what}") from error
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: holds a JSON {type(data).__name__}, not an object; {what}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise BadInputError(f"{path}: {describe_validation_error(error)}; {what}") from error


def _read_config(run_dir: Path) -> RunConfig:
    from ntkcl.engine.builders import dataset_plugin, stream_definition
    from ntkcl.methods.registry import get_method, validate_params

    path = run_dir / rundir.CONFIG_FILE
    if path.is_dir():
        raise BadInputError(f"{path}: a directory where a file belongs; {_what_remains(run_dir, None)}")
    config = load_config(path)
    try:
        validate_params(get_method(config.method.name), config.method.params)
        if stream_definition(config) is None:
            dataset_plugin(config)
    except BadInputError as error:
        raise BadInputError(f"{path}: {error}") from error
    return config


def _checkpoint_folders(run: RunFolder, num_tasks: int) -> list[Path]:
    """The `task-XX` folders of the run, checked for unexpected entries, gaps and tasks beyond the stream."""
    folder = run.path / rundir.CHECKPOINT_DIR
    if not folder.exists():
        return []
    if folder.is_symlink() or not folder.is_dir():
        raise run.damaged(folder, "not a folder", 0)
    found: dict[int, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") and STAGING_MARK in entry.name:
            continue  # an interrupted write; `--resume` removes it
        match = CHECKPOINT_NAME.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            raise BadInputError(
                f"{entry}: unexpected in {rundir.CHECKPOINT_DIR}/ (only task-XX folders belong there); move it away"
            )
        found[int(match.group(1))] = entry
    indices = sorted(found)
    if indices and indices[-1] >= num_tasks:
        raise BadInputError(
            f"{found[indices[-1]]}: the stream has {num_tasks} tasks (task-00 to "
            f"{rundir.checkpoint_dir(run.path, num_tasks - 1).name}); move it away"
        )
    for expected, index in enumerate(indices):
        if index != expected:
            missing = rundir.checkpoint_dir(run.path, expected)
            raise run.damaged(missing, "missing while later checkpoints exist", expected)
    return [found[index] for index in indices]


def _check_checkpoint(run: RunFolder, index: int, folder: Path) -> dict:
    """Verify one checkpoint's recorded sha256 and task.json; returns the task record."""
    marker_path = folder / FOLDER_MARKER
    if marker_path.exists() or marker_path.is_symlink():
        if read_marker(folder) is None:
            raise run.damaged(marker_path, "damaged (the record of the checkpoint's sha256)", index)
        for name in (rundir.STATE_FILE, rundir.TASK_FILE):
            if name not in read_marker(folder)["sha256"]:
                raise run.damaged(marker_path, f"records no sha256 for {name}", index)
        wrong = verify_checksums(folder)
        if wrong:
            path = folder / wrong[0]
            problem = "missing" if not path.exists() else "a directory where a file belongs" if path.is_dir() else None
            problem = problem or "differs from the sha256 recorded when the checkpoint was written"
            raise run.damaged(path, problem, index)
    state_path = folder / rundir.STATE_FILE
    if not state_path.is_file():
        raise run.damaged(state_path, "a directory where a file belongs" if state_path.is_dir() else "missing", index)
    task = _read_document(folder / rundir.TASK_FILE, TaskRecord, index, run.path)
    if task.task != index:
        raise run.damaged(folder / rundir.TASK_FILE, f"records task {task.task}, not {index}", index)
    widths = {index + 1, len(run.record["task_sizes"])}
    if len(task.counts) not in widths:
        raise run.damaged(
            folder / rundir.TASK_FILE, f"holds {len(task.counts)} accuracy counts for task {index}", index
        )
    return task.model_dump(exclude_unset=True)


def _read_metrics(run: RunFolder) -> dict:
    """metrics.json, or the one the task records determine (written back) when it is missing or damaged.

    A readable metrics.json that disagrees with the checkpoints is kept: `ntkcl eval` reports the difference.
    """
    path = run.path / rundir.METRICS_FILE
    records = run.task_records
    if not records:
        return {}
    if path.exists():
        try:
            return _read_document(path, MetricsRecord, None, run.path).model_dump(exclude_unset=True)
        except BadInputError as error:
            problem = str(error).split(": ", 1)[1].split(";", 1)[0]
        if path.is_dir() or path.is_symlink():
            raise run.damaged(path, "a directory or link where a file belongs", len(records))
    else:
        problem = "missing"
    finished = len(records) == len(run.record["task_sizes"])
    document = rundir.write_task_metrics(run.path, records, run.zero_shot, finished)
    run.notes.append(f"{path} was {problem}; rebuilt it exactly from the task records of {len(records)} checkpoints")
    return document


def _check_tensors(run: RunFolder) -> None:
    """The last checkpoint's tensor names and shapes against the method's own structure for those tasks."""
    from ntkcl.engine.builders import build_backbone, build_method
    from ntkcl.export.document import task_infos

    structure = run.config.model_copy(deep=True)
    structure.backbone.pretrained = False  # the structure only: no weights are read or downloaded
    structure.backbone.weights = None
    index = run.finished_tasks - 1
    method = build_method(structure, build_backbone(structure))
    tasks = task_infos(run.task_sizes, run.record.get("tasks"))
    method.begin_stream(tasks)
    state = run.load_state(index)
    leaked = sorted(key for key in state if key.startswith("backbone."))
    if leaked:
        raise run.damaged(run.checkpoints[index] / rundir.STATE_FILE, f"holds backbone tensors ({leaked[0]})", index)
    try:
        method.load_learned_state(state, tasks[: index + 1])
    except BadInputError as error:
        raise run.damaged(run.checkpoints[index] / rundir.STATE_FILE, str(error), index) from error


def read_run_folder(run_dir: Path, *, started: bool = True, check_tensors: bool = False) -> RunFolder:
    """The validated run folder `run_dir` (see the module docstring); BadInputError with one line otherwise.

    Args:
        run_dir: the folder.
        started: require run.json (False for `--resume`, which restarts a run stopped before its first task).
        check_tensors: also check the last checkpoint's tensors against the method (export does; eval and
            resume load every checkpoint into the method, which checks the same).
    """
    run_dir = rundir.check_run_dir(Path(run_dir), started=started)
    config = _read_config(run_dir)
    run = RunFolder(run_dir, config, {}, [], [], None, {})
    run_path = run_dir / rundir.RUN_FILE
    if not started and not run_path.exists():
        return run
    run.record = _read_document(run_path, RunRecord, None, run_dir).model_dump(exclude_unset=True)
    run.checkpoints = _checkpoint_folders(run, len(run.record["task_sizes"]))
    run.task_records = [_check_checkpoint(run, index, folder) for index, folder in enumerate(run.checkpoints)]
    zero_shot_path = run_dir / rundir.ZERO_SHOT_FILE
    if zero_shot_path.exists() or zero_shot_path.is_symlink():
        try:
            counts = _read_document(zero_shot_path, ZeroShotRecord, None, run_dir).counts
        except BadInputError as error:
            raise BadInputError(
                f"{str(error).split('; ', 1)[0]}; delete it: `ntkcl eval` and `ntkcl train --resume` recompute it"
            ) from error
        run.zero_shot = [tuple(pair) for pair in counts]
    run.metrics = _read_metrics(run)
    if check_tensors and run.checkpoints:
        _check_tensors(run)
    return run
