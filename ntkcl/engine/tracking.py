"""Experiment tracking: TensorBoard and Weights & Biases (`ntkcl train --log tensorboard --log wandb`).

Rank 0 logs, next to `log.jsonl`:

* after every epoch, on the axis `epoch` (epochs trained in the run so far): `train/<term>` for the loss
  and every term the method logs (image-weighted epoch means), `train/lr` and `train/images_per_s`;
* after every task, on the axis `task` (1-based): `accuracy/task_XX` (R[t][i] of each task so far, %),
  `accuracy/all_seen`, `accuracy/old`, `accuracy/new`, and `summary/*` (A_T, mean incremental accuracy,
  forgetting, BWT) once they are defined.

TensorBoard event files go to `RUN_DIR/tensorboard/` (`tensorboard --logdir runs/`). W&B writes to
`RUN_DIR/wandb/`, offline unless `WANDB_MODE` says otherwise (`wandb sync RUN_DIR/wandb/offline-run-*`
uploads it later), so a run never waits on the network; the W&B run id is the run folder's name, so a
resumed run continues the same W&B run. Neither package is a dependency: `pip install 'ntkcl[tensorboard]'`
or `'ntkcl[wandb]'`; asking for a missing one exits 2 before anything runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ntkcl.engine.metrics import AccuracyMatrix
from ntkcl.errors import BadInputError
from ntkcl.extras import check

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log name -> package it needs
TENSORBOARD_DIR = "tensorboard"


def check_trackers(names: list[str]) -> None:
    """BadInputError naming the extra to install for each requested tracker whose package is missing."""
    for name in names:
        if name not in TRACKERS:
            raise BadInputError(f"--log {name}: unknown tracker; choose from {', '.join(TRACKERS)}")
        check(TRACKERS[name])


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def log(self, values: dict[str, float], axis: str, position: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, position)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ntkcl"),
            name=run_dir.name,
            id=re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name),
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
            resume="allow",
        )
        for axis, prefixes in (("epoch", ("train",)), ("task", ("accuracy", "summary"))):
            self.run.define_metric(axis)
            for prefix in prefixes:
                self.run.define_metric(f"{prefix}/*", step_metric=axis)

    def log(self, values: dict[str, float], axis: str, position: int) -> None:
        self.run.log({**values, axis: position})

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class Tracking:
    """The trackers of one run (none: every call is a no-op). Rank 0 only."""

    def __init__(self, names: list[str], run_dir: Path, config: dict):
        self.trackers = [BACKENDS[name](run_dir, config) for name in names]

    def epoch_end(self, record: dict, epochs_done: int) -> None:
        """One epoch's record (as in log.jsonl); `epochs_done` counts the epochs of the run so far."""
        skipped = ("task", "epoch", "lr", "images_per_s")
        values = {f"train/{key}": value for key, value in record.items() if key not in skipped}
        values.update({"train/lr": record["lr"], "train/images_per_s": record["images_per_s"]})
        self._log(values, "epoch", epochs_done)

    def task_end(self, matrix: AccuracyMatrix) -> None:
        """The accuracy row of the task just finished and the summary metrics so far."""
        last = matrix.num_tasks - 1
        row = matrix.matrix()[last]
        values = {f"accuracy/task_{index:02d}": value for index, value in enumerate(row) if value is not None}
        values["accuracy/all_seen"] = matrix.all_seen_accuracy()[last]
        values["accuracy/new"] = matrix.new_accuracy()[last]
        summary = {
            "accuracy/old": matrix.old_accuracy()[last],
            "summary/final_accuracy": matrix.final_accuracy(),
            "summary/mean_incremental_accuracy": matrix.mean_incremental_accuracy(),
            "summary/forgetting": matrix.forgetting(),
            "summary/backward_transfer": matrix.backward_transfer(),
        }
        values.update({key: value for key, value in summary.items() if value is not None})
        self._log(values, "task", matrix.num_tasks)

    def _log(self, values: dict[str, float], axis: str, position: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, axis, position)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
