"""Streamed, resumable, verified downloads against a local HTTP server."""

from __future__ import annotations

import os

import pytest

from ntkcl.data.download import ChecksumError, download
from ntkcl.data.plugin import RemoteFile
from ntkcl.errors import RunFailedError
from tests._dataserver import DataServer

PAYLOAD = os.urandom(300_000)


@pytest.fixture
def server():
    running = DataServer()
    yield running
    running.close()


def test_download_verifies_and_renames(server, tmp_path):
    remote = server.remote(RemoteFile("blob.bin", None), PAYLOAD, checksum="both")
    path, record = download(remote, tmp_path, "demo", backoff=0)
    assert path.read_bytes() == PAYLOAD
    assert not list(tmp_path.glob("*.partial"))
    assert record["verified"].startswith("sha256 matches")
    assert record["md5"] == remote.md5


def test_dropped_connection_resumes_with_range(server, tmp_path):
    remote = server.remote(RemoteFile("blob.bin", None), PAYLOAD)
    server.drop_after["/blob.bin"] = 100_000
    path, _ = download(remote, tmp_path, "demo", backoff=0)
    assert path.read_bytes() == PAYLOAD
    ranges = [spec for name, spec in server.requests if name == "/blob.bin"]
    assert ranges == [None, "bytes=100000-"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    remote = server.remote(RemoteFile("blob.bin", None), PAYLOAD)
    server.ignore_range = True
    server.drop_after["/blob.bin"] = 50_000
    path, _ = download(remote, tmp_path, "demo", backoff=0)
    assert path.read_bytes() == PAYLOAD


def test_wrong_checksum_deletes_partial_and_says_so(server, tmp_path):
    remote = server.remote(RemoteFile("blob.bin", None), PAYLOAD)
    remote = RemoteFile(remote.name, remote.url, md5="0" * 32)
    with pytest.raises(ChecksumError, match="failed verification.*deleted the partial file"):
        download(remote, tmp_path, "demo", backoff=0)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_fails_without_retrying(server, tmp_path):
    remote = RemoteFile("absent.bin", server.url + "/absent.bin", md5="0" * 32)
    with pytest.raises(RunFailedError, match="404"):
        download(remote, tmp_path, "demo", backoff=0)
    assert len(server.requests) == 1


def test_gives_up_after_retries(server, tmp_path):
    remote = server.remote(RemoteFile("blob.bin", None), PAYLOAD)
    dropping = {"/blob.bin": 10}

    class AlwaysDrop(dict):
        def pop(self, key, default=None):
            return dropping.get(key, default)

    server.drop_after = AlwaysDrop()
    with pytest.raises(RunFailedError, match="failed"):
        download(remote, tmp_path, "demo", retries=2, backoff=0)
    assert len(server.requests) == 3


def test_mirror_rewrites_url(server, tmp_path, monkeypatch):
    server.add("/mirror/demo/blob.bin", PAYLOAD)
    remote = server.remote(RemoteFile("blob.bin", "https://example.invalid/blob.bin"), PAYLOAD)
    remote = RemoteFile("blob.bin", "https://example.invalid/blob.bin", md5=remote.md5)
    monkeypatch.setenv("NTKCL_MIRROR", server.url + "/mirror/")
    path, record = download(remote, tmp_path, "demo", backoff=0)
    assert path.read_bytes() == PAYLOAD
    assert record["origin"] == server.url + "/mirror/demo/blob.bin"


def test_verified_copy_is_reused(server, tmp_path):
    remote = server.remote(RemoteFile("blob.bin", None), PAYLOAD)
    download(remote, tmp_path, "demo", backoff=0)
    download(remote, tmp_path, "demo", backoff=0)
    assert len(server.requests) == 1
