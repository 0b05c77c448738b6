"""Every registered method on the bundled digits stream, over several seeds, against SimpleCIL.

Each run is `ntkcl train --stream digits --method M --seed S` in a fresh process (what a user types), so
methods added to the registry later are included without editing this file. Per method: A_T, forgetting,
wall and CPU seconds (mean and standard deviation over the seeds), the backbone its digits preset uses, and
whether its mean A_T beats SimpleCIL's on that same backbone (the no-training reference each run computes).
`--backbone NAME` runs every method on that backbone instead of its preset's (a method that cannot hook into
it is listed as failed, with the reason); `--random-reference` adds SimpleCIL on the random initialisation of
the same backbone (`--no-pretrained`), which says whether pre-trained features mean anything. Prints one JSON object; `--markdown` also
prints the table the README shows.

    python benchmarks/digits_methods.py --seeds 0 1 2 --random-reference --markdown
    python benchmarks/digits_methods.py --backbone ntkcl-tiny-fdsl --random-reference --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = "simplecil"


def registered_methods() -> list[str]:
    from ntkcl.methods.registry import discover_methods

    return sorted(name for name, item in discover_methods().items() if item.ok)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(method: str, seed: int, out: Path, data_root: Path, extra: list[str]) -> dict:
    """One `ntkcl train` process: its metrics, the backbone it recorded, wall and CPU seconds."""
    argv = [sys.executable, "-m", "ntkcl", "train", "--stream", "digits", "--method", method, "--seed", str(seed)]
    argv += ["--out", str(out), "--data-root", str(data_root), "-q", "--json", *extra]
    started, cpu_started = time.perf_counter(), _children_cpu_seconds()
    finished = subprocess.run(argv, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, _children_cpu_seconds() - cpu_started
    if finished.returncode != 0:
        return {"seed": seed, "error": finished.stderr.strip().splitlines()[-1:] or ["failed"]}
    result = json.loads(finished.stdout)
    metrics = result["metrics"]
    record = json.loads((Path(result["run_dir"]) / "run.json").read_text())["backbone"]
    reference = metrics.get("no_training_reference") or {}
    return {
        "seed": seed,
        "final_accuracy": metrics["final_accuracy"],
        "forgetting": metrics["forgetting"],
        "reference_final_accuracy": reference.get("final_accuracy", metrics["final_accuracy"]),
        "backbone": record["name"] + ("" if record.get("pretrained") else " (random init)"),
        "wall_s": wall,
        "cpu_s": cpu,
    }


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def summarise(method: str, runs: list[dict]) -> dict:
    good = [run for run in runs if "error" not in run]
    if not good:
        return {"method": method, "runs": runs, "error": runs[0]["error"]}
    summary = {"method": method, "backbone": good[0]["backbone"], "runs": runs}
    for key in ("final_accuracy", "forgetting", "reference_final_accuracy", "wall_s", "cpu_s"):
        summary[key] = _mean_std([run[key] for run in good])
    summary["beats_simplecil"] = summary["final_accuracy"]["mean"] > summary["reference_final_accuracy"]["mean"]
    return summary


def markdown(rows: list[dict], seeds: list[int]) -> str:
    lines = [
        f"| method | backbone | A_T (mean ± sd, seeds {', '.join(map(str, seeds))}) | forgetting | SimpleCIL A_T "
        "(same backbone) | beats SimpleCIL | wall s / run | CPU s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | - | failed: {row['error'][0]} | | | | | |")
            continue
        accuracy, forgetting = row["final_accuracy"], row["forgetting"]
        beats = (
            "(reference)" if row["method"].startswith(REFERENCE) else ("yes" if row["beats_simplecil"] else "**no**")
        )
        lines.append(
            f"| {row['method']} | {row['backbone']} | {accuracy['mean']:.2f} ± {accuracy['std']:.2f} | "
            f"{forgetting['mean']:.2f} ± {forgetting['std']:.2f} | {row['reference_final_accuracy']['mean']:.2f} | "
            f"{beats} | {row['wall_s']['mean']:.0f} | {row['cpu_s']['mean']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="default: every registered method")
    parser.add_argument("--backbone", help="run every method on this backbone (default: each preset's)")
    parser.add_argument("--random-reference", action="store_true", help="also SimpleCIL with --no-pretrained")
    parser.add_argument("--markdown", action="store_true", help="also print the README table (after the JSON)")
    args = parser.parse_args()
    methods = args.methods or registered_methods()
    backbone = ["--backbone", args.backbone] if args.backbone else []
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        out, data_root = Path(scratch) / "runs", Path(scratch) / "data"
        for method in methods:
            runs = [run_once(method, seed, out, data_root, backbone) for seed in args.seeds]
            rows.append(summarise(method, runs))
            print(json.dumps({"done": method}), file=sys.stderr, flush=True)
        random_reference = None
        if args.random_reference:
            runs = [run_once(REFERENCE, seed, out, data_root, [*backbone, "--no-pretrained"]) for seed in args.seeds]
            random_reference = summarise(REFERENCE, runs)
    document = {
        "benchmark": "digits_methods",
        "seeds": args.seeds,
        "backbone": args.backbone or "each method's digits preset",
        "host": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "methods": rows,
        "simplecil_random_init": random_reference,
    }
    print(json.dumps(document, indent=2))
    if args.markdown:
        table = rows + ([{**random_reference, "method": f"{REFERENCE} --no-pretrained"}] if random_reference else [])
        print(markdown(table, args.seeds))


if __name__ == "__main__":
    main()
