"""Run directory -> export folder: the learned state, its description, the card and the metrics.

    ntkcl_model.safetensors     the learned state of the last finished task (never the frozen backbone)
    ntkcl_config.json           method + hyper-parameters, backbone (resolved name, Hub id and revision or
                                file, weights sha256), stream protocol, class order and names, metrics,
                                ntkcl version
    config.json                 a short summary pointing to the two files above (the Hub counts downloads
                                of this file)
    README.md                   model card: Hub metadata (base model, model-index, licence), metrics
                                table, command, citations
    metrics.json                the run's metrics
    checksums.sha256            sha256 of every file above but the card (`ntkcl.export.checksums`)

A run that is still training (or was stopped) is exported as far as its finished tasks go; the config says
`"finished": false` with `finished_tasks` / `num_tasks`, and the card says so at the top.

The run folder is validated first (`ntkcl.engine.run_reader`): a damaged file or a checkpoint that does
not fit its method is refused, never published. `--out` is replaced only when it holds an earlier export
(`ntkcl.files.staged_folder`: its marker, or for exports written before markers the full file set of
format 2 with a readable adapter_config.json); any other existing path is refused before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ntkcl.engine.run_reader import read_run_folder
from ntkcl.errors import BadInputError
from ntkcl.export.card import render_card
from ntkcl.export.checksums import verify_export, write_checksums
from ntkcl.export.constants import (
    CARD_NAME,
    CONFIG_NAME,
    EXPORT_FILES,
    EXPORT_FORMAT,
    EXPORT_KIND,
    HUB_CONFIG_NAME,
    LEGACY_NAMES,
    METRICS_NAME,
    WEIGHTS_NAME,
)
from ntkcl.export.document import build_export_config, hub_config, read_export_config
from ntkcl.files import check_replaceable, staged_folder, write_safetensors


@dataclass
class ExportResult:
    folder: Path
    config: dict
    files: dict[str, int]

    @property
    def finished(self) -> bool:
        return bool(self.config["finished"])


def is_legacy_export(folder: Path) -> bool:
    """An export written before folder markers: the five files of format 2, its adapter_config.json readable."""
    legacy_files = (LEGACY_NAMES[WEIGHTS_NAME], LEGACY_NAMES[CONFIG_NAME], HUB_CONFIG_NAME, CARD_NAME, METRICS_NAME)
    if not all((folder / name).is_file() and not (folder / name).is_symlink() for name in legacy_files):
        return False
    try:
        read_export_config(folder)
    except BadInputError:
        return False
    return True


def export_run(run_dir: Path, out: Path, license_id: str | None = None, repo_id: str | None = None) -> ExportResult:
    """Write the export folder of `run_dir` into `out` (built next to it, then renamed into place).

    Args:
        run_dir: a run directory; its last finished checkpoint is exported.
        out: the export folder (replaced if it holds an earlier export).
        license_id: the model card's `license` (default: the base weights' licence, see `card.card_license`).
        repo_id: the Hub repo the card's usage lines name, when known.
    """
    check_replaceable(out, EXPORT_KIND, is_legacy_export, what=f"--out {out}")
    run = read_run_folder(run_dir, check_tensors=True)
    document = build_export_config(run)
    state = run.predicting_state()
    metrics = run.metrics
    write_export_folder(out, document, state, metrics, render_card(document, metrics, license_id, repo_id))
    verify_export(out, EXPORT_FORMAT)
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
    write_checksums(folder)


def write_export_folder(out: Path, document: dict, tensors: dict, metrics: dict, card: str) -> None:
    """Write the export files into a staging folder that replaces `out` once complete."""
    try:
        with staged_folder(out, EXPORT_KIND, is_legacy_export) as staging:
            write_export_files(staging, document, tensors, metrics, card)
    except OSError as error:
        raise BadInputError(f"cannot write the export to {out}: {error.strerror or error}") from error
