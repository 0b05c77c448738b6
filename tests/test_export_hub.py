"""`ntkcl export --hub` and loading from the Hub, against an in-memory Hub (no network).

A real push and pull runs only when NTKCL_TEST_HUB_REPO and HF_TOKEN are set.
"""

import importlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError

import ntkcl
from ntkcl.export import CARD_NAME, CONFIG_NAME, EXPORT_FILES, render_card
from ntkcl.files import FOLDER_MARKER
from tests.test_cli_bad_input import assert_one_line_error

TOKEN = "hf_secretTOKENvalue123"


def http_error(status: int, message: str) -> HfHubHTTPError:
    return HfHubHTTPError(message, response=hub_response(status, "https://huggingface.co/api/repos/create"))


def hub_response(status: int, url: str):
    """A response of the HTTP library huggingface_hub uses (httpx before 2.0, httpx2 since)."""
    http = importlib.import_module(huggingface_hub.errors.Response.__module__.split(".")[0])
    return http.Response(status, request=http.Request("POST", url))


class FakeHub:
    """Repos in memory; records every call the export makes through HfApi."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.calls: list[tuple[str, dict]] = []
        self.tokens: set = set()
        self.fail: dict[str, Exception] = {}

    def api(self, **kwargs):
        hub = self

        class Api:
            def __init__(self):
                hub.calls.append(("HfApi", kwargs))

            def _call(self, name, token, **details):
                hub.calls.append((name, details))
                hub.tokens.add(token)
                if name in hub.fail:
                    raise hub.fail[name]

            def whoami(self, token=None, **_):
                self._call("whoami", token)
                return {"name": "fake-user"}

            def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **_):
                self._call("create_repo", token, repo_id=repo_id, private=private, exist_ok=exist_ok)
                hub.repos.setdefault(repo_id, {"private": private, "files": {}, "commits": []})
                return f"https://huggingface.co/{repo_id}"

            def create_branch(self, repo_id, *, branch, token=None, exist_ok=False, **_):
                self._call("create_branch", token, repo_id=repo_id, branch=branch)

            def file_exists(self, repo_id, filename, *, revision=None, token=None, **_):
                self._call("file_exists", token, repo_id=repo_id, filename=filename)
                return filename in hub.repos[repo_id]["files"]

            def hf_hub_download(self, repo_id, filename, *, revision=None, token=None, local_dir=None, **_):
                self._call("hf_hub_download", token, repo_id=repo_id, filename=filename)
                target = Path(local_dir) / filename
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(hub.repos[repo_id]["files"][filename])
                return str(target)

            def upload_folder(
                self, *, repo_id, folder_path, commit_message=None, token=None, revision=None, create_pr=None, **kw
            ):
                files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
                self._call("upload_folder", token, repo_id=repo_id, files=sorted(files), message=commit_message)
                hub.calls[-1][1]["create_pr"] = create_pr
                if create_pr:
                    url = f"https://huggingface.co/{repo_id}/discussions/1"
                    return SimpleNamespace(commit_url=f"{url}/commit/def456", pr_url=url)
                hub.repos[repo_id]["files"].update(files)
                hub.repos[repo_id]["commits"].append(commit_message)
                return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123", pr_url=None)

        return Api()

    def called(self, name):
        return [details for call, details in self.calls if call == name]


def set_offline(monkeypatch, offline: bool) -> None:
    """HF_HUB_OFFLINE as huggingface_hub reads it (once, at import: its `constants` module)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    set_offline(monkeypatch, False)
    return hub


@pytest.fixture
def exporting(cli, run_of, tmp_path, caplog):
    """Run `ntkcl export RUN --out DIR ...` for the finetune run; asserts the token never shows."""
    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "export"

    def run(*flags):
        result = cli("export", run_of("finetune"), "--out", folder, *flags)
        assert TOKEN not in result.out + result.err + caplog.text
        return result, folder

    return run


def test_push_creates_the_repo_and_uploads_the_folder_in_one_commit(fake_hub, exporting):
    result, folder = exporting("--hub", "--private", "--json")
    assert result.code == 0, result.err
    repo_id = "fake-user/ntkcl-digits-finetune"
    assert result.json()["hub"]["repo_id"] == repo_id
    assert fake_hub.called("create_repo") == [{"repo_id": repo_id, "private": True, "exist_ok": True}]
    (upload,) = fake_hub.called("upload_folder")
    assert upload["files"] == sorted(EXPORT_FILES)
    assert upload["message"].startswith(f"ntkcl {ntkcl.__version__}: finetune on digits (2/2 tasks, A_T ")
    assert fake_hub.tokens == {TOKEN}
    assert fake_hub.repos[repo_id]["private"] is True
    assert fake_hub.repos[repo_id]["files"][CONFIG_NAME] == (folder / CONFIG_NAME).read_bytes()
    assert f'ContinualModel.from_pretrained("{repo_id}")' in (folder / CARD_NAME).read_text()
    assert ("HfApi", {"library_name": "ntkcl", "library_version": ntkcl.__version__}) in fake_hub.calls


def test_private_is_three_state_like_hf_upload(fake_hub, exporting):
    for flags, sent in (((), None), (("--private",), True), (("--no-private",), False)):
        result, _ = exporting("--hub", *flags, "--json")
        assert result.code == 0, result.err
        assert fake_hub.called("create_repo")[-1]["private"] is sent  # None: the namespace's default applies
        assert result.json()["hub"]["private"] is sent


def test_repo_id_revision_token_commit_message_and_pull_request(fake_hub, exporting, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result, _ = exporting("--hub", "--repo-id", "team/my-adapters", "--revision", "v1", "--token", TOKEN)
    assert result.code == 0, result.err
    assert fake_hub.called("whoami") == []
    assert fake_hub.called("create_branch") == [{"repo_id": "team/my-adapters", "branch": "v1"}]

    flags = ("--hub", "--repo-id", "team/my-adapters", "--token", TOKEN, "--json")
    result, _ = exporting(*flags, "--create-pr", "--commit-message", "Adapters after task 2")
    assert result.code == 0, result.err
    upload = fake_hub.called("upload_folder")[-1]
    assert (upload["message"], upload["create_pr"]) == ("Adapters after task 2", True)
    assert result.json()["hub"]["pull_request"] == "https://huggingface.co/team/my-adapters/discussions/1"

    for bad in ("team/my--adapters", "datasets/team/x", "team/.hidden"):
        assert_one_line_error(exporting("--hub", "--repo-id", bad, "--token", TOKEN)[0], "not a valid Hub repo id")
    assert_one_line_error(exporting("--create-pr")[0], "only apply with --hub")


def test_a_readme_edited_on_the_hub_is_kept_unless_forced(fake_hub, exporting):
    repo_id = "fake-user/ntkcl-digits-finetune"
    fake_hub.repos[repo_id] = {"private": False, "files": {CARD_NAME: b"# My own words\n"}, "commits": []}
    result, _ = exporting("--hub", "--json")
    assert result.code == 0, result.err
    assert result.json()["hub"]["readme"] == "kept"
    assert "--force" in result.err
    assert CARD_NAME not in fake_hub.called("upload_folder")[0]["files"]
    assert fake_hub.repos[repo_id]["files"][CARD_NAME] == b"# My own words\n"

    result, folder = exporting("--hub", "--force", "--json")
    assert result.json()["hub"]["readme"] == "uploaded"
    assert fake_hub.repos[repo_id]["files"][CARD_NAME] == (folder / CARD_NAME).read_bytes()

    # The card ntkcl wrote last time, unedited, is replaced without --force.
    result, _ = exporting("--hub", "--json")
    assert result.json()["hub"]["readme"] == "uploaded"
    assert len(fake_hub.called("upload_folder")) == 3


def test_missing_token_and_offline_mode_are_bad_input(fake_hub, exporting, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    result, folder = exporting("--hub")
    assert_one_line_error(result, "no Hugging Face token", "HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    set_offline(monkeypatch, True)
    result, folder = exporting("--hub")
    assert_one_line_error(result, "HF_HUB_OFFLINE")
    assert not folder.exists()
    assert fake_hub.calls == []


@pytest.mark.parametrize("step", ["create_repo", "upload_folder"])
def test_no_write_access_is_bad_input_and_keeps_the_local_export(fake_hub, exporting, step):
    fake_hub.fail[step] = http_error(403, f"403 Forbidden: token {TOKEN} cannot write to this namespace")
    result, folder = exporting("--hub")
    assert_one_line_error(result, "no write access", "fake-user/ntkcl-digits-finetune", "local export")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*EXPORT_FILES, FOLDER_MARKER])
    assert ntkcl.load_pretrained(folder).predict(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_a_network_failure_during_upload_exits_1_without_the_token(fake_hub, exporting):
    fake_hub.fail["upload_folder"] = ConnectionError(f"connection reset (Authorization: Bearer {TOKEN})")
    result, folder = exporting("--hub")
    assert result.code == 1
    assert "connection reset" in result.err and "***" in result.err
    assert sorted(p.name for p in folder.iterdir()) == sorted([*EXPORT_FILES, FOLDER_MARKER])


def test_load_from_a_hub_repo_through_snapshot_download(cli, run_of, tmp_path, monkeypatch):
    folder = tmp_path / "export"
    assert cli("export", run_of("finetune"), "--out", folder).code == 0
    requests = []

    def fake_snapshot_download(repo_id, **kwargs):
        requests.append((repo_id, kwargs))
        if repo_id != "someone/ntkcl-digits-finetune":
            raise huggingface_hub.errors.RepositoryNotFoundError(
                "404", response=hub_response(404, "https://huggingface.co")
            )
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    set_offline(monkeypatch, False)
    result = cli("eval", "someone/ntkcl-digits-finetune", "--revision", "v1", "--json", "-q")
    assert result.code == 0, result.err
    assert result.json()["matches_export"] is True
    repo_id, kwargs = requests[-1]
    assert kwargs["revision"] == "v1" and kwargs["local_files_only"] is False
    # the export's files, and the two that exports before format 4 named as PEFT does
    assert set(kwargs["allow_patterns"]) == {*EXPORT_FILES, "adapter_model.safetensors", "adapter_config.json"}

    images = torch.rand(3, 3, 32, 32)
    cache = tmp_path / "elsewhere"
    from_hub = ntkcl.ContinualModel.from_pretrained(
        "someone/ntkcl-digits-finetune", cache_dir=cache, force_download=True, token="hf_x", revision="v2"
    )
    options = requests[-1][1]
    assert (options["cache_dir"], options["force_download"], options["token"], options["revision"]) == (
        cache,
        True,
        "hf_x",
        "v2",
    )
    assert torch.equal(from_hub.predict(images), ntkcl.load_pretrained(folder).predict(images))
    assert from_hub.source == "someone/ntkcl-digits-finetune"

    ntkcl.load_pretrained("someone/ntkcl-digits-finetune", local_files_only=True)
    assert requests[-1][1]["local_files_only"] is True
    set_offline(monkeypatch, True)
    ntkcl.load_pretrained("someone/ntkcl-digits-finetune")
    assert requests[-1][1]["local_files_only"] is True
    assert_one_line_error(cli("eval", "someone/not-cached"), "not in the Hugging Face cache")
    set_offline(monkeypatch, False)
    assert_one_line_error(cli("eval", "someone/missing"), "no Hub repo of that name")


def test_push_to_hub_from_python_keeps_the_backbone_out(fake_hub, run_of, tmp_path):
    folder = tmp_path / "export"
    exported = ntkcl.export.export_run(run_of("finetune"), folder)
    model = ntkcl.ContinualModel.from_pretrained(folder)
    url = model.push_to_hub("team/from-python", commit_message="first", private=True)
    assert url == "https://huggingface.co/team/from-python/commit/abc123"
    assert fake_hub.called("create_repo")[-1]["private"] is True
    uploaded = fake_hub.repos["team/from-python"]["files"]
    assert sorted(uploaded) == sorted(EXPORT_FILES)
    assert uploaded == {name: (folder / name).read_bytes() for name in EXPORT_FILES}
    assert exported.config["method"] == json.loads(uploaded[CONFIG_NAME])["method"]


def test_card_marker_survives_a_round_trip_through_render(run_of):
    from ntkcl.engine.run_reader import read_run_folder
    from ntkcl.export import build_export_config, card_is_generated

    document = build_export_config(read_run_folder(run_of("simplecil")))
    metrics = json.loads((run_of("simplecil") / "metrics.json").read_text())
    card = render_card(document, metrics, repo_id="a/b")
    assert card == render_card(document, metrics, repo_id="a/b")
    assert card_is_generated(card) and not card_is_generated(card + "\nmore\n")


@pytest.mark.skipif(
    not (os.environ.get("NTKCL_TEST_HUB_REPO") and os.environ.get("HF_TOKEN")),
    reason="set NTKCL_TEST_HUB_REPO=user/repo and HF_TOKEN for a real push and pull",
)
def test_real_push_and_pull(cli, run_of, tmp_path):
    repo_id = os.environ["NTKCL_TEST_HUB_REPO"]
    folder = tmp_path / "export"
    result = cli("export", run_of("finetune"), "--out", folder, "--hub", "--repo-id", repo_id, "--force", "--json")
    assert result.code == 0, result.err
    assert os.environ["HF_TOKEN"] not in result.out + result.err
    images = torch.rand(2, 3, 32, 32)
    pulled = ntkcl.load_pretrained(repo_id)
    assert torch.equal(pulled.predict(images), ntkcl.load_pretrained(folder).predict(images))
