"""Wall time of the commands a user types before any training: `ntkcl --help`, `--version`, `ntkcl datasets`.

Each command runs as a fresh process (what a shell does), several times; prints one JSON object with the
median and the slowest run in seconds. The target is under 1.5 s each: the subcommands import torch and timm
only when they need them.

    python benchmarks/cli_startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "help": ["--help"],
    "version": ["--version"],
    "train_help": ["train", "--help"],
    "datasets": ["datasets", "--json"],
}


def time_command(argv: list[str], repeat: int, env: dict) -> dict:
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ntkcl", *argv], env=env, capture_output=True, check=True)
        seconds.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(seconds), 3), "max_s": round(max(seconds), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_root:
        env = {**os.environ, "NTKCL_DATA_ROOT": data_root}
        results = {name: time_command(argv, args.repeat, env) for name, argv in COMMANDS.items()}
    report = {
        "benchmark": "cli_startup",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "target_s": 1.5,
        "commands": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
