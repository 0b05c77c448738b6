"""A local HTTP server with Range support and a one-shot dropped connection, and builders of small archives
in the real formats of the benchmarks (CIFAR pickles, ImageFolder tarballs, zips)."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from ntkcl.data.plugin import RemoteFile


class DataServer:
    """Serves `files[path] = bytes` on 127.0.0.1; `drop_after[path] = n` cuts the next GET after n bytes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                server.requests.append((path, self.headers.get("Range")))
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                spec = self.headers.get("Range")
                if spec and not server.ignore_range:
                    start = int(spec.removeprefix("bytes=").split("-", 1)[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                cut = server.drop_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(payload[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.url + path

    def remote(self, remote: RemoteFile, body: bytes, checksum: str = "md5") -> RemoteFile:
        """`remote` served from here, with the size and checksum of `body`."""
        url = self.add(f"/{remote.name}", body)
        digests = {"md5": None, "sha256": None}
        if checksum in ("md5", "both"):
            digests["md5"] = hashlib.md5(body).hexdigest()
        if checksum in ("sha256", "both"):
            digests["sha256"] = hashlib.sha256(body).hexdigest()
        return replace(remote, url=url, size=len(body), **digests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def jpeg_bytes(seed: int, size: tuple[int, int] = (20, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz", extra=None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
        for info in extra or ():
            bundle.addfile(info)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def image_tree(prefix: str, classes: list[str], per_class: int, seed: int = 0) -> dict[str, bytes]:
    """`{prefix}{class}/{class}_{i}.jpg` members."""
    return {
        f"{prefix}{name}/{name}_{i}.jpg": jpeg_bytes(seed + 100 * c + i)
        for c, name in enumerate(classes)
        for i in range(per_class)
    }


def cifar_tarball(classes: list[str], train_per_class: int = 3, test_per_class: int = 1) -> bytes:
    def batch(per_class: int, seed: int) -> bytes:
        rng = np.random.default_rng(seed)
        labels = [c for c in range(len(classes)) for _ in range(per_class)]
        data = rng.integers(0, 255, size=(len(labels), 3072), dtype=np.uint8)
        return pickle.dumps({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)})

    return tar_bytes(
        {
            "cifar-100-python/train": batch(train_per_class, 0),
            "cifar-100-python/test": batch(test_per_class, 1),
            "cifar-100-python/meta": pickle.dumps({"fine_label_names": classes, "coarse_label_names": ["x"]}),
        }
    )
