"""`ntkcl prepare NAME`: download or import, verify, lay out and manifest a dataset."""

from __future__ import annotations

import typer

from ntkcl.cli import _common
from ntkcl.data.registry import default_data_root, get_dataset


def prepare(
    name: str = typer.Argument(..., help="Dataset name (see `ntkcl datasets`)."),
    data_root: str | None = _common.DATA_ROOT_OPTION,
    source: str | None = typer.Option(
        None, "--from", help="A downloaded archive or folder to import instead of downloading."
    ),
    force: bool = typer.Option(False, "--force", help="Prepare again even if a valid manifest exists."),
    json_output: bool = _common.JSON_OPTION,
) -> None:
    """Prepare a dataset so `ntkcl train --stream NAME` can use it (idempotent)."""
    _common.set_json(json_output)
    plugin = get_dataset(name)
    root = _common.as_path(data_root) or default_data_root()
    already = plugin.is_prepared(root) and not force
    manifest = plugin.prepare(root, source=_common.as_path(source), force=force)
    result = {
        "dataset": name,
        "path": str(plugin.dataset_dir(root)),
        "already_prepared": already,
        "classes": len(manifest.classes),
        "splits": {split: len(rows) for split, rows in manifest.splits.items()},
        "manifest_sha256": manifest.sha256,
        "sources": manifest.sources,
    }
    if json_output:
        _common.emit(result)
        return
    counts = ", ".join(f"{split} {count}" for split, count in result["splits"].items())
    verb = "already prepared" if already else "prepared"
    _common.stdout.print(
        f"{name}: {verb} at {result['path']} ({len(manifest.classes)} classes; {counts})", highlight=False
    )
    _common.stdout.print(f"manifest sha256 {manifest.sha256}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare)
