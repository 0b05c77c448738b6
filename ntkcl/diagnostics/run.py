"""`ntkcl diagnose`: the NTK, subspace, generalisation and retrieval-bound view of a finished run.

Every task's checkpoint is rebuilt and measured on a fixed probe: `probe` test images and `probe` training
images (under the test transform) per task, drawn with `numpy.random.default_rng(seed)` and recorded by
index in `diagnostics.json`.

The tuned parameters of a method are the tensors of its learned state that require gradients while some task
is trained: a fresh copy of the method is walked through `begin_task` of every task and the parameters
with `requires_grad` are collected. So, for example, NTK-CL counts its current adapters and prompt
generators and its fusion (its averaged copy is computed, never trained, and its prototypes are
statistics); CL-LoRA its shared LoRAs' trained factors, every task's specific adapters and block weights;
PROTEUS every task's LoRA units and composition weights (not its signatures or ridge head). Units frozen
after their task stay in the set: Θ after task t is the kernel of everything trained up to t.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ntkcl import __version__
from ntkcl.diagnostics import kernels
from ntkcl.errors import BadInputError

DIAGNOSTICS_FILE = "diagnostics.json"
KIND = "ntkcl-diagnostics"


def _choose(indices: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(np.asarray(indices), size=min(count, len(indices)), replace=False))


def _load(samples, transform, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from ntkcl.data.loaders import ImageDataset

    dataset = ImageDataset(samples, transform)
    pairs = [dataset[int(index)] for index in indices]
    images = torch.stack([image for image, _ in pairs]).to(device)
    return images, torch.tensor([label for _, label in pairs], device=device)


def trained_parameter_names(method) -> list[str]:
    """Names of the learned-state parameters that require gradients at some task (see the module docstring).

    `method` must be fresh (after `begin_stream`); it is walked through every task's `begin_task`.
    """
    names: dict[str, None] = {}
    for task in method.stream_tasks:
        method.begin_task(task)
        names.update((name, None) for name, parameter in method.named_parameters() if parameter.requires_grad)
    learned = method.learned_state()  # transient modules (proxy heads, teachers) are not part of it
    return [name for name in names if name in learned]


def _accuracy(method, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    with torch.no_grad():
        hits = sum(
            int((method.predict(images[s : s + batch_size]).argmax(dim=1) == labels[s : s + batch_size]).sum())
            for s in range(0, len(images), batch_size)
        )
    return 100.0 * hits / len(images)


def _task_rows(counts: list[int]) -> list[torch.Tensor]:
    edges = np.cumsum([0, *counts])
    return [torch.arange(int(edges[i]), int(edges[i + 1])) for i in range(len(counts))]


def _degrees(angles: torch.Tensor) -> list[float]:
    return [float(value) for value in torch.rad2deg(angles)]


def feature_orthogonality(kernel: torch.Tensor, labels: torch.Tensor, rows: list[torch.Tensor], energy: float) -> dict:
    """Principal angles between the tasks' tangent-feature subspaces and cosines between prototypes of
    different tasks, from the trace kernel after the last task."""
    count = len(rows)
    angles: list[list[list[float]]] = [[[] for _ in range(count)] for _ in range(count)]
    ranks = [0] * count
    for i in range(count):
        for j in range(count):
            values, ranks[i], _ = kernels.principal_angles(
                kernel[rows[i]][:, rows[i]], kernel[rows[i]][:, rows[j]], kernel[rows[j]][:, rows[j]], energy
            )
            angles[i][j] = _degrees(values)
    cosines, classes = kernels.prototype_cosines(kernel, labels)
    task_of_class = torch.zeros(len(classes), dtype=torch.long)
    for task, task_rows in enumerate(rows):
        task_of_class[torch.isin(classes, labels[task_rows].unique())] = task
    between = task_of_class.unsqueeze(0) != task_of_class.unsqueeze(1)
    per_pair = [
        [float(cosines[task_of_class == i][:, task_of_class == j].mean()) if i != j else None for j in range(count)]
        for i in range(count)
    ]
    return {
        "energy": energy,
        "subspace_rank": ranks,
        "principal_angles_deg": angles,
        "mean_angle_deg": [[float(np.mean(a)) if a else None for a in row] for row in angles],
        "prototype_cosine_between_tasks": float(cosines[between].mean()) if bool(between.any()) else None,
        "prototype_cosine_by_task_pair": per_pair,
    }


def retrieval_clusters(method, train_probe: list[tuple[torch.Tensor, torch.Tensor]], num_tasks: int) -> dict:
    """δ, κ and the threshold of the retrieval bound per cluster of each task's training probe, against every
    other task (`ntkcl.models.signatures.retrieval_bound`, the precursor's `theories.py`), with the share of
    the cluster's images retrieved to their own task (PROTEUS: `embed`, `signatures`, `predict_with_task`)."""
    from ntkcl.models.signatures import RawComponents, retrieval_bound

    count = len(method.signatures)
    tasks = list(range(count))
    components = [RawComponents.of(signature) for signature in method.signatures]
    configured = method.params.n_components  # τ_i: one truncation for every task, or one per task
    truncations = [configured] * num_tasks if isinstance(configured, int) else list(configured)
    epsilon = method.params.bound_epsilon
    clusters = []
    with torch.no_grad():
        for task, (images, _) in enumerate(train_probe):
            embedded = method.embed(images, tasks)  # (T, n, d)
            _, retrieved = method.predict_with_task(images)
            assignment = method.signatures[task].assign(embedded[task])
            others = [i for i in tasks if i != task]
            for component in assignment.unique().tolist():
                members = assignment == component
                bound = retrieval_bound(
                    [embedded[i][members] for i in others],
                    [components[i] for i in others],
                    float(components[task].log_dets[component]),
                    num_tasks,
                    truncations,
                    epsilon,
                )
                clusters.append(
                    {
                        "task": task,
                        "cluster": int(component),
                        "images": int(members.sum()),
                        **bound.as_record(),
                        "retrieval_accuracy": 100.0 * float((retrieved[members] == task).float().mean()),
                    }
                )
    return {"clusters": clusters, "truncations": truncations, "epsilon": epsilon}


def diagnose_run(
    run_dir: Path,
    probe: int = 32,
    tasks: list[int] | None = None,
    device: str | None = None,
    outputs: int = 0,
    energy: float = 0.9,
    seed: int = 0,
    batch_size: int = 8,
    data_root: Path | None = None,
    reporter=None,
) -> dict:
    """Measure a run (see the module docstring) and write `diagnostics.json` into it; returns the document.

    Args:
        run_dir: a run folder with at least two finished tasks.
        probe: test and training images per task.
        tasks: checkpoints to measure (task indices, ascending); None: every finished task.
        device: where to compute (None: the run's configured device).
        outputs: K > 0 differentiates a seeded Gaussian projection of the seen-class logits to K outputs
            (columns scaled by 1/√K); 0 differentiates the logits themselves.
        energy: share of a task kernel's spectrum its feature subspace keeps.
        seed: seed of the probe draw and of the projection.
        batch_size: images per Jacobian evaluation.
        data_root: where the run's dataset lives (None: the configured root).
    """
    from ntkcl.engine import rundir
    from ntkcl.engine.builders import build_backbone, build_method, build_run_transforms, build_stream
    from ntkcl.engine.distributed import init_distributed
    from ntkcl.engine.run_reader import read_run_folder

    run = read_run_folder(Path(run_dir))  # validated before anything of it is trusted
    run_dir = run.path
    target = run_dir / DIAGNOSTICS_FILE
    if target.exists() and rundir.read_json(target).get("kind") != KIND:
        raise BadInputError(f"{target} exists and was not written by ntkcl diagnose; move it away first")
    checkpoints = run.checkpoints
    if not checkpoints:
        raise BadInputError(f"{run_dir} has no task checkpoint (checkpoints/task-XX); nothing to diagnose")
    if len(checkpoints) < 2:
        raise BadInputError(f"{run_dir} has one finished task; diagnose compares tasks and needs at least two")
    if probe < 2:
        raise BadInputError("--probe must be at least 2 images per task")
    selected = list(range(len(checkpoints))) if tasks is None else sorted(set(tasks))
    if any(index < 0 or index >= len(checkpoints) for index in selected) or len(selected) < 2:
        raise BadInputError(
            f"--tasks must name at least two finished tasks among 0..{len(checkpoints) - 1}, got {tasks}"
        )
    config = run.config
    if data_root is not None:
        config.stream.data_root = data_root
    ctx = init_distributed(device or config.runtime.device)
    stream, _ = build_stream(config, ctx)
    backbone = build_backbone(config).to(ctx.device)
    saved = run.record
    if saved["backbone"]["weights_sha256"] != backbone.weights_sha256:
        raise BadInputError("the backbone weights differ from the ones the run was trained with (sha256 mismatch)")
    _, test_transform = build_run_transforms(config, backbone)

    def fresh_method():
        method = build_method(config, backbone)
        method.begin_stream(stream.tasks())
        return method

    names = trained_parameter_names(fresh_method())
    if not names:
        raise BadInputError(f"method {config.method.name} trains no parameters: its tangent kernel is empty")
    last = selected[-1]
    rng = np.random.default_rng(seed)
    probe_indices = []
    for task in stream.tasks()[: last + 1]:
        probe_indices.append(
            {
                "test": _choose(stream.task_test_indices(task), probe, rng),
                "train": _choose(stream.train_indices(task), probe, rng),
            }
        )
    test_probe = [_load(stream.test, test_transform, chosen["test"], ctx.device) for chosen in probe_indices]
    train_probe = [_load(stream.train, test_transform, chosen["train"], ctx.device) for chosen in probe_indices]
    generator = torch.Generator().manual_seed(seed)
    projection = (
        torch.randn(stream.num_classes, outputs, generator=generator, dtype=torch.float64) / outputs**0.5
        if outputs
        else None
    )

    steps, previous_kernels, previous_index = [], None, None
    test_accuracy: dict[int, list[float]] = {}
    train_accuracy: dict[int, list[float]] = {}
    last_kernel = last_labels = last_rows = None
    method = None
    for index in selected:
        started = time.perf_counter()
        state = run.load_state(index)
        method = fresh_method()
        method.load_learned_state(state, stream.tasks()[: index + 1])
        method.to(ctx.device).eval()
        present = [name for name in names if name in dict(method.named_parameters())]
        labels = torch.cat([labels for _, labels in test_probe[: index + 1]]).cpu()
        rows = _task_rows([len(labels_) for _, labels_ in test_probe[: index + 1]])
        kernel_started = time.perf_counter()
        # Task by task, so that no Jacobian batch mixes tasks (a method may retrieve one task per batch).
        features = torch.cat(
            [
                kernels.tangent_features(method, present, images, projection, batch_size)
                for images, _ in test_probe[: index + 1]
            ]
        )
        kernel_seconds = time.perf_counter() - kernel_started
        if not bool(features.abs().sum() > 0):
            raise BadInputError(
                f"the logits of {method.name} after task {index} do not depend on its tuned parameters "
                "(its predict is not differentiable); nothing to measure"
            )
        kernel = kernels.trace_kernel(features).cpu()
        del features
        summary = kernels.ntk_summary(kernel, labels, rows)
        blocks = [kernel[r][:, r] for r in rows]
        drift = None
        if previous_kernels is not None:
            drift = [
                None if (cka := kernels.centred_alignment(before, blocks[i])) is None else 1 - cka
                for i, before in enumerate(previous_kernels)
            ]
        test_accuracy[index] = [_accuracy(method, *test_probe[t], batch_size) for t in range(index + 1)]
        train_accuracy[index] = [_accuracy(method, *train_probe[t], batch_size) for t in range(index + 1)]
        steps.append(
            {
                "after_task": index,
                "parameters": int(sum(dict(method.named_parameters())[name].numel() for name in present)),
                "outputs": int(outputs or method.seen_classes),
                **summary,
                "drift_from_previous": drift,
                "previous_task": previous_index,
                "kernel_seconds": kernel_seconds,
                "seconds_per_probe_image": kernel_seconds / len(labels),
                "seconds": time.perf_counter() - started,
            }
        )
        previous_kernels, previous_index = blocks, index
        last_kernel, last_labels, last_rows = kernel, labels, rows
        if reporter is not None:
            reporter.message(f"diagnosed task {index + 1}/{len(checkpoints)}")

    gaps = []
    for task in range(last + 1):
        own = task if task in test_accuracy else None
        entry = {"task": task}
        for name, at in (("after_own_task", own), ("after_last_task", last)):
            if at is None:
                entry[name] = None
                continue
            train, test = train_accuracy[at][task], test_accuracy[at][task]
            entry[name] = {"train_accuracy": train, "test_accuracy": test, "gap": train - test}
        gaps.append(entry)

    document = {
        "kind": KIND,
        "ntkcl_version": __version__,
        "run": run_dir.name,
        "method": method.name,
        "device": str(ctx.device),
        "probe": {
            "per_task": probe,
            "seed": seed,
            "transform": "test",
            "indices": [{split: chosen[split].tolist() for split in ("test", "train")} for chosen in probe_indices],
        },
        "kernel": {
            "outputs": "logits" if not outputs else f"gaussian projection to {outputs} (seed {seed})",
            "reduction": "trace over outputs",
            "tuned_parameters": names,
        },
        "ntk": steps,
        "feature_orthogonality": feature_orthogonality(last_kernel, last_labels, last_rows, energy),
        "generalisation_gap": gaps,
    }
    if hasattr(method, "signatures") and hasattr(method, "embed"):
        document["retrieval"] = retrieval_clusters(method, train_probe, stream.num_tasks)
        with torch.no_grad():
            document["retrieval"]["test_retrieval_accuracy"] = [
                100.0 * float((method.predict_with_task(images)[1] == task).float().mean())
                for task, (images, _) in enumerate(test_probe)
            ]
    rundir.write_json(target, document)
    return document
