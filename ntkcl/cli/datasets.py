"""`ntkcl datasets`: every dataset plugin, whether it is prepared, and the broken ones with their error."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ntkcl.cli import _common


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _status(plugin, root: Path) -> str:
    if plugin.is_prepared(root):
        return "prepared"
    if not plugin.needs_download:
        return "generated on first use"
    if plugin.needs_manual_file:
        return "needs manual file"
    return "not prepared"


def _acquisition(plugin) -> str:
    if not plugin.needs_download:
        return "generated"
    return "manual (--from)" if plugin.needs_manual_file else "download"


def dataset_rows(root: Path) -> list[dict]:
    from ntkcl.data.registry import discover_datasets

    rows = []
    for name, item in discover_datasets().items():
        if not item.ok:
            rows.append({"name": name, "distribution": item.distribution, "status": "broken", "error": item.error})
            continue
        plugin = item.obj
        folder = plugin.dataset_dir(root)
        rows.append(
            {
                "name": name,
                "distribution": item.distribution,
                "classes": plugin.num_classes,
                "protocol": f"{plugin.default_init_classes}/{plugin.default_increment}",
                "status": _status(plugin, root),
                "acquisition": _acquisition(plugin),
                "checksum": "/".join(sorted({f.checksum_kind for f in plugin.files})) or "-",
                "download_bytes": sum(f.size or 0 for f in plugin.files) or None,
                "prepared_bytes": _folder_size(folder) if plugin.is_prepared(root) else None,
                "path": str(folder),
                "homepage": plugin.homepage,
                "license": plugin.license,
            }
        )
    return rows


def _human(size: int | None) -> str:
    if not size:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return "-"


def datasets(
    data_root: Path | None = _common.DATA_ROOT_OPTION,
    json_output: bool = _common.JSON_OPTION,
) -> None:
    """List dataset plugins: classes, protocol (init/increment), status, sizes, source distribution."""
    _common.set_json(json_output)
    from ntkcl.data.registry import default_data_root

    root = data_root or default_data_root()
    rows = dataset_rows(root)
    if json_output:
        _common.emit({"data_root": str(root), "datasets": rows})
        return
    table = Table(title=f"Datasets (data root {root})", title_justify="left")
    for column in ("name", "classes", "init/inc", "status", "source", "checksum", "download", "on disk", "from"):
        table.add_column(column)
    for row in rows:
        if row["status"] == "broken":
            table.add_row(
                row["name"], "-", "-", f"[red]broken: {row['error']}[/red]", "-", "-", "-", "-", row["distribution"]
            )
            continue
        table.add_row(
            row["name"],
            str(row["classes"]),
            row["protocol"],
            row["status"],
            row["acquisition"],
            row["checksum"],
            _human(row["download_bytes"]),
            _human(row["prepared_bytes"]),
            row["distribution"],
        )
    _common.stdout.print(table)


def register(app: typer.Typer) -> None:
    app.command("datasets")(datasets)
