"""`ntkcl prepare NAME`: download or import, verify, lay out and manifest a dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from ntkcl.cli import _common
from ntkcl.errors import BadInputError


def prepare(
    name: str = typer.Argument(
        ..., metavar="NAME", help="Dataset name (see `ntkcl datasets`).", autocompletion=_common.complete_datasets
    ),
    data_root: Path | None = _common.DATA_ROOT_OPTION,
    source: Path | None = typer.Option(
        None,
        "--from",
        parser=_common.non_empty_path,
        metavar="FILE_OR_DIR",
        help="A downloaded archive, or a folder holding the archives or the images, to import.",
    ),
    force: bool = typer.Option(False, "--force", help="Prepare again even if a valid manifest exists."),
    keep_downloads: bool = typer.Option(
        False, "--keep-downloads", help="Keep downloaded archives under DATA_ROOT/.downloads/ after preparing."
    ),
    resize_cache: int | None = typer.Option(
        None,
        "--resize-cache",
        min=32,
        metavar="PX",
        help="Also write copies resized to this shorter side (e.g. 256) that loaders read instead of the originals.",
    ),
    json_output: bool = _common.JSON_OPTION,
) -> None:
    """Prepare a dataset so `ntkcl train --stream NAME` can use it (idempotent: a second call only verifies).

    Public archives are downloaded (resumable, checksum-verified); author splits and login-only data are
    imported with `--from`. Set NTKCL_MIRROR=URL to fetch every file from URL/NAME/FILE instead.
    """
    _common.set_json(json_output)
    from ntkcl.data.extract import disk_errors
    from ntkcl.data.prepared import PreparedDataset
    from ntkcl.data.registry import check_data_root, default_data_root, get_dataset

    plugin = get_dataset(name)
    root = data_root or default_data_root()
    check_data_root(root)
    already = plugin.is_prepared(root) and not force
    options = {}
    if isinstance(plugin, PreparedDataset):
        options = {"keep_downloads": keep_downloads, "resize_cache": resize_cache}
    elif source is not None or resize_cache is not None:
        raise BadInputError(f"dataset {name!r} is generated or bundled: it takes no --from or --resize-cache")
    with disk_errors(root):
        manifest = plugin.prepare(root, source=source, force=force, **options)
    result = {
        "dataset": name,
        "path": str(plugin.dataset_dir(root)),
        "already_prepared": already,
        "classes": len(manifest.classes),
        "splits": {split: len(rows) for split, rows in manifest.splits.items()},
        "manifest_sha256": manifest.sha256,
        "sources": manifest.sources,
    }
    for record in manifest.sources:
        if not already and record.get("verified", "").startswith("unverified"):
            _common.stderr.print(
                f"warning: {record.get('origin')} could not be verified (no checksum is published); "
                f"its sha256 {record.get('sha256', '-')} is recorded in the manifest",
                highlight=False,
            )
    if json_output:
        _common.emit(result)
        return
    counts = ", ".join(f"{split} {count}" for split, count in result["splits"].items())
    verb = "already prepared (verified)" if already else "prepared"
    _common.stdout.print(
        f"{name}: {verb} at {result['path']} ({len(manifest.classes)} classes; {counts})", highlight=False
    )
    _common.stdout.print(f"manifest sha256 {manifest.sha256}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare)
