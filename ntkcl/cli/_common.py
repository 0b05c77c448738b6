"""Output conventions shared by the subcommands: JSON on stdout when asked, everything else on stderr."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from ntkcl._entry_points import DATASETS_GROUP, METHODS_GROUP, STREAMS_GROUP, entry_point_names
from ntkcl.files import expand_user

STATE: dict[str, Any] = {"json": False}


def non_empty_path(value: str | Path) -> Path:
    """Parser of path options: an empty value is a mistake, not the current folder."""
    if isinstance(value, Path):  # a default
        return value
    if not value.strip():
        raise typer.BadParameter("must not be empty")
    return expand_user(value)


def complete_datasets(incomplete: str) -> list[str]:
    names = entry_point_names(DATASETS_GROUP) + entry_point_names(STREAMS_GROUP)
    return [name for name in names if name.startswith(incomplete)]


def complete_methods(incomplete: str) -> list[str]:
    return [name for name in entry_point_names(METHODS_GROUP) if name.startswith(incomplete)]


DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:0")


def complete_devices(incomplete: str) -> list[str]:
    return [name for name in DEVICE_CHOICES if name.startswith(incomplete)]


def device_option(default: str | None, help_text: str):
    """`--device`: one of auto, cpu, cuda or cuda:N (checked against this host before anything runs)."""
    return typer.Option(
        default, "--device", metavar="<auto|cpu|cuda|cuda:N>", autocompletion=complete_devices, help=help_text
    )


JSON_OPTION = typer.Option(False, "--json", help="Print a machine-readable result on stdout (logs go to stderr).")
DATA_ROOT_OPTION = typer.Option(
    None,
    "--data-root",
    envvar="NTKCL_DATA_ROOT",
    parser=non_empty_path,
    metavar="DIR",
    help="Where datasets live (default ~/.cache/ntkcl/data).",
)

# Off a terminal (pipes, CI logs) tables keep their natural width instead of wrapping at 80 columns.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, soft_wrap=True)


class _WarningLines(logging.Handler):
    """Warnings of the `ntkcl` library loggers as one `warning: ...` line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        line = f"warning: {' '.join(record.getMessage().split())}"
        held = STATE.get("held_warnings")
        if held is not None:
            held.append(line)
        else:
            stderr.print(line, markup=False, highlight=False)


class HeldWarnings:
    """Warnings held while the input is checked (see `warnings_after_checks`)."""

    def __init__(self):
        self.lines: list[str] | None = []
        STATE["held_warnings"] = self.lines

    def release(self) -> None:
        """Every check has passed: show what was held and stop holding."""
        if self.lines is None:
            return
        STATE["held_warnings"], lines, self.lines = None, self.lines, None
        for line in lines:
            stderr.print(line, markup=False, highlight=False)


@contextlib.contextmanager
def warnings_after_checks() -> Iterator[HeldWarnings]:
    """Hold the warnings raised while the input is checked: shown once it passes (`release()`, or the end of
    the block), dropped when it is refused, so that bad input stays one line."""
    held = HeldWarnings()
    try:
        yield held
    except BaseException:
        STATE["held_warnings"] = None
        raise
    held.release()


def route_warnings() -> None:
    """Show library warnings (a dropped preset value, a partial weights load) on stderr, once per process."""
    logger = logging.getLogger("ntkcl")
    if not any(isinstance(handler, _WarningLines) for handler in logger.handlers):
        logger.addHandler(_WarningLines(logging.WARNING))


def set_json(enabled: bool) -> None:
    STATE["json"] = enabled


def emit(result: dict) -> None:
    """The command's result: JSON on stdout in --json mode (human output is printed by the caller)."""
    if STATE["json"]:
        sys.stdout.write(json.dumps({"ok": True, **result}, indent=2, sort_keys=True, default=str) + "\n")


def fail(message: str, code: int) -> NoReturn:
    message = " ".join(str(message).split())
    if STATE["json"]:
        sys.stdout.write(json.dumps({"ok": False, "error": message, "exit_code": code}) + "\n")
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _matrix_table(
    title: str,
    matrix: list[list[float | None]],
    columns: dict[str, list[float | None]],
    zero_shot: list[float] | None = None,
) -> Table:
    """One row per step: R[t][0..], then the named per-step columns (the first in bold); a zero-shot row first."""
    table = Table(title=title, title_justify="left")
    table.add_column("after task", justify="right")
    for i in range(len(zero_shot) if zero_shot else len(matrix)):
        table.add_column(f"T{i}", justify="right")
    for position, name in enumerate(columns):
        table.add_column(name, justify="right", style="bold" if position == 0 else None)
    if zero_shot:
        table.add_row("zero-shot", *[_percent(value) for value in zero_shot], *["-"] * len(columns))
    for t, row in enumerate(matrix):
        table.add_row(
            str(t), *[_percent(value) for value in row], *[_percent(values[t]) for values in columns.values()]
        )
    return table


def metrics_table(metrics: dict, title: str = "Accuracy (%) after each task") -> Table:
    """R[t][i] with the all-seen, old and new accuracy of each step (after the zero-shot row, if any)."""
    columns = {"all seen": metrics["all_seen_accuracy"], "old": metrics["old_accuracy"], "new": metrics["new_accuracy"]}
    return _matrix_table(title, metrics["accuracy_matrix"], columns, metrics.get("zero_shot_accuracy"))


def retrieval_table(retrieval: dict) -> Table:
    """Ret[t][i]: the share of task i's test images whose retrieved task is i, and its pooled value per step."""
    title = "Task retrieval (%): test images of task i whose retrieved task is i"
    return _matrix_table(title, retrieval["accuracy_matrix"], {"all seen": retrieval["all_seen_accuracy"]})


def metrics_summary(metrics: dict) -> str:
    line = (
        f"A_T {_percent(metrics['final_accuracy'])}  "
        f"mean incremental {_percent(metrics['mean_incremental_accuracy'])}  "
        f"forgetting {_percent(metrics['forgetting'])}  "
        f"BWT {_percent(metrics['backward_transfer'])}"
    )
    if metrics.get("last") is not None:
        line += (
            f"  |  MTIL Transfer {_percent(metrics['transfer'])}  Avg {_percent(metrics['avg'])}  "
            f"Last {_percent(metrics['last'])}"
        )
    return line


def reference_line(method: str, metrics: dict) -> str | None:
    """`ntk-cl A_T 88.10 (forgetting 3.20) vs 74.30 (forgetting 5.00) with no training (simplecil)`: what the
    method adds over the run's no-training reference (None when the run has none)."""
    reference = metrics.get("no_training_reference")
    if not reference:
        return None
    return (
        f"{method} A_T {_percent(metrics['final_accuracy'])} (forgetting {_percent(metrics['forgetting'])}) "
        f"vs {_percent(reference['final_accuracy'])} (forgetting {_percent(reference['forgetting'])}) "
        f"with no training ({reference['method']})"
    )


def print_metrics(metrics: dict, title: str = "Accuracy (%) after each task") -> None:
    stdout.print(metrics_table(metrics, title))
    if metrics.get("task_retrieval"):
        stdout.print(retrieval_table(metrics["task_retrieval"]))
    stdout.print(metrics_summary(metrics), highlight=False)
