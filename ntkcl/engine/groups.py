"""Seed groups: one configuration trained once per seed, and the mean ± sd of its metrics.

A group folder holds one ordinary run directory per seed and `group.json`:

    runs/<group>/group.json      the shared configuration (seed fields left out), the seeds, the ntkcl version
    runs/<group>/seed-0/         a run directory (config.json, run.json, metrics.json, checkpoints/ ...)
    runs/<group>/seed-1/ ...

Seed K sets both the training seed (`runtime.seed`) and the class order (`stream.class_order_seed`, i.e.
`np.random.seed(K); np.random.permutation(n)`), as NTK-CL does with seeds 0-4 (one class order per seed). A
stream whose configuration fixes the class order explicitly (`stream.class_order`, CL-LoRA's VTAB) keeps it, and
so does a composite stream (one dataset per task, MTIL, VTAB5T): then the seed only drives training.

Members are independent: each resumes on its own from its last finished task (or in-task snapshot), and a
member whose metrics say `finished` is never trained again, so repeating the command skips finished seeds.

Aggregates use the sample standard deviation (n - 1 in the denominator); a single member has no sd.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ntkcl import __version__
from ntkcl.config import MAX_INTEGER, RunConfig, save_config, validate
from ntkcl.engine import rundir
from ntkcl.errors import BadInputError

GROUP_FILE = "group.json"
MEMBER_PREFIX = "seed-"
GROUP_FORMAT = 1
# A span like 0-99999999 is a typo, not an experiment.
MAX_MEMBERS = 1000
# Fields that differ between members (the seeds) or only say where and how fast a member runs: a group
# continued on another machine, with more workers or more GPUs, is still the same experiment.
PER_SEED_FIELDS = (("runtime", "seed"), ("stream", "class_order_seed"))
PLACEMENT_FIELDS = (
    ("runtime", "device"),
    ("runtime", "num_workers"),
    ("runtime", "gpus"),
    ("runtime", "nproc"),
    ("runtime", "log"),
    ("runtime", "compile"),
    ("stream", "data_root"),
    ("data", "feed"),
    ("data", "feed_memory_fraction"),
)
# The metrics a group summarises: the class-incremental ones, then MTIL's (task-incremental streams only).
GROUP_METRICS = (
    "final_accuracy",
    "mean_incremental_accuracy",
    "forgetting",
    "backward_transfer",
    "transfer",
    "avg",
    "last",
)
METRIC_LABELS = {
    "final_accuracy": "A_T",
    "mean_incremental_accuracy": "mean incremental",
    "forgetting": "forgetting",
    "backward_transfer": "BWT",
    "transfer": "MTIL Transfer",
    "avg": "MTIL Avg",
    "last": "MTIL Last",
}


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` or `0-4` (or a mix, `0-2,7`) -> sorted distinct seeds; BadInputError otherwise."""
    seeds: set[int] = set()
    for part in (piece.strip() for piece in text.split(",")):
        single = re.fullmatch(r"[0-9]+", part)
        span = re.fullmatch(r"([0-9]+)-([0-9]+)", part)
        if single:
            seeds.add(int(part))
        elif span and int(span[1]) <= int(span[2]):
            seeds.update(range(int(span[1]), int(span[2]) + 1))
        else:
            raise BadInputError(f"--seeds expects seeds like 0,1,2 or 0-4, got {text!r}")
    if max(seeds) > MAX_INTEGER:
        raise BadInputError(f"--seeds: a seed must be at most {MAX_INTEGER}, got {max(seeds)}")
    if len(seeds) > MAX_MEMBERS:
        raise BadInputError(f"--seeds: at most {MAX_MEMBERS} seeds in one group, got {len(seeds)}")
    return sorted(seeds)


def member_name(seed: int) -> str:
    return f"{MEMBER_PREFIX}{seed}"


def member_config(config: RunConfig, seed: int) -> RunConfig:
    """`config` with seed `seed` for training and, unless the class order is given explicitly, the class order."""
    document = config.model_dump(mode="json")
    document["runtime"]["seed"] = seed
    if document["stream"]["class_order"] is None and not document["stream"].get("members"):
        document["stream"]["class_order_seed"] = seed
    return validate(document)


def shared_configuration(config: RunConfig) -> dict:
    """What every member of a group shares: the config without the per-seed and placement fields."""
    document = config.model_dump(mode="json")
    for section, key in (*PER_SEED_FIELDS, *PLACEMENT_FIELDS):
        document[section].pop(key, None)
    return document


def _differences(left: object, right: object, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON documents differ."""
    if isinstance(left, dict) and isinstance(right, dict):
        found = []
        for key in sorted(set(left) | set(right)):
            found += _differences(left.get(key), right.get(key), f"{prefix}{key}.")
        return found
    return [] if left == right else [prefix.rstrip(".")]


def is_group(path: Path) -> bool:
    return (path / GROUP_FILE).is_file()


@dataclass
class Member:
    seed: int
    path: Path

    @property
    def started(self) -> bool:
        return (self.path / rundir.CONFIG_FILE).is_file()

    def metrics(self) -> dict | None:
        """metrics.json once a task has finished, else None."""
        file = self.path / rundir.METRICS_FILE
        return rundir.read_json(file) if file.is_file() else None

    @property
    def finished(self) -> bool:
        metrics = self.metrics()
        return bool(metrics and metrics.get("finished"))

    @property
    def state(self) -> str:
        if self.finished:
            return "finished"
        return "partial" if self.started else "new"


@dataclass
class Group:
    """A group folder and its `group.json`."""

    path: Path
    seeds: list[int]
    configuration: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def members(self) -> list[Member]:
        return [Member(seed, self.path / member_name(seed)) for seed in self.seeds]

    def member(self, seed: int) -> Member:
        return Member(seed, self.path / member_name(seed))

    @classmethod
    def load(cls, path: Path) -> Group:
        """Read and check `group.json` (BadInputError naming what is wrong)."""
        if not path.is_dir():
            raise BadInputError(f"group {path} does not exist")
        if not is_group(path):
            raise BadInputError(f"{path} is not an ntkcl seed group (no {GROUP_FILE})")
        document = rundir.read_json(path / GROUP_FILE)
        seeds = document.get("seeds")
        configuration = document.get("configuration")
        if (
            document.get("format") != GROUP_FORMAT
            or not isinstance(seeds, list)
            or not all(isinstance(seed, int) and seed >= 0 for seed in seeds)
            or not isinstance(configuration, dict)
        ):
            raise BadInputError(f"{path / GROUP_FILE} is not a valid group file")
        return cls(path, sorted(set(seeds)), configuration)

    def write(self) -> None:
        document = {
            "format": GROUP_FORMAT,
            "seeds": self.seeds,
            "seed_semantics": "seed K sets runtime.seed=K and, unless stream.class_order is fixed, "
            "stream.class_order_seed=K",
            "configuration": self.configuration,
            "ntkcl_version": __version__,
        }
        rundir.write_json(self.path / GROUP_FILE, document)


def open_group(path: Path, config: RunConfig, seeds: Sequence[int]) -> Group:
    """Create the group folder, or join an existing group of the same configuration, adding `seeds` to it."""
    shared = shared_configuration(config)
    if is_group(path):
        group = Group.load(path)
        changed = _differences(group.configuration, shared)
        if changed:
            shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
            raise BadInputError(
                f"group {path} was made with another configuration (differs in {shown}); "
                "pick another --group name or --out folder"
            )
        group.seeds = sorted(set(group.seeds) | set(seeds))
    else:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise BadInputError(f"{path} exists and is not an ntkcl seed group; pick another --group or --out")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BadInputError(f"cannot create group folder {path}: {error.strerror or error}") from error
        group = Group(path, sorted(set(seeds)), shared)
    for seed in seeds:
        member = group.member(seed)
        if member.path.exists() and not member.started and any(member.path.iterdir()):
            raise BadInputError(f"{member.path} exists and is not an ntkcl run directory")
    group.write()
    return group


def prepare_member(member: Member, config: RunConfig, placement: dict) -> RunConfig:
    """The member's configuration: a new member's is written to its folder (so that it is an unstarted run
    directory); a started member keeps its saved one, with this call's placement (device, workers, GPUs)."""
    if not member.started:
        member.path.mkdir(parents=True, exist_ok=True)
        seeded = member_config(config, member.seed)
        save_config(seeded, member.path / rundir.CONFIG_FILE)
        return seeded
    saved = rundir.read_json(member.path / rundir.CONFIG_FILE)
    for section, key in PLACEMENT_FIELDS:
        if key in placement.get(section, {}):
            saved.setdefault(section, {})[key] = placement[section][key]  # runs saved before a section existed
    return validate(saved)


def placement_of(config: RunConfig) -> dict:
    """The placement fields of `config` as config sections."""
    document = config.model_dump(mode="json")
    placement: dict = {}
    for section, key in PLACEMENT_FIELDS:
        placement.setdefault(section, {})[key] = document[section][key]
    return placement


def mean_sd(values: Sequence[float | None]) -> dict:
    """{"mean", "sd", "n"} over the values that are defined: the sample sd (n - 1), None for n < 2."""
    defined = [float(value) for value in values if value is not None]
    n = len(defined)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0}
    mean = sum(defined) / n
    sd = math.sqrt(sum((value - mean) ** 2 for value in defined) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n}


def summarize(member_metrics: Sequence[dict]) -> dict:
    """Mean ± sd of each group metric over members, and of the all-seen accuracy after each task.

    The curve is summarised step by step over the members that reached that step.
    """
    summary = {key: mean_sd([metrics.get(key) for metrics in member_metrics]) for key in GROUP_METRICS}
    steps = max((len(metrics["all_seen_accuracy"]) for metrics in member_metrics), default=0)
    summary["all_seen_accuracy"] = [
        mean_sd([m["all_seen_accuracy"][t] for m in member_metrics if t < len(m["all_seen_accuracy"])])
        for t in range(steps)
    ]
    return summary


def format_mean_sd(value: dict, digits: int = 2) -> str:
    """`83.18 ± 0.40 (n=5)`; `-` when undefined; no sd for a single value."""
    if value["mean"] is None:
        return "-"
    if value["sd"] is None:
        return f"{value['mean']:.{digits}f} (n={value['n']})"
    return f"{value['mean']:.{digits}f} ± {value['sd']:.{digits}f} (n={value['n']})"


def group_metrics(group: Group, seeds: Sequence[int] | None = None) -> dict:
    """Each member's recorded metrics (None before its first finished task) and the summary over those with a
    finished task; `seeds` limits both to some members."""
    chosen = group.seeds if seeds is None else list(seeds)
    members = {seed: group.member(seed).metrics() for seed in chosen}
    recorded = [metrics for metrics in members.values() if metrics is not None]
    return {
        "group": str(group.path),
        "seeds": chosen,
        "members": {
            str(seed): None
            if metrics is None
            else {
                "run_dir": str(group.member(seed).path),
                "finished": bool(metrics.get("finished")),
                "num_tasks": metrics["num_tasks"],
                **{key: metrics.get(key) for key in GROUP_METRICS},
            }
            for seed, metrics in members.items()
        },
        "finished_members": sum(1 for metrics in recorded if metrics.get("finished")),
        "summary": summarize(recorded),
    }


def train_group(group: Group, config: RunConfig, seeds: Sequence[int], reporter) -> list[dict]:
    """Train the members of `seeds` one after another: finished ones are skipped, started ones resumed.

    Args:
        group: the opened group (see `open_group`).
        config: the group's configuration (any seed); its placement fields apply to every member.
        seeds: the members to train.
        reporter: progress of each member's run.

    Returns one record per member: seed, run folder, state before this call, whether it trained.
    """
    from ntkcl.engine.launch import launch

    placement = placement_of(config)
    outcomes = []
    for seed in seeds:
        member = group.member(seed)
        before = member.state
        if before == "finished":
            reporter.message(f"{group.name}/{member.path.name}: finished earlier, skipped")
            outcomes.append({"seed": seed, "run_dir": str(member.path), "before": before, "trained": False})
            continue
        member_configuration = prepare_member(member, config, placement)
        reporter.message(
            f"{group.name}/{member.path.name}: " + ("resuming" if before == "partial" else f"training seed {seed}")
        )
        launch(member_configuration, group.path, member.path, reporter)
        outcomes.append({"seed": seed, "run_dir": str(member.path), "before": before, "trained": True})
    return outcomes
