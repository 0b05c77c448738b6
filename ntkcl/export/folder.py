"""Run directory -> export folder: the learned state, its description, the card and the metrics.

    adapter_model.safetensors   the learned state of the last finished task (never the frozen backbone)
    adapter_config.json         method + hyper-parameters, backbone (resolved name, Hub id and revision or
                                file, weights sha256), stream protocol, class order and names, metrics,
                                ntkcl version
    config.json                 a short summary pointing to the two files above (the Hub counts downloads
                                of this file)
    README.md                   model card: Hub metadata (base model, model-index, licence), metrics
                                table, command, citations
    metrics.json                the run's metrics

A run that is still training (or was stopped) is exported as far as its finished tasks go; the config says
`"finished": false` with `finished_tasks` / `num_tasks`, and the card says so at the top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from ntkcl.engine import rundir
from ntkcl.errors import BadInputError
from ntkcl.export.card import render_card
from ntkcl.export.constants import CARD_NAME, CONFIG_NAME, EXPORT_FILES, HUB_CONFIG_NAME, METRICS_NAME, WEIGHTS_NAME
from ntkcl.export.document import build_export_config, hub_config
from ntkcl.files import staged_folder, write_safetensors


@dataclass
class ExportResult:
    folder: Path
    config: dict
    files: dict[str, int]

    @property
    def finished(self) -> bool:
        return bool(self.config["finished"])


def _check_destination(folder: Path) -> None:
    if folder.is_file():
        raise BadInputError(f"--out {folder} is a file")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG_NAME).is_file():
        raise BadInputError(f"--out {folder} is a non-empty folder that is not an ntkcl export; choose another")


def export_run(run_dir: Path, out: Path, license_id: str | None = None, repo_id: str | None = None) -> ExportResult:
    """Write the export folder of `run_dir` into `out` (built next to it, then renamed into place).

    Args:
        run_dir: a run directory; its last finished checkpoint is exported.
        out: the export folder (replaced if it holds an earlier export).
        license_id: the model card's `license` (default: the base weights' licence, see `card.card_license`).
        repo_id: the Hub repo the card's usage lines name, when known.
    """
    run_dir = rundir.check_run_dir(run_dir)
    _check_destination(out)
    document, checkpoint = build_export_config(run_dir)
    metrics_file = run_dir / rundir.METRICS_FILE
    metrics = rundir.read_json(metrics_file) if metrics_file.is_file() else {}
    state = load_file(checkpoint / rundir.STATE_FILE)
    leaked = [key for key in state if key.startswith("backbone.")]
    if leaked:
        raise BadInputError(f"{checkpoint} holds backbone tensors ({leaked[0]}, ...); refusing to export them")
    write_export_folder(out, document, state, metrics, render_card(document, metrics, license_id, repo_id))
    return ExportResult(out, document, {name: (out / name).stat().st_size for name in EXPORT_FILES})


def _json_text(document: dict) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def write_export_files(folder: Path, document: dict, tensors: dict, metrics: dict, card: str) -> None:
    """Write the export files into an existing `folder` (other files in it are left alone)."""
    (folder / CONFIG_NAME).write_text(_json_text(document), encoding="utf-8")
    (folder / HUB_CONFIG_NAME).write_text(_json_text(hub_config(document)), encoding="utf-8")
    write_safetensors(folder / WEIGHTS_NAME, tensors)
    (folder / METRICS_NAME).write_text(_json_text(metrics), encoding="utf-8")
    (folder / CARD_NAME).write_text(card, encoding="utf-8")


def write_export_folder(out: Path, document: dict, tensors: dict, metrics: dict, card: str) -> None:
    """Write the export files into a staging folder that replaces `out` once complete."""
    try:
        with staged_folder(out) as staging:
            write_export_files(staging, document, tensors, metrics, card)
    except OSError as error:
        raise BadInputError(f"cannot write the export to {out}: {error.strerror or error}") from error
