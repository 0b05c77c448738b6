"""The Hugging Face Hub side of exports: push an export folder, download one back.

Pushing creates the repo when needed and uploads a temporary copy of the folder in one commit. A README.md
on the Hub that is not the unedited card of an earlier ntkcl export (see `card.card_is_generated`) is
kept unless `force`. The token is never printed: messages that could echo it are scrubbed.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ntkcl
from ntkcl.errors import BadInputError, RunFailedError
from ntkcl.export.card import card_is_generated
from ntkcl.export.checksums import verify_export
from ntkcl.export.constants import CARD_NAME, CONFIG_NAME, EXPORT_FILES, LEGACY_NAMES, LIBRARY_NAME, export_path


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if the Hub would accept it (`huggingface_hub.utils.validate_repo_id`), else a BadInputError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise BadInputError(f"{repo_id!r} is not a valid Hub repo id: {_first_line(error, None)}") from error
    return repo_id


def resolve_token(token: str | None) -> str:
    """--token, else HF_TOKEN, else the saved `hf auth login` token."""
    from huggingface_hub import get_token

    found = token or get_token()
    if not found:
        raise BadInputError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token")
    return found


def _scrub(message: str, token: str | None) -> str:
    text = " ".join(str(message).split())
    return text.replace(token, "***") if token else text


def _first_line(error: Exception, token: str | None) -> str:
    lines = str(error).strip().splitlines()
    return _scrub(lines[0] if lines else type(error).__name__, token)


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _hub_error(error: Exception, action: str, repo_id: str, token: str | None) -> Exception:
    """A BadInputError for what the user can fix (auth, permissions, names), RunFailedError otherwise."""
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    reason = _first_line(error, token)
    status = _status(error)
    if status in (401, 403) or isinstance(error, RepositoryNotFoundError):
        return BadInputError(
            f"cannot {action} {repo_id}: no write access with this token (HTTP {status}); "
            "check the token's write permission and the namespace"
        )
    if isinstance(error, (HFValidationError, RevisionNotFoundError)) or status in (400, 409, 422):
        return BadInputError(f"cannot {action} {repo_id}: {reason}")
    return RunFailedError(f"cannot {action} {repo_id}: {reason}")


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit: str | None
    revision: str | None
    private: bool | None  # None: the Hub's default for the namespace
    uploaded: list[str]
    readme: str  # "uploaded" or "kept"
    pull_request: str | None = None


def _api():
    from huggingface_hub import HfApi

    return HfApi(library_name=LIBRARY_NAME, library_version=ntkcl.__version__)


def resolve_repo_id(repo_id: str | None, token: str, dataset: str, method: str) -> str:
    """`repo_id` checked for shape, or `<user>/ntkcl-<dataset>-<method>` with the token's user name."""
    if repo_id is None:
        try:
            user = _api().whoami(token=token)["name"]
        except Exception as error:
            raise _hub_error(error, "identify the owner of the token for", "the default repo", token) from error
        repo_id = f"{user}/ntkcl-{dataset}-{method}"
    return check_repo_id(repo_id)


def default_commit_message(document: dict) -> str:
    final = (document.get("metrics") or {}).get("final_accuracy")
    score = f", A_T {final:.2f}%" if final is not None else ""
    tasks = f"{document['finished_tasks']}/{document['num_tasks']} tasks"
    return f"ntkcl {ntkcl.__version__}: {document['method']} on {document['stream']['dataset']} ({tasks}{score})"


def check_can_push(token: str | None) -> str:
    """Fail before any work when a push cannot happen (offline mode, no token); returns the token."""
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        raise BadInputError("HF_HUB_OFFLINE is set: --hub needs the network (unset it, or export and push later)")
    return resolve_token(token)


def _remote_card(api, repo_id: str, revision: str | None, token: str, workdir: Path) -> str | None:
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        if not api.file_exists(repo_id, CARD_NAME, revision=revision, token=token):
            return None
        path = api.hf_hub_download(repo_id, CARD_NAME, revision=revision, token=token, local_dir=workdir)
    except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError):
        return None
    return Path(path).read_text(encoding="utf-8")


def push_export(
    folder: Path,
    document: dict,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    force: bool = False,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> PushResult:
    """Upload an export folder to the Hub in one commit (the local folder is never modified).

    Args:
        folder: the export folder.
        document: its ntkcl_config.json (for the default commit message).
        repo_id: the target repo, created when missing.
        private: visibility of a repo created now (None: the Hub's default for the namespace); an existing
            repo keeps its visibility.
        revision: the branch to commit to (created when missing).
        token: default: HF_TOKEN or the saved login.
        force: replace a README.md that was edited on the Hub.
        create_pr: open a pull request with the files instead of committing to the branch.
        commit_message: default: method, stream, finished tasks and A_T.
    """
    token = check_can_push(token)
    verify_export(folder, document.get("export_format", 0))
    api = _api()
    try:
        url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    except Exception as error:
        raise _hub_error(error, "create", repo_id, token) from error
    with tempfile.TemporaryDirectory(prefix="ntkcl-push-") as workdir:
        staging = Path(workdir) / "export"
        staging.mkdir()
        for name in EXPORT_FILES:
            shutil.copy2(folder / name, staging / name)
        readme = "uploaded"
        try:
            remote = _remote_card(api, repo_id, revision, token, Path(workdir) / "remote")
            if remote is not None and not card_is_generated(remote) and not force:
                (staging / CARD_NAME).unlink()
                readme = "kept"
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                repo_type="model",
                revision=revision,
                token=token,
                commit_message=commit_message or default_commit_message(document),
                create_pr=create_pr,
                commit_description=f"Exported with `ntkcl export` from run {document['training']['run']}.",
            )
        except Exception as error:
            raise _hub_error(error, "upload to", repo_id, token) from error
        uploaded = sorted(p.name for p in staging.iterdir())
    return PushResult(
        repo_id=repo_id,
        url=str(url),
        commit=getattr(info, "commit_url", None) or str(info),
        revision=revision,
        private=private,
        uploaded=uploaded,
        readme=readme,
        pull_request=getattr(info, "pr_url", None),
    )


def download_export(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> Path:
    """The local snapshot of a Hub repo's export (from the cache only with `local_files_only` or HF_HUB_OFFLINE)."""
    from huggingface_hub import is_offline_mode, snapshot_download

    check_repo_id(repo_id)
    local_only = local_files_only or is_offline_mode()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            allow_patterns=[*EXPORT_FILES, *LEGACY_NAMES.values()],  # exports before format 4 too
            cache_dir=cache_dir,
            force_download=force_download,
            library_name=LIBRARY_NAME,
            library_version=ntkcl.__version__,
            local_files_only=local_only,
        )
    except Exception as error:
        if local_only:
            why = "HF_HUB_OFFLINE is set" if is_offline_mode() else "local_files_only"
            raise BadInputError(f"{repo_id} is not a local folder and not in the Hugging Face cache ({why})") from error
        status = _status(error)
        if status in (401, 403, 404) or type(error).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
            raise BadInputError(
                f"{repo_id} is not a local folder, and no Hub repo of that name is readable with your token"
            ) from error
        if type(error).__name__ in ("RevisionNotFoundError", "HFValidationError"):
            raise BadInputError(f"cannot load {repo_id}: {_first_line(error, token)}") from error
        raise RunFailedError(f"cannot download {repo_id}: {_first_line(error, token)}") from error
    folder = Path(folder)
    if not export_path(folder, CONFIG_NAME).is_file():
        raise BadInputError(f"Hub repo {repo_id} holds no {CONFIG_NAME}; it is not an ntkcl export")
    return folder
