"""`ntkcl train`: resolve the configuration, train a continual-learning run, print the accuracy table."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from ntkcl.cli import _common
from ntkcl.config import Feed, Precision, Scenario, deep_merge
from ntkcl.errors import BadInputError

# The config field each flag sets (`--batch-size` is `optim.batch_size`); the others are not config fields.
# A resumed run keeps its saved config except where it runs: these may change on `--resume`.
RESUME_FLAGS = ("device", "num_workers", "data_root", "feed")
FLAG_FIELDS = {
    "stream": ("stream", "dataset"),
    "method": ("method", "name"),
    "backbone": ("backbone", "name"),
    "weights": ("backbone", "weights"),
    "pretrained": ("backbone", "pretrained"),
    "init_classes": ("stream", "init_classes"),
    "increment": ("stream", "increment"),
    "class_order_seed": ("stream", "class_order_seed"),
    "scenario": ("stream", "scenario"),
    "data_root": ("stream", "data_root"),
    "epochs": ("optim", "epochs"),
    "lr": ("optim", "lr"),
    "batch_size": ("optim", "batch_size"),
    "accumulation_steps": ("optim", "accumulation_steps"),
    "seed": ("runtime", "seed"),
    "device": ("runtime", "device"),
    "precision": ("runtime", "precision"),
    "num_workers": ("runtime", "num_workers"),
    "compile": ("runtime", "compile"),
    "feed": ("data", "feed"),
    "log": ("runtime", "log"),
}


def _flag_overrides(**flags) -> dict:
    """Map the explicit flags onto config sections (only those the user gave)."""
    overrides: dict = {}
    for flag, value in flags.items():
        if value is None:
            continue
        section, key = FLAG_FIELDS[flag]
        overrides.setdefault(section, {})[key] = str(value) if isinstance(value, Path) else value
    if flags.get("class_order_seed") is not None:
        # The flag asks for the seeded permutation, also over a preset's fixed order (CL-LoRA's VTAB).
        overrides["stream"]["class_order"] = None
    return overrides


def parse_gpus(text: str) -> list[int]:
    """`0,1` -> [0, 1]; `all` -> every visible GPU. Host checks (presence, duplicates) come with the launch plan."""
    from ntkcl.engine.launch import all_gpus

    if text.strip().lower() == "all":
        return all_gpus()
    parts = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch("[0-9]+", part) for part in parts):
        raise BadInputError(f"--gpus expects comma-separated GPU indices (0,1) or 'all', got {text!r}")
    return [int(part) for part in parts]


def _process_overrides(gpus: str | None, nproc: int | None) -> dict:
    """`--gpus` sets one process per listed GPU; `--nproc` alone clears a GPU list saved by an earlier session."""
    if nproc is not None and nproc < 1:
        raise BadInputError(f"--nproc must be at least 1, got {nproc}")
    runtime: dict = {}
    if gpus is not None:
        runtime["gpus"] = parse_gpus(gpus)
        runtime["nproc"] = nproc if nproc is not None else len(runtime["gpus"])
    elif nproc is not None:
        runtime.update(gpus=None, nproc=nproc)
    return runtime


def train(
    stream: str | None = typer.Option(
        None,
        "--stream",
        "-s",
        metavar="NAME",
        help="Dataset, composite stream, or datasets a,b,c one per task (see `ntkcl datasets`).",
        autocompletion=_common.complete_datasets,
    ),
    scenario: Scenario | None = typer.Option(
        None, "--scenario", help="class-incremental or task-incremental (default: the stream's own)."
    ),
    method: str | None = typer.Option(
        None,
        "--method",
        "-m",
        metavar="NAME",
        help="Method name (default ntk-cl; the README lists the built-in ones).",
        autocompletion=_common.complete_methods,
    ),
    backbone: str | None = typer.Option(
        None,
        "--backbone",
        "--model",
        metavar="NAME",
        help="timm model (arch.tag, a bare architecture, hf-hub:REPO, local-dir:FOLDER) or an open_clip CLIP "
        "(clip:ViT-B-16/openai). --model is timm's name for it.",
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        parser=_common.non_empty_path,
        metavar="PATH",
        help="Local backbone weights file or folder (offline).",
    ),
    pretrained: bool | None = typer.Option(None, "--pretrained/--no-pretrained", help="Load the tag's weights."),
    config_file: Path | None = typer.Option(
        None, "--config", "-c", parser=_common.non_empty_path, metavar="FILE", help="TOML or YAML config file."
    ),
    assignments: list[str] = typer.Option(
        [],
        "--set",
        metavar="KEY=VALUE",
        help="Override any field: --set optim.lr=0.01; a {table} replaces the preset's (repeatable).",
    ),
    unset: list[str] = typer.Option(
        [], "--unset", metavar="KEY", help="Drop KEY from the presets and --config file: its default applies."
    ),
    init_classes: int | None = typer.Option(None, "--init-classes", metavar="N", help="Classes in the first task."),
    increment: int | None = typer.Option(None, "--increment", metavar="N", help="Classes per later task."),
    class_order_seed: int | None = typer.Option(
        None, "--class-order-seed", metavar="SEED", help="np.random.seed for the class order."
    ),
    epochs: int | None = typer.Option(None, "--epochs", metavar="N", help="Epochs per task."),
    lr: float | None = typer.Option(None, "--lr", metavar="LR", help="Learning rate."),
    batch_size: int | None = typer.Option(None, "--batch-size", metavar="N", help="Global batch size."),
    accumulation_steps: int | None = typer.Option(
        None,
        "--accumulation-steps",
        "--grad-accum-steps",
        metavar="N",
        help="Split each batch into N backward passes (--grad-accum-steps as in timm).",
    ),
    seed: int | None = typer.Option(
        None, "--seed", metavar="SEED", help="Training seed (separate from the class order)."
    ),
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        metavar="0,1,2|0-4",
        help="Train once per seed into the group folder OUT/GROUP/seed-K/; seed K is the training seed and the "
        "class order seed. Finished members are skipped, started ones resumed.",
    ),
    group: str | None = typer.Option(
        None, "--group", metavar="NAME", help="Group folder name under --out for --seeds (default STREAM-METHOD)."
    ),
    device: str | None = _common.device_option(None, "Where to train (auto: a GPU when one is visible)."),
    precision: Precision | None = typer.Option(None, "--precision", help="auto: bf16 autocast on GPU, fp32 on CPU."),
    num_workers: int | None = typer.Option(
        None, "--num-workers", "--workers", metavar="N", help="DataLoader workers per process (--workers as in timm)."
    ),
    compile_passes: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="torch.compile the method's backbone passes (default auto: on CUDA for long runs; see README).",
    ),
    feed: Feed | None = typer.Option(
        None,
        "--feed",
        help="auto, loader (per-image DataLoader) or device (decode once, batched transforms on the device).",
    ),
    gpus: str | None = typer.Option(
        None,
        "--gpus",
        metavar="LIST",
        help="GPUs of this host, one DDP process each (NCCL): 0,1 or all. Not with torchrun.",
    ),
    nproc: int | None = typer.Option(
        None,
        "--nproc",
        metavar="N",
        help="Processes on this host: gloo on CPU, or one GPU each. The batch size stays global.",
    ),
    data_root: Path | None = _common.DATA_ROOT_OPTION,
    out: Path = typer.Option(
        Path("runs"),
        "--out",
        "--output",
        "-o",
        parser=_common.non_empty_path,
        metavar="DIR",
        help="Folder that receives the run directory (--output as in timm).",
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        parser=_common.non_empty_path,
        metavar="RUN_DIR",
        help="Continue RUN_DIR after its last finished task.",
    ),
    log: list[str] = typer.Option(
        [],
        "--log",
        metavar="TRACKER",
        help="Also log to tensorboard or wandb (repeatable; extras ntkcl[tensorboard], ntkcl[wandb]).",
    ),
    print_config: bool = typer.Option(
        False,
        "--print-config",
        help="Print the resolved configuration and the layer each value comes from, then exit without training.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also report routine steps (each saved snapshot)."),
    json_output: bool = _common.JSON_OPTION,
) -> None:
    """Train a continual-learning run (class- or task-incremental); writes runs/<stream>-<method>-<stamp>/ and
    prints the accuracy table."""
    _common.set_json(json_output)
    # The engine (torch, timm) is imported once the flags and config values have passed their checks.
    from ntkcl.presets import config_layers, merge_layers, resumed_layers, value_sources

    processes = _process_overrides(gpus, nproc)
    if seeds is not None and (seed is not None or class_order_seed is not None):
        raise BadInputError(
            "--seeds sets the training and class-order seeds of each member; drop --seed/--class-order-seed"
        )
    if group is not None and seeds is None:
        raise BadInputError("--group names the folder of a seed group; give --seeds too")
    flags = {
        "stream": stream,
        "method": method,
        "backbone": backbone,
        "weights": weights,
        "pretrained": pretrained,
        "init_classes": init_classes,
        "increment": increment,
        "class_order_seed": class_order_seed,
        "scenario": scenario,
        "data_root": data_root,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "accumulation_steps": accumulation_steps,
        "seed": seed,
        "device": device,
        "precision": precision,
        "num_workers": num_workers,
        "compile": None if compile_passes is None else ("on" if compile_passes else "off"),
        "log": log or None,
        "feed": feed,
    }
    overrides = deep_merge(_flag_overrides(**flags), {"runtime": processes})
    run_dir = None
    if resume is not None:
        from ntkcl.engine import rundir
        from ntkcl.engine.groups import is_group

        if seeds is not None:
            raise BadInputError("--resume continues one run or group; to add seeds, repeat the --seeds command")
        fixed = [name for name, value in flags.items() if value is not None and name not in RESUME_FLAGS]
        if fixed or config_file is not None or assignments or unset:
            raise BadInputError(
                "--resume continues a run with its saved config; only --device, --num-workers, --data-root, "
                "--feed, --gpus and --nproc may change"
            )
        if is_group(resume):
            _resume_group(resume, overrides, quiet, json_output)
            return
        run_dir = rundir.check_run_dir(resume, started=False)
    # Warnings (a dropped preset value) wait until every check has passed, the backbone's weights included,
    # so bad input stays one line.
    with _common.warnings_after_checks() as held:
        if run_dir is not None:
            layers = resumed_layers(run_dir / rundir.CONFIG_FILE, overrides)
            config = merge_layers(layers)
        else:
            from ntkcl.engine.builders import complete_config

            layers = config_layers(config_file, overrides, unset, assignments)
            config = complete_config(merge_layers(layers))
        if print_config:
            _print_config(config, value_sources(layers, config))
            return
        if seeds is not None:
            from ntkcl.cli._seed_groups import check_group_name, default_group_name, train_seed_group
            from ntkcl.engine.groups import parse_seeds

            name = check_group_name(group) if group is not None else default_group_name(config)
            member_seeds = parse_seeds(seeds)
            held.release()
            train_seed_group(config, member_seeds, out / name, quiet, json_output)
            return
        from ntkcl.engine.launch import launch
        from ntkcl.engine.progress import Reporter

        reporter = Reporter(enabled=not quiet, verbose=verbose, on_checked=held.release)
        try:
            result = launch(config, out, run_dir, reporter)
        except KeyboardInterrupt:
            where = reporter.run_dir or "the run directory"
            _common.fail(f"interrupted; progress is saved; continue with `ntkcl train --resume {where}`", 130)
    if not result.main_process:  # under torchrun, rank 0 alone prints the result
        return
    metrics = result.metrics
    if json_output:
        _common.emit({"run_dir": str(result.run_dir), "metrics": metrics})
        return
    _common.print_metrics(
        metrics, title=f"{config.stream.dataset} / {config.method.name}: accuracy (%) after each task"
    )
    reference = _common.reference_line(config.method.name, metrics)
    if reference is not None:
        _common.stdout.print(reference, highlight=False)
    _common.stdout.print(f"run directory: {result.run_dir}", highlight=False)


def _print_config(config, sources: dict[str, tuple[object, str]]) -> None:
    """`--print-config`: one `key = value  (source)` line per value, or {"config": ..., "sources": ...} as JSON."""
    import json

    if _common.STATE["json"]:
        sources_only = {key: source for key, (_, source) in sources.items()}
        _common.emit({"config": config.model_dump(mode="json"), "sources": sources_only})
        return
    width = max(len(key) for key in sources)
    for key, (value, source) in sources.items():
        _common.stdout.print(f"{key:<{width}} = {json.dumps(value)}  ({source})", markup=False, highlight=False)


def _resume_group(path: Path, overrides: dict, quiet: bool, json_output: bool) -> None:
    """`--resume GROUP`: continue every member of the group with its saved configuration."""
    from ntkcl.cli._seed_groups import train_seed_group
    from ntkcl.engine.builders import complete_config
    from ntkcl.engine.groups import Group
    from ntkcl.presets import Layer, merge_layers

    group = Group.load(path)
    layers = [Layer(f"seed group ({path})", group.configuration), Layer("flags", overrides)]
    # Completed like a new configuration: the placement fields the group file leaves out get this host's values.
    config = complete_config(merge_layers(layers))
    train_seed_group(config, group.seeds, path, quiet, json_output)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
