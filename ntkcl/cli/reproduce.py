"""`ntkcl reproduce TABLE`: a published table's runs as seed groups, compared with the published numbers."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ntkcl.cli import _common
from ntkcl.errors import BadInputError


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _list_tables(results: Path | None, json_output: bool) -> None:
    from ntkcl._entry_points import METHODS_GROUP, entry_point_names
    from ntkcl.results import load_tables

    available = set(entry_point_names(METHODS_GROUP))
    listed = []
    for name, table in load_tables(results).items():
        rows = table.results()
        missing = sorted({row.method for row in rows if row.method not in available})
        listed.append(
            {
                "table": name,
                "paper": table.paper.citation,
                "caption": table.spec.caption,
                "rows": len(rows),
                "methods": sorted({row.method for row in rows}),
                "missing_methods": missing,
                "origin": table.origin,
            }
        )
    if json_output:
        _common.emit({"tables": listed})
        return
    view = Table(title="Published tables (ntkcl reproduce TABLE)", title_justify="left")
    for header in ("table", "paper", "rows", "methods ntkcl lacks"):
        view.add_column(header)
    for entry in listed:
        view.add_row(entry["table"], entry["paper"], str(entry["rows"]), ", ".join(entry["missing_methods"]) or "-")
    _common.stdout.print(view)


def _print_plan(plan) -> None:
    view = Table(title=f"{plan.table.name}: runs (one seed group each)", title_justify="left")
    for header in ("group", "rows", "members", "data", "estimate", "status"):
        view.add_column(header)
    for run in plan.runs:
        members = " ".join(f"{seed}:{state}" for seed, state in run.member_states.items()) or "-"
        data = ", ".join(f"{need.name}{'' if need.ready else ' (to prepare)'}" for need in run.datasets) or "-"
        estimate = _duration(run.estimate_s) if run.runnable else "-"
        view.add_row(str(run.group_dir), str(len(run.rows)), members, data, estimate, run.problem or run.outcome)
    _common.stdout.print(view)
    needs = plan.datasets_to_prepare()
    if needs:
        _common.stdout.print("datasets to prepare:", highlight=False)
        for need in needs:
            _common.stdout.print(f"  {need.command}", highlight=False, markup=False)
    if plan.missing_methods:
        _common.stdout.print(
            f"methods this ntkcl lacks (their rows stay in the table): {', '.join(plan.missing_methods)}",
            highlight=False,
        )
    seconds, unknown = plan.estimate()
    line = f"estimated time left: {_duration(seconds)}"
    if unknown:
        line += f" plus {unknown} run(s) with no measured figure yet (the first finished seed of each measures it)"
    _common.stdout.print(line, highlight=False)


def _print_comparison(records: list[dict], title: str) -> None:
    from ntkcl.reproduce import COMPARISON_HEADERS, comparison_lines

    view = Table(title=title, title_justify="left")
    for header in COMPARISON_HEADERS:
        view.add_column(header, justify="right" if header in ("published", "ntkcl", "difference") else "left")
    for cells in comparison_lines(records):
        view.add_row(*cells)
    _common.stdout.print(view)


def reproduce(
    table: str | None = typer.Argument(None, metavar="TABLE", help="A table name (see --list)."),
    list_tables: bool = typer.Option(False, "--list", help="List the published tables and exit."),
    rows: str | None = typer.Option(
        None, "--rows", metavar="PATTERN", help="Only rows whose method/stream/metric matches (ntk-cl/*, */cifar100/*)."
    ),
    seeds: str | None = typer.Option(
        None, "--seeds", metavar="0,1,2|0-4", help="Seeds of every group (default: the table's, e.g. 0-4)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the runs, data to prepare and time; run nothing."),
    gpus: str | None = typer.Option(
        None, "--gpus", metavar="LIST", help="GPUs of this host for every run (0,1 or all)."
    ),
    results: Path | None = typer.Option(
        None,
        "--results",
        parser=_common.non_empty_path,
        metavar="FILE",
        help="Also read the tables of this results file (same TOML shape as ntkcl/results/*.toml).",
    ),
    data_root: Path | None = _common.DATA_ROOT_OPTION,
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        parser=_common.non_empty_path,
        metavar="DIR",
        help="Folder of the table's seed groups and outputs (default runs/TABLE).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    json_output: bool = _common.JSON_OPTION,
) -> None:
    """Reproduce a published table: its runs as resumable seed groups, then published vs ntkcl side by side.

    Rows sharing a configuration (method, stream preset, backbone, --set) share one group OUT/METHOD-STREAM/seed-K.
    Writes reproduce.json, reproduce.md and report/index.html into OUT. Rows of methods ntkcl lacks are listed as
    missing. Repeat the command to continue: finished members are skipped.
    """
    _common.set_json(json_output)
    if list_tables:
        if table is not None:
            raise BadInputError("--list shows every table; drop TABLE")
        _list_tables(results, json_output)
        return
    if table is None:
        raise BadInputError("name a TABLE (ntkcl reproduce --list shows them)")
    from ntkcl.engine.groups import parse_seeds
    from ntkcl.results import get_table

    chosen_seeds = parse_seeds(seeds) if seeds is not None else None
    gpu_list = None
    if gpus is not None:
        from ntkcl.cli.train import parse_gpus

        gpu_list = parse_gpus(gpus)
    published = get_table(table, results)
    selected = published.select(rows)
    folder = out if out is not None else Path("runs") / published.name
    from ntkcl.reproduce import compare, execute, make_plan, write_outputs

    with _common.warnings_after_checks():
        plan = make_plan(published, selected, folder, chosen_seeds, data_root, gpu_list)
    if dry_run:
        if json_output:
            _common.emit({"dry_run": True, **plan.record()})
            return
        _print_plan(plan)
        return
    from ntkcl.engine.progress import Reporter

    reporter = Reporter(enabled=not quiet)
    if not quiet and not json_output:
        _print_plan(plan)
    try:
        execute(plan, reporter)
    except KeyboardInterrupt:
        _common.fail(f"interrupted; finished tasks are saved; run the same command again to continue {folder}", 130)
    records = compare(plan)
    written = write_outputs(plan, records)
    if json_output:
        _common.emit({"dry_run": False, **written["document"], "files": written["files"]})
        return
    _print_comparison(records, f"{published.name}: published vs ntkcl")
    for path in written["files"]:
        _common.stdout.print(path, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)
