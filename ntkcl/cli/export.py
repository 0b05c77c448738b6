"""`ntkcl export [RUN_DIR]`: a run as a PEFT-style folder (safetensors + config + model card), optionally on the Hub."""

from __future__ import annotations

from pathlib import Path

import typer

from ntkcl.cli import _common
from ntkcl.errors import BadInputError


def export(
    run_dir: Path | None = typer.Argument(
        None,
        parser=_common.non_empty_path,
        metavar="[RUN_DIR]",
        help="Run directory (default: the most recent run under ./runs).",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        parser=_common.non_empty_path,
        metavar="DIR",
        help="Export folder (default exports/<run name>).",
    ),
    hub: bool = typer.Option(False, "--hub", help="Also push the folder to the Hugging Face Hub."),
    repo_id: str | None = typer.Option(
        None, "--repo-id", metavar="USER/NAME", help="Hub repo (default <user>/ntkcl-<stream>-<method>)."
    ),
    private: bool | None = typer.Option(
        None,
        "--private/--no-private",
        help="Visibility of a repo created now (default: the Hub's default for the namespace).",
    ),
    revision: str | None = typer.Option(
        None, "--revision", metavar="BRANCH", help="Hub branch to push to (created if missing)."
    ),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing."),
    commit_message: str | None = typer.Option(
        None, "--commit-message", metavar="TEXT", help="Commit message (default: method, stream, tasks and A_T)."
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        metavar="TOKEN",
        help="Hub token (default: HF_TOKEN, then the saved login; prefer those to this flag).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace a README.md that was edited on the Hub."),
    license_id: str | None = typer.Option(
        None, "--license", metavar="ID", help="Hub licence id for the model card (default: the base weights' licence)."
    ),
    json_output: bool = _common.JSON_OPTION,
) -> None:
    """Export the learned state of a run: ntkcl_model.safetensors, ntkcl_config.json, config.json, README.md, metrics.json, checksums.sha256.

    A run that has not finished every task is exported as far as its finished tasks go; the output, the config (`"finished": false`, `finished_tasks`, `num_tasks`) and the model card say so. A run with no finished task is an error (exit 2).

    With --hub the folder is written first, then pushed in one commit (or a pull request with --create-pr); a failed push leaves it intact. The token comes from --token, else HF_TOKEN, else the saved login. Without --private/--no-private a new repo gets the Hub's default visibility; an existing repo keeps its own.
    """
    _common.set_json(json_output)
    from ntkcl import export as exporting
    from ntkcl.engine import rundir

    hub_options = (repo_id, private, revision, token, commit_message, force or None, create_pr or None)
    if not hub and any(option is not None for option in hub_options):
        raise BadInputError(
            "--repo-id, --private/--no-private, --revision, --token, --commit-message, --force and --create-pr "
            "only apply with --hub"
        )
    source = rundir.check_run_dir(run_dir) if run_dir is not None else rundir.latest_run(Path("runs"))
    if hub:
        from ntkcl.config import load_config
        from ntkcl.export.hub import check_can_push, resolve_repo_id

        token = check_can_push(token)
        settings = load_config(source / rundir.CONFIG_FILE)
        repo_id = resolve_repo_id(repo_id, token, settings.stream.dataset, settings.method.name)
    destination = out if out is not None else Path("exports") / source.name
    result = exporting.export_run(source, destination, license_id, repo_id)
    document = result.config
    summary = {
        "run_dir": str(source),
        "export_dir": str(result.folder),
        "files": result.files,
        "finished": result.finished,
        "finished_tasks": document["finished_tasks"],
        "num_tasks": document["num_tasks"],
    }
    if not result.finished:
        _common.stderr.print(
            f"warning: {source.name} has finished {document['finished_tasks']} of {document['num_tasks']} tasks; "
            "exported those (marked partial in the config and card)",
            highlight=False,
        )
    if not json_output:
        for name, size in result.files.items():
            _common.stdout.print(f"{size:>12,d}  {result.folder / name}", highlight=False)
    if hub:
        from ntkcl.errors import RunFailedError
        from ntkcl.export.hub import push_export

        try:
            pushed = push_export(
                result.folder,
                document,
                repo_id,
                private=private,
                revision=revision,
                token=token,
                force=force,
                create_pr=create_pr,
                commit_message=commit_message,
            )
        except (BadInputError, RunFailedError) as error:
            raise type(error)(f"{error} (the local export in {result.folder} is complete)") from error
        summary["hub"] = {
            "repo_id": pushed.repo_id,
            "url": pushed.url,
            "commit": pushed.commit,
            "revision": pushed.revision,
            "private": pushed.private,
            "uploaded": pushed.uploaded,
            "readme": pushed.readme,
            "pull_request": pushed.pull_request,
        }
        if not json_output:
            where = f"pull request {pushed.pull_request}" if pushed.pull_request else pushed.commit
            _common.stdout.print(f"pushed to {pushed.url} ({where})", highlight=False)
        if pushed.readme == "kept":
            _common.stderr.print(
                "kept the README.md edited on the Hub; pass --force to replace it with the generated card",
                highlight=False,
            )
    if json_output:
        _common.emit(summary)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
