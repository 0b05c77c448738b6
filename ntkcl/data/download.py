"""Verified downloads: streamed to a `.partial` file, resumed with HTTP Range, retried with back-off.

A download is complete only once its bytes match the published checksum (every digest the plugin pins:
sha256 and/or md5, plus the size when known); the verified file is then renamed from `NAME.partial` to
`NAME`. A mismatch deletes the partial file, since resuming onto wrong bytes can never succeed.

Mirrors: with `NTKCL_MIRROR=https://host/path` (or a `file://` URL) every file is fetched from
`$NTKCL_MIRROR/<dataset>/<file name>` instead of its upstream URL. The checksums stay the pinned upstream
ones, so a mirror only has to serve the same bytes; it is trusted for nothing else.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ntkcl.data.plugin import RemoteFile
from ntkcl.errors import BadInputError, RunFailedError

MIRROR_ENV = "NTKCL_MIRROR"
PARTIAL_SUFFIX = ".partial"
CHUNK_SIZE = 1 << 20
USER_AGENT = "ntkcl-prepare"
# Exceptions after which a retry (resuming from the bytes already on disk) can help.
TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


class ChecksumError(RunFailedError):
    """The bytes do not match the published checksum."""


@dataclass(frozen=True)
class Digests:
    size: int
    md5: str
    sha256: str


def file_digests(path: Path) -> Digests:
    """md5 and sha256 of a file in one pass."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_SIZE):
            md5.update(block)
            sha256.update(block)
            size += len(block)
    return Digests(size, md5.hexdigest(), sha256.hexdigest())


def mismatch(remote: RemoteFile, digests: Digests) -> str | None:
    """Why `digests` do not match what `remote` pins, or None when every pinned value matches."""
    if remote.size is not None and digests.size != remote.size:
        return f"size {digests.size} bytes, expected {remote.size}"
    if remote.sha256 and digests.sha256 != remote.sha256.lower():
        return f"sha256 {digests.sha256}, expected {remote.sha256}"
    if remote.md5 and digests.md5 != remote.md5.lower():
        return f"md5 {digests.md5}, expected {remote.md5}"
    return None


def verification_record(remote: RemoteFile, digests: Digests, origin: str) -> dict:
    """What the manifest records about one input file."""
    verified = remote.checksum_kind != "none"
    return {
        "file": remote.name,
        "origin": origin,
        "size": digests.size,
        "md5": digests.md5,
        "sha256": digests.sha256,
        "verified": f"{remote.checksum_kind} matches the published value" if verified else "unverified",
    }


def resolve_url(remote: RemoteFile, dataset: str) -> str:
    """The URL to fetch `remote` from: `$NTKCL_MIRROR/<dataset>/<name>` when a mirror is set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return f"{mirror.rstrip('/')}/{dataset}/{remote.name}"
    if remote.url is None:
        raise BadInputError(f"{remote.name} cannot be downloaded automatically")
    return remote.url


class _Progress:
    """Bytes, rate and ETA on stderr: a rich bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, label: str, total: int | None, done: int):
        self.label, self.total, self.done = label, total, done
        self.started = self.last_line = time.monotonic()
        self.start_bytes = done
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.task = self.bar.add_task(label, total=total, completed=done)
            self.bar.start()

    def advance(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
            return
        now = time.monotonic()
        if now - self.last_line >= 5.0:
            self.last_line = now
            self._line()

    def _line(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (self.done - self.start_bytes) / elapsed
        parts = [f"{self.label}: {self.done / 1e6:.1f}"]
        if self.total:
            parts[0] += f"/{self.total / 1e6:.1f} MB ({100 * self.done / self.total:.0f}%)"
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            parts.append(f"{rate / 1e6:.1f} MB/s, ETA {eta:.0f} s" if eta != float("inf") else "")
        else:
            parts[0] += " MB"
            parts.append(f"{rate / 1e6:.1f} MB/s")
        sys.stderr.write(" ".join(p for p in parts if p) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        else:
            self._line()


def _fetch_once(url: str, partial: Path, label: str, expected_size: int | None, timeout: float) -> None:
    """Append the missing bytes of `url` to `partial` (resuming with Range); raises on a broken transfer."""
    have = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and have > expected_size:
        have = 0  # a stale partial file longer than the real one
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have and (expected_size is None or have == expected_size):
            return  # already complete: the server has nothing after our last byte
        raise
    with response:
        status = getattr(response, "status", None) or 200
        resumed = status == 206
        if have and not resumed:
            have = 0  # the server ignored the Range request: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else expected_size
        progress = _Progress(label, total, have)
        received = 0
        try:
            with open(partial, "ab" if resumed else "wb") as handle:
                while block := response.read(CHUNK_SIZE):
                    handle.write(block)
                    received += len(block)
                    progress.advance(len(block))
        finally:
            progress.close()
        if length is not None and received < int(length):
            raise http.client.IncompleteRead(b"", int(length) - received)


def download(
    remote: RemoteFile,
    directory: Path,
    dataset: str,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> tuple[Path, dict]:
    """Download `remote` into `directory` and verify it; returns (path, verification record).

    A verified copy already in `directory` is reused. Transient network errors are retried `retries`
    times, waiting `backoff * 2**attempt` seconds, each retry resuming where the last one stopped.

    Raises:
        ChecksumError: the complete file does not match its checksum (the partial file is deleted).
        RunFailedError: the server kept failing or refused the request.
    """
    url = resolve_url(remote, dataset)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / remote.name
    if target.is_file():
        digests = file_digests(target)
        if mismatch(remote, digests) is None:
            return target, verification_record(remote, digests, url)
        target.unlink()
    partial = directory / (remote.name + PARTIAL_SUFFIX)
    attempt = 0
    while True:
        try:
            _fetch_once(url, partial, f"{dataset}/{remote.name}", remote.size, timeout)
            break
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                partial.unlink(missing_ok=True)
                raise
            permanent = isinstance(error, urllib.error.HTTPError) and error.code < 500 and error.code != 429
            if permanent or not isinstance(error, TRANSIENT) or attempt >= retries:
                raise RunFailedError(f"downloading {url} failed: {error}") from error
        except http.client.HTTPException as error:
            if attempt >= retries:
                raise RunFailedError(f"downloading {url} failed: {error!r}") from error
        wait = backoff * 2**attempt
        attempt += 1
        sys.stderr.write(f"{remote.name}: transfer interrupted; retry {attempt}/{retries} in {wait:.0f} s\n")
        time.sleep(wait)
    digests = file_digests(partial)
    problem = mismatch(remote, digests)
    if problem:
        partial.unlink()
        raise ChecksumError(f"{remote.name} from {url} failed verification ({problem}); deleted the partial file")
    os.replace(partial, target)
    return target, verification_record(remote, digests, url)
