"""A whole CIFAR-100 NTK-CL run, end to end, on a generated CIFAR-100-shaped dataset: wall time by phase.

1. Generates 50,000 training and 10,000 test images of 32x32 in the real CIFAR-100 python format (pickled
   dicts in `cifar-100-python/{train,test,meta}` inside a tar.gz); each class is a random colour pattern,
   each image that pattern shifted, with noise, so the run learns something.
2. Serves the tarball from 127.0.0.1 as an `NTKCL_MIRROR` and runs `ntkcl prepare cifar100` against it
   (in this process: the plugin pins the md5 of the real tarball, so its expected md5 and size are set to
   the generated file's; download, verification, extraction and layout are the real code).
3. Runs `ntkcl train --stream cifar100` in a subprocess with the preset unchanged (batch 16, 20 epochs,
   10 tasks, evaluation and a checkpoint after every task). No network on the machine: the ViT-B/16 has
   random weights (`--no-pretrained`; `--pretrained` uses cached weights), which costs the same time.
4. Prints JSON: total wall time split into generation, prepare and the training process, the time inside
   tasks (training, statistics, evaluation) and outside them (start-up, data loading, checkpoints) from the
   run's log.jsonl, compile seconds, the metrics, and on CUDA the GPU's busy fraction (nvidia-smi's
   utilization.gpu, sampled every 200 ms during training).

`--small` shrinks the dataset (20 training and 5 test images per class), the backbone (timm's `test_vit`
at 32 pixels, depth 2) and the epochs (1) so the same pipeline runs on a CPU in minutes.

    python benchmarks/cifar100_end_to_end.py [--small] [--work DIR] [--device auto] [-- EXTRA TRAIN ARGS]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

SMALL_TRAIN_ARGS = [
    "--backbone",
    "test_vit",
    "--set",
    "backbone.model_kwargs={img_size=32, patch_size=8, depth=2}",
    "--epochs",
    "1",
]


def cifar_shaped_tarball(train_per_class: int, test_per_class: int, class_names, seed: int = 0) -> bytes:
    """cifar-100-python.tar.gz with `train`, `test` and `meta` pickles in the official layout."""
    rng = np.random.default_rng(seed)
    classes = len(class_names)
    patterns = rng.integers(0, 256, size=(classes, 8, 8, 3)).repeat(4, axis=1).repeat(4, axis=2)

    def split(per_class: int, name: str) -> bytes:
        labels = np.repeat(np.arange(classes), per_class)
        rng.shuffle(labels)
        shifts = rng.integers(-3, 4, size=(len(labels), 2))
        images = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
        for index, (label, (dy, dx)) in enumerate(zip(labels, shifts, strict=True)):
            shifted = np.roll(patterns[label], (dy, dx), axis=(0, 1)).astype(np.int16)
            noise = rng.integers(-40, 41, size=shifted.shape)
            images[index] = np.clip(shifted + noise, 0, 255)
        batch = {
            "batch_label": f"{name} batch 1 of 1",
            "filenames": [f"generated_{name}_{i:05d}.png" for i in range(len(labels))],
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": images.transpose(0, 3, 1, 2).reshape(len(labels), 3072),  # row-major R, G, B planes
        }
        return pickle.dumps(batch, protocol=2)

    members = {
        "cifar-100-python/train": split(train_per_class, "training"),
        "cifar-100-python/test": split(test_per_class, "testing"),
        "cifar-100-python/meta": pickle.dumps(
            {"fine_label_names": list(class_names), "coarse_label_names": [f"group{g}" for g in range(20)]},
            protocol=2,
        ),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class MirrorServer:
    """Serves `folder` (laid out as `<dataset>/<file>`) on 127.0.0.1; the URL is an NTKCL_MIRROR."""

    def __init__(self, folder: Path):
        handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def prepare(tarball: Path, data_root: Path, mirror: str) -> dict:
    """`ntkcl prepare cifar100` through the mirror, with the plugin expecting the generated file."""
    from ntkcl.cli import main
    from ntkcl.plugins import cifar100

    body = tarball.read_bytes()
    cifar100.plugin.files = (replace(cifar100.TARBALL, size=len(body), md5=hashlib.md5(body).hexdigest()),)
    os.environ["NTKCL_MIRROR"] = mirror
    started = time.perf_counter()
    try:
        main(["prepare", "cifar100", "--data-root", str(data_root), "--json"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"ntkcl prepare exited {exit_.code}") from None
    return {"seconds": time.perf_counter() - started, "tarball_mb": len(body) / 2**20}


class GpuBusySampler:
    """nvidia-smi's utilization.gpu (share of time a kernel was running) every 200 ms, in the background."""

    def __init__(self, device_id: str):
        command = [
            "nvidia-smi",
            f"--id={device_id}",
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
            "-lms",
            "200",
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.samples: list[float] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line) / 100)

    def stop(self) -> dict:
        self.process.terminate()
        self.process.wait()
        self.thread.join()
        busy = sum(self.samples) / len(self.samples) if self.samples else None
        return {"busy_fraction": busy, "samples": len(self.samples)}


def phase_split(run_dir: Path, train_process_s: float) -> dict:
    """What the run's log.jsonl splits out: per task the time from its start to its evaluation's end
    (training, end-of-task statistics, evaluation), the epochs' images/s, compile seconds; the rest of the process (start-up, data loading, backbone, checkpoints) is `outside_tasks_s`."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    tasks = [record for record in records if record.get("event") == "task_end"]
    epochs = [record for record in records if record.get("event") == "epoch_end"]
    task_seconds = sum(record["seconds"] for record in tasks)
    return {
        "tasks_s": round(task_seconds, 2),
        "epoch_images_per_s": [round(record["images_per_s"], 1) for record in epochs],
        "outside_tasks_s": round(train_process_s - task_seconds, 2),
        "compile_s": sum(record.get("compile_s", 0.0) for record in tasks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="shrink data, backbone and epochs (CPU check)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pretrained", action="store_true", help="use the preset's cached pre-trained weights")
    parser.add_argument("train_args", nargs="*", help="extra `ntkcl train` arguments (after --)")
    args = parser.parse_args()
    from ntkcl.plugins.cifar100 import CLASS_NAMES

    work = args.work or Path(tempfile.mkdtemp(prefix="ntkcl-cifar-e2e-"))
    started = time.perf_counter()
    try:
        mirror_dir = work / "mirror" / "cifar100"
        mirror_dir.mkdir(parents=True, exist_ok=True)
        tarball = mirror_dir / "cifar-100-python.tar.gz"
        train_per_class, test_per_class = (20, 5) if args.small else (500, 100)
        generation_started = time.perf_counter()
        tarball.write_bytes(cifar_shaped_tarball(train_per_class, test_per_class, CLASS_NAMES))
        generated = time.perf_counter() - generation_started
        data_root, runs = work / "data", work / "runs"
        shutil.rmtree(data_root, ignore_errors=True)
        server = MirrorServer(work / "mirror")
        try:
            prepared = prepare(tarball, data_root, server.url)
        finally:
            server.close()
        command = [sys.executable, "-m", "ntkcl", "train", "--stream", "cifar100", "--data-root", str(data_root)]
        command += ["--out", str(runs), "--device", args.device, "--json", "-q"]
        command += ([] if args.pretrained else ["--no-pretrained"]) + (SMALL_TRAIN_ARGS if args.small else [])
        command += args.train_args
        import torch

        on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        sampler = GpuBusySampler(visible) if on_cuda else None
        train_started = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True)
        train_seconds = time.perf_counter() - train_started
        gpu = sampler.stop() if sampler is not None else None
        if finished.returncode != 0:
            raise SystemExit(f"ntkcl train failed ({finished.returncode}): {finished.stderr.strip()[-2000:]}")
        result = json.loads(finished.stdout)
        run_dir = Path(result["run_dir"])
        metrics = result["metrics"]
        document = {
            "benchmark": "cifar100_end_to_end",
            "mode": "small (CPU check)" if args.small else "full preset",
            "images": {"train": 100 * train_per_class, "test": 100 * test_per_class},
            "command": " ".join(command[1:]),
            "device": json.loads((run_dir / "run.json").read_text())["device"],
            "generate_s": round(generated, 2),
            "prepare_s": round(prepared["seconds"], 2),
            "tarball_mb": round(prepared["tarball_mb"], 1),
            "train_process_s": round(train_seconds, 2),
            **phase_split(run_dir, train_seconds),
            "wall_s_prepare_and_train": round(prepared["seconds"] + train_seconds, 2),
            "gpu": gpu,
            "metrics": {key: metrics.get(key) for key in ("final_accuracy", "mean_incremental_accuracy", "forgetting")},
            "total_s": round(time.perf_counter() - started, 2),
        }
        print(json.dumps(document, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
