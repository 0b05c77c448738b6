"""`ntkcl datasets`: every dataset plugin, whether it is prepared, and the broken ones with their error; then every
composite stream with the member datasets it still lacks."""

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


READY = ("prepared", "generated on first use")


def _member_plugin(datasets: dict, member):
    """(the member's configured plugin or None, why it is unusable or None)."""
    from ntkcl.errors import BadInputError

    item = datasets.get(member.dataset)
    if item is None:
        return None, "not installed"
    if not item.ok:
        return None, "broken"
    try:
        return item.obj.configure(**member.options), None
    except BadInputError:
        return None, "bad options"


def stream_rows(root: Path) -> list[dict]:
    """Each composite stream: its members in task order, the total classes, and which members are missing."""
    from ntkcl.data.registry import discover_datasets, discover_streams

    datasets = discover_datasets()
    rows = []
    for name, item in discover_streams().items():
        if not item.ok:
            rows.append({"name": name, "distribution": item.distribution, "status": "broken", "error": item.error})
            continue
        definition = item.obj
        plugins = [_member_plugin(datasets, member) for member in definition.members]
        members = [
            {"dataset": m.dataset, "options": dict(m.options), "status": problem or _status(plugin, root)}
            for m, (plugin, problem) in zip(definition.members, plugins)
        ]
        missing = [m for m in members if m["status"] not in READY]
        usable = all(plugin is not None for plugin, _ in plugins)
        rows.append(
            {
                "name": name,
                "distribution": item.distribution,
                "tasks": len(members),
                "classes": sum(plugin.num_classes for plugin, _ in plugins) if usable else None,
                "scenario": definition.scenario,
                "zero_shot_required": definition.requires_zero_shot,
                "mixing": None if definition.mixing is None else f"VTAB-Sim{definition.mixing.similarity}",
                "members": members,
                "missing": [f"{m['dataset']} ({m['status']})" for m in missing],
                "status": "ready" if not missing else f"{len(missing)} of {len(members)} members missing",
                "description": definition.description,
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
    """List dataset plugins (classes, protocol init/increment, status, sizes, source distribution), then composite
    streams (members in task order and which of them are not prepared yet)."""
    _common.set_json(json_output)
    from ntkcl.data.registry import default_data_root

    root = data_root or default_data_root()
    rows = dataset_rows(root)
    streams = stream_rows(root)
    if json_output:
        _common.emit({"data_root": str(root), "datasets": rows, "streams": streams})
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
    _common.stdout.print(_stream_table(streams))


def _stream_table(rows: list[dict]) -> Table:
    table = Table(title="Composite streams (one dataset per task; missing members in red)", title_justify="left")
    for column in ("name", "tasks", "classes", "scenario", "members", "status", "from"):
        table.add_column(column)
    for row in rows:
        if row["status"] == "broken":
            table.add_row(row["name"], "-", "-", "-", "-", f"[red]broken: {row['error']}[/red]", row["distribution"])
            continue
        scenario = row["scenario"] + (", zero-shot" if row["zero_shot_required"] else "")
        scenario += f", {row['mixing']}" if row["mixing"] else ""
        table.add_row(
            row["name"],
            str(row["tasks"]),
            str(row["classes"] or "-"),
            scenario,
            ", ".join(
                member["dataset"] if member["status"] in READY else f"[red]{member['dataset']}[/red]"
                for member in row["members"]
            ),
            row["status"],
            row["distribution"],
        )
    return table


def register(app: typer.Typer) -> None:
    app.command("datasets")(datasets)
