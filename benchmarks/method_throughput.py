"""Training and evaluation throughput of every registered method, in one run so the ratios are comparable.

For each method of the `ntkcl.methods` entry points (methods added later appear by themselves), on one randomly
initialised backbone (a ViT for plain-ViT methods, CLIP for methods that need its towers):

* the method goes through `--tasks` tasks of `--classes-per-task` classes with its real hooks (`begin_task`,
  `prepare_task`, `end_task` on random images), so it holds the state of a run at its last task (stored
  adapters, prototypes, subspaces);
* train: images/s of one optimizer step of the last task through the engine's `train_step` (every training
  stage), at the batch size of the method's preset for `--stream` (the paper's), capped by `--max-batch`;
* eval: images/s of `predict` over all seen classes at `--eval-batch`;
* backbone passes per image: images that entered the backbone's first block per image of the step or of the
  prediction (a method that runs T adapter sets over stacked copies of a batch counts T).

A method that fails on this backbone is listed with its error instead of numbers. bf16 autocast on GPU, fp32 on
CPU, as the engine runs.

Usage: python benchmarks/method_throughput.py [--backbone vit_base_patch16_224] [--clip-backbone
       clip:ViT-B-16/openai] [--stream imagenet-r] [--tasks 5] [--eval-batch 64] [--steps 3] [--small]
       [--methods ease inflora ...] [--param ranpac.projection_dim=1000 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch
from _device import describe_device, pick_device, timed
from torch.nn.utils import parametrize

from ntkcl.config import OptimConfig
from ntkcl.engine.optim import TaskOptimization
from ntkcl.engine.training import ShardedBatches, train_step
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.registry import discover_methods, validate_params
from ntkcl.models.backbone import CLIP_TOWERS, create_backbone
from ntkcl.presets import resolve_config

# Small random models for a CPU check: a 32-pixel ViT and CLIP of width 64 and depth 2.
SMALL_VIT = {"img_size": 32, "patch_size": 8, "depth": 2}
SMALL_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


class RandomTaskData:
    """`TaskData` of one process over random images of a task's classes."""

    def __init__(self, task: TaskInfo, images: int, size: int, device: torch.device, batch: int):
        generator = torch.Generator().manual_seed(task.index)
        self.device = device
        self.images = torch.rand(images, 3, size, size, generator=generator).to(device)
        self.labels = (task.known_classes + torch.arange(images) % task.num_new_classes).to(device)
        self.batch = batch

    def indexed_batches(self):
        for start in range(0, len(self.labels), self.batch):
            stop = start + self.batch
            yield self.images[start:stop], self.labels[start:stop], torch.arange(start, min(stop, len(self.labels)))

    def batches(self):
        for images, labels, _ in self.indexed_batches():
            yield images, labels

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class PassCounter:
    """Counts the images entering the backbone's first block (at its first norm, which block forwards that
    re-compose a block call too)."""

    def __init__(self, backbone):
        self.images = 0
        block = backbone.blocks[0]
        first_norm = getattr(block, "norm1", None) or getattr(block, "ln_1", block)
        self.handle = first_norm.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.images += args[0].shape[0]


def restore(backbone) -> None:
    """Drop what a method attached to the shared backbone's weights (parametrizations), for the next method."""
    for module in backbone.modules():
        for name in list(getattr(module, "parametrizations", {}) or {}):
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def autocast_on(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def stream_tasks(count: int, per_task: int) -> list[TaskInfo]:
    tasks = []
    for index in range(count):
        names = tuple(f"class {index * per_task + k}" for k in range(per_task))
        tasks.append(TaskInfo(index, count, index * per_task, per_task, increment=per_task, class_names=names))
    return tasks


def preset_batch(method: str, stream: str) -> int:
    return resolve_config(overrides={"stream": {"dataset": stream}, "method": {"name": method}}).optim.batch_size


def method_overrides(assignments: list[str]) -> dict[str, dict]:
    """`METHOD.KEY=VALUE` (VALUE in JSON) -> {method: {key: value}}."""
    overrides: dict[str, dict] = {}
    for assignment in assignments:
        target, _, value = assignment.partition("=")
        method, _, key = target.partition(".")
        overrides.setdefault(method, {})[key] = json.loads(value)
    return overrides


def measure(name: str, cls, backbone, device: torch.device, args) -> dict:
    torch.manual_seed(0)
    params = validate_params(cls, method_overrides(args.param).get(name, {}))
    method = cls(backbone, params).to(device)
    tasks = stream_tasks(args.tasks, args.classes_per_task)
    method.begin_stream(tasks)
    size = backbone.img_size
    for task in tasks:
        data = RandomTaskData(task, args.task_images, size, device, args.eval_batch)
        method.begin_task(task)
        method.to(device)
        with autocast_on(device):
            method.prepare_task(task, data)
        if task.is_last:
            break
        method.eval()
        with torch.no_grad(), autocast_on(device):
            method.end_task(task, data)
    batch = min(preset_batch(name, args.stream), args.max_batch)
    last = tasks[-1]
    images = torch.rand(batch, 3, size, size, device=device)
    labels = (last.known_classes + torch.arange(batch) % last.num_new_classes).to(device)
    optimization = TaskOptimization.build(method, OptimConfig(lr=1e-4), updates_per_epoch=1, epochs=1)
    parts = ShardedBatches(batch, batch, 1, 0).micro_batches(0, batch, 1)
    precision = "bf16" if device.type == "cuda" else "fp32"
    method.train()

    def step():
        train_step(method, method, optimization, images, labels, parts, device, precision)

    counter = PassCounter(backbone)
    trains = any(parameter.requires_grad for parameter in method.parameters())
    if trains:
        step()
        train_passes = counter.images / batch
        train_seconds = timed(device, step, args.steps)
    method.eval()
    with torch.no_grad(), autocast_on(device):
        method.end_task(last, RandomTaskData(last, args.task_images, size, device, args.eval_batch))
    eval_images = torch.rand(args.eval_batch, 3, size, size, device=device)
    with torch.no_grad(), autocast_on(device):
        counter.images = 0
        logits = method.predict(eval_images)
        eval_passes = counter.images / args.eval_batch
        eval_seconds = timed(device, lambda: method.predict(eval_images), args.steps)
    counter.handle.remove()
    training = (
        {
            "train_batch": batch,
            "train_images_per_s": batch / train_seconds,
            "train_backbone_passes_per_image": train_passes,
        }
        if trains
        else {"train": "nothing to train"}
    )
    return {
        **training,
        "eval_images_per_s": args.eval_batch / eval_seconds,
        "eval_backbone_passes_per_image": eval_passes,
        "seen_classes": int(logits.shape[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--clip-backbone", default="clip:ViT-B-16/openai")
    parser.add_argument("--stream", default="imagenet-r", help="whose preset batch sizes to use")
    parser.add_argument("--tasks", type=int, default=5, help="tasks the method has seen when measured")
    parser.add_argument("--classes-per-task", type=int, default=10)
    parser.add_argument("--task-images", type=int, default=64, help="random images per task for the statistics")
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="32-pixel ViT and CLIP of depth 2 (a CPU check)")
    parser.add_argument("--methods", nargs="*", help="only these methods (default: every registered one)")
    parser.add_argument(
        "--param", action="append", default=[], help="METHOD.KEY=JSON: a hyper-parameter other than the default"
    )
    args = parser.parse_args()
    device = pick_device(args.device)
    vit = create_backbone(args.backbone, pretrained=False, model_kwargs=SMALL_VIT if args.small else None)
    clip_settings = {"model_kwargs": SMALL_CLIP} if args.small else {}
    clip = None
    document = {
        "device": describe_device(device),
        "backbone": f"{args.backbone} (random init{', small' if args.small else ''})",
        "clip_backbone": f"{args.clip_backbone} (random init{', small' if args.small else ''})",
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "torch": torch.__version__,
        "stream_presets": args.stream,
        "tasks": args.tasks,
        "classes_per_task": args.classes_per_task,
        "eval_batch": args.eval_batch,
        "steps": args.steps,
        "params": method_overrides(args.param),
        "methods": {},
    }
    for name, item in sorted(discover_methods().items()):
        if args.methods and name not in args.methods:
            continue
        if not item.ok:
            document["methods"][name] = {"error": item.error}
            continue
        if CLIP_TOWERS in item.obj.required_backbone_features:
            if clip is None:
                clip = create_backbone(args.clip_backbone, pretrained=False, normalize="clip", **clip_settings)
            backbone = clip.to(device)
        else:
            backbone = vit.to(device)
        try:
            document["methods"][name] = measure(name, item.obj, backbone, device, args)
        except Exception as error:  # noqa: BLE001 - one method's failure is reported, the others still run
            document["methods"][name] = {"error": "".join(traceback.format_exception_only(error)).strip()}
        restore(backbone)
        print(json.dumps({name: document["methods"][name]}), file=sys.stderr, flush=True)  # progress of a long run
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
