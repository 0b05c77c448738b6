"""Pre-train a shipped backbone on generated fractal and contour categories (formula-driven supervised
learning).

Kataoka et al., "Pre-training without Natural Images" (ACCV 2020, arXiv 2101.08515) and "Replacing Labeled
Real-image Datasets with Auto-generated Contours" (CVPR 2022): a ViT learns to tell generated categories
apart, IFS fractals (`ntkcl.pretraining.fractals`) and radial contours (`ntkcl.pretraining.contours`), one
classifier over both sets, and its features transfer without a single natural image. (On ntkcl's digits
stream the two sets together gave clearly better frozen features than either alone at the same budget;
README, "Formula-driven pre-training".) This script made `ntkcl-tiny-fdsl`, the backbone shipped in the
package, on a CPU:

    python -m ntkcl.pretraining.pretrain --output ntkcl/models/shipped/ntkcl-tiny-fdsl

Deterministic from `--seed`: the data are a function of the generator settings, the initialisation, batch
order and augmentation of the seed, and `torch.use_deterministic_algorithms` is on. The same torch build and
thread count give the same bytes; another BLAS may round differently. The output folder holds the weights
without the classifier (`model.safetensors`), `pretraining.json` (generator and training settings, per-epoch
loss and accuracy, CPU and wall seconds, weights sha256) and a model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ntkcl.errors import BadInputError
from ntkcl.files import atomic_write_text, check_replaceable, sha256_file, staged_folder, write_safetensors
from ntkcl.models.shipped import (
    CARD_FILE_NAME,
    NTKCL_TINY_FDSL,
    SETTINGS_FILE_NAME,
    WEIGHTS_FILE_NAME,
    ShippedBackbone,
)
from ntkcl.pretraining import contours, fractals
from ntkcl.pretraining.contours import ContourSettings
from ntkcl.pretraining.fractals import FractalSettings

DataSettings = FractalSettings | ContourSettings
GENERATORS = {FractalSettings: fractals.generate, ContourSettings: contours.generate}

SHIPPED_DTYPE = torch.float16
PRETRAINED_KIND = "pretrained-backbone"  # the folder kind `staged_folder` records in its marker
PRETRAINED_FILES = {WEIGHTS_FILE_NAME, SETTINGS_FILE_NAME, CARD_FILE_NAME}


def _is_pretrained_folder(folder: Path) -> bool:
    """A folder this script wrote before folders carried a marker (the shipped one): by its file set."""
    return {path.name for path in folder.iterdir()} == PRETRAINED_FILES


@dataclass(frozen=True)
class TrainingSettings:
    """How the backbone is trained on the generated categories (AdamW, warm-up then cosine, label smoothing).

    Attributes:
        seed: initialisation, batch order and augmentation.
        epochs: passes over the generated images.
        batch_size: images per step.
        lr / min_lr / warmup_epochs / weight_decay / label_smoothing: the optimisation.
        crop_padding: random translation by up to this many pixels (reflect-padded crop).
        threads: torch CPU threads (part of what makes a run reproducible bit for bit).
    """

    seed: int = 0
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    crop_padding: int = 2
    threads: int = 2


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_model(backbone: ShippedBackbone, num_classes: int, seed: int) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(backbone.architecture, pretrained=False, num_classes=num_classes, **backbone.model_kwargs)


def _augment(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation: reflect-pad, then one random crop per image (indexing, no per-image loop)."""
    if padding == 0:
        return images
    count, _, height, width = images.shape
    padded = nn.functional.pad(images, (padding,) * 4, mode="reflect")
    shift = torch.randint(0, 2 * padding + 1, (2, count), generator=generator)
    rows = (shift[0][:, None] + torch.arange(height))[:, None, :, None]
    cols = (shift[1][:, None] + torch.arange(width))[:, None, None, :]
    return padded[torch.arange(count)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]


def _learning_rate(settings: TrainingSettings, step: int, total: int, per_epoch: int) -> float:
    warmup = int(settings.warmup_epochs * per_epoch)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return settings.min_lr + 0.5 * (settings.lr - settings.min_lr) * (1 + math.cos(math.pi * progress))


def generate_all(data: Sequence[DataSettings]) -> tuple[np.ndarray, np.ndarray]:
    """Every generated set's images, their categories numbered one set after another."""
    images, labels, offset = [], [], 0
    for settings in data:
        set_images, set_labels = GENERATORS[type(settings)](settings)
        images.append(set_images)
        labels.append(set_labels + offset)
        offset += settings.num_categories
    return np.concatenate(images), np.concatenate(labels)


def pretrain(
    backbone: ShippedBackbone, data: Sequence[DataSettings], training: TrainingSettings, log=print
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train `backbone`'s architecture to classify the categories of every set in `data` (fractals, contours).

    Returns:
        The backbone's state dict without the classifier, and a record of the run (settings, per-epoch
        loss/accuracy, seconds).
    """
    torch.set_num_threads(training.threads)
    torch.use_deterministic_algorithms(True)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    images, labels = generate_all(data)
    num_categories = sum(settings.num_categories for settings in data)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8, converted per batch
    labels = torch.from_numpy(labels)
    generation = {"wall_seconds": time.perf_counter() - started, "cpu_seconds": _cpu_seconds() - cpu_started}
    log(f"generated {len(labels)} images of {num_categories} categories in {generation['wall_seconds']:.0f} s")
    model = build_model(backbone, num_categories, training.seed)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=training.lr,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=training.label_smoothing)
    generator = torch.Generator().manual_seed(training.seed)
    per_epoch = len(labels) // training.batch_size  # the last partial batch is dropped
    total = per_epoch * training.epochs
    epochs = []
    step = 0
    model.train()
    for epoch in range(training.epochs):
        order = torch.randperm(len(labels), generator=generator)
        loss_sum = correct = seen = 0.0
        for batch in range(per_epoch):
            index = order[batch * training.batch_size : (batch + 1) * training.batch_size]
            inputs = _augment(images[index].float() / 255.0, training.crop_padding, generator)
            targets = labels[index]
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(training, step, total, per_epoch)
            logits = model(inputs)
            loss = criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(index)
            correct += float((logits.argmax(1) == targets).sum())
            seen += len(index)
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "train_accuracy": 100.0 * correct / seen,
            "wall_seconds": time.perf_counter() - started,
            "cpu_seconds": _cpu_seconds() - cpu_started,
        }
        epochs.append(record)
        log(json.dumps(record))
    # Stored in half precision: the package carries half the bytes, and the features differ from fp32's only in
    # rounding (every measurement of the shipped backbone is of these rounded weights, loaded as fp32).
    state = {
        key: tensor.detach().to(SHIPPED_DTYPE).contiguous()
        for key, tensor in model.state_dict().items()
        if not key.startswith("head.")
    }
    report = {
        "backbone": {
            "name": backbone.name,
            "architecture": backbone.architecture,
            "model_kwargs": backbone.model_kwargs,
        },
        "generators": [settings.record() for settings in data],
        "training": asdict(training),
        "epochs": epochs,
        "generation": generation,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": _cpu_seconds() - cpu_started,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "threads": training.threads,
        },
    }
    return state, report


def _describe_generator(data: dict) -> str:
    """One bullet of the card: what a generated set holds."""
    size = f"{data['image_size']}x{data['image_size']} RGB"
    count = f"{data['num_categories']} categories x {data['instances_per_category']} instances, {size}"
    if data["kind"] == ContourSettings.kind:
        return (
            f"radial contours: {count}, outlines of {data['min_vertices']}-{data['max_vertices']} points (polygon "
            f"or smooth) in up to {data['max_rings']} concentric rings, line width {data['min_width']:g}-"
            f"{data['max_width']:g} px, random colours, scale and position, rotation up to "
            f"{data['max_rotation']:.2f} rad; seed {data['seed']}"
        )
    return (
        f"iterated-function-system fractals: {count}, {data['min_maps']}-{data['max_maps']} affine maps per "
        f"category under the sigma-factor rule, random colours, scale, mirror and position, rotation up to "
        f"{data['max_rotation']:.2f} rad; seed {data['seed']}"
    )


def model_card(backbone: ShippedBackbone, report: dict) -> str:
    """The weights' own card: what they are, how they were made, what they are not."""
    training, last = report["training"], report["epochs"][-1]
    kwargs = ", ".join(f"{key}={value}" for key, value in backbone.model_kwargs.items())
    data = "\n".join(f"- data: {_describe_generator(generator)};" for generator in report["generators"])
    return f"""---
license: {backbone.license}
library_name: timm
tags:
- image-feature-extraction
- formula-driven-supervised-learning
---

# {backbone.name}

A {report["parameters"]:,}-parameter vision transformer (timm `{backbone.architecture}` with {kwargs}) pre-trained
on generated images only (fractals and contours): no natural image, no download, so that continual-learning
runs can start from a pre-trained backbone offline (`--backbone {backbone.name}`), as every PEFT-CL method
assumes. It is the backbone of ntkcl's `digits` and `synthetic` presets; what its frozen features are worth
there, against a random initialisation, is measured in ntkcl's README (`benchmarks/digits_methods.py`). It is
not an ImageNet model and says nothing about the accuracy of a ViT-B/16 on the paper benchmarks.

## How it was made

`python -m ntkcl.pretraining.pretrain --output <folder>` (see `ntkcl/pretraining/`), on a CPU
({training["threads"]} torch threads):

{data}
- training: classify the categories of every set, {training["epochs"]} epochs, batch {training["batch_size"]},
  AdamW lr {training["lr"]} (warm-up {training["warmup_epochs"]} epoch, cosine), weight decay
  {training["weight_decay"]}, label smoothing {training["label_smoothing"]}, random translation by {training["crop_padding"]} px; seed
  {training["seed"]};
- final epoch: loss {last["loss"]:.3f}, training accuracy {last["train_accuracy"]:.1f}%;
- time: {report["cpu_seconds"]:.0f} CPU seconds, {report["wall_seconds"]:.0f} s wall (torch
  {report["environment"]["torch"]}).

Inputs are [0, 1] RGB pixels without normalisation (ntkcl's `backbone.normalize = "none"`). The classifier
head is not included. The weights are stored in {report["weights_dtype"]} (ntkcl loads them into float32). `pretraining.json` holds every setting and the per-epoch record; the weights' sha256 is
`{report["weights_sha256"]}`.

## Citation

```bibtex
@inproceedings{{kataoka2020pretraining,
  title={{Pre-training without Natural Images}},
  author={{Kataoka, Hirokatsu and Okayasu, Kazushige and Matsumoto, Asato and Yamagata, Eisuke and
          Yamada, Ryosuke and Inoue, Nakamasa and Nakamura, Akio and Satoh, Yutaka}},
  booktitle={{Asian Conference on Computer Vision (ACCV)}},
  year={{2020}}
}}
@inproceedings{{kataoka2022replacing,
  title={{Replacing Labeled Real-image Datasets with Auto-generated Contours}},
  author={{Kataoka, Hirokatsu and Hayamizu, Ryo and Yamada, Ryosuke and Nakashima, Kodai and Takashima, Sora and
          Zhang, Xinyu and Martinez-Noriega, Edgar Josafat and Inoue, Nakamasa and Yokota, Rio}},
  booktitle={{CVPR}},
  year={{2022}}
}}
```
"""


def write_backbone(folder: Path, backbone: ShippedBackbone, state: dict[str, torch.Tensor], report: dict) -> dict:
    """Weights, settings and card into `folder` (replaced only when complete). Returns the final record."""
    with staged_folder(folder, PRETRAINED_KIND, _is_pretrained_folder) as staging:
        write_safetensors(staging / WEIGHTS_FILE_NAME, state)
        report = {
            **report,
            "parameters": sum(tensor.numel() for tensor in state.values()),
            "weights_dtype": str(SHIPPED_DTYPE).removeprefix("torch."),
            "weights_file": WEIGHTS_FILE_NAME,
            "weights_sha256": sha256_file(staging / WEIGHTS_FILE_NAME),
        }
        atomic_write_text(staging / SETTINGS_FILE_NAME, json.dumps(report, indent=2) + "\n")
        atomic_write_text(staging / CARD_FILE_NAME, model_card(backbone, report))
    return report


def main(argv: list[str] | None = None) -> int:
    fractal_defaults, contour_defaults, training_defaults = FractalSettings(), ContourSettings(), TrainingSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for weights, settings and card")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generators and of the training")
    parser.add_argument("--categories", type=int, default=fractal_defaults.num_categories, help="fractal categories")
    parser.add_argument("--instances", type=int, default=fractal_defaults.instances_per_category)
    parser.add_argument(
        "--contour-categories", type=int, default=contour_defaults.num_categories, help="0: fractals only"
    )
    parser.add_argument("--contour-instances", type=int, default=contour_defaults.instances_per_category)
    parser.add_argument("--epochs", type=int, default=training_defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=training_defaults.batch_size)
    parser.add_argument("--lr", type=float, default=training_defaults.lr, help="peak AdamW learning rate")
    parser.add_argument("--threads", type=int, default=training_defaults.threads)
    args = parser.parse_args(argv)
    for name in ("categories", "instances", "contour_instances", "epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if args.contour_categories < 0:
        print("--contour-categories must be at least 0", file=sys.stderr)
        return 2
    if not 0 < args.lr < 1:
        print("--lr must be in (0, 1)", file=sys.stderr)
        return 2
    size = NTKCL_TINY_FDSL.model_kwargs["img_size"]
    data: list[DataSettings] = [
        FractalSettings(
            seed=args.seed, num_categories=args.categories, instances_per_category=args.instances, image_size=size
        )
    ]
    if args.contour_categories:
        data.append(
            ContourSettings(
                seed=args.seed,
                num_categories=args.contour_categories,
                instances_per_category=args.contour_instances,
                image_size=size,
            )
        )
    training = dataclasses.replace(
        training_defaults,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
    )
    if sum(settings.num_categories * settings.instances_per_category for settings in data) < training.batch_size:
        print("the generated images must be at least --batch-size", file=sys.stderr)
        return 2
    try:
        check_replaceable(args.output, PRETRAINED_KIND, _is_pretrained_folder)
        state, report = pretrain(NTKCL_TINY_FDSL, data, training, log=lambda line: print(line, flush=True))
        report = write_backbone(args.output, NTKCL_TINY_FDSL, state, report)
    except BadInputError as error:
        print(error, file=sys.stderr)
        return 2
    print(json.dumps({key: report[key] for key in ("weights_sha256", "cpu_seconds", "wall_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
