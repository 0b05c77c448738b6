"""PROTEUS cost: training images/s, evaluation images/s with T stored tasks (one stacked pass vs a loop of T
passes), and DP-GMM fitting seconds per task.

Prints one JSON document. Evaluation embeds every image with every stored task's model; `batched` runs the
T task models as one backbone pass over the images stacked T times (`tasks_per_pass=0`), `looped` as T
passes (`tasks_per_pass=1`), with the same retrieval and head in both. Stored tasks get trained-shaped
LoRA units (random up-projections) and signatures of `--components` full-covariance Gaussians. The DP-GMM
fit (scikit-learn, CPU) runs on `--gmm-images` synthetic d-dimensional features drawn from a mixture of
Gaussians, so its cost (images x components x d² per EM iteration) does not need a trained backbone.

Usage: python benchmarks/proteus_throughput.py [--backbone vit_base_patch16_224] [--batch 32]
       [--eval-batch 16] [--tasks 5,10,20] [--steps 5] [--warmup 1] [--projection-dim 10000]
       [--components 20] [--gmm-images 2000] [--gmm-components 20] [--gmm-max-iter 100] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from ntkcl.methods.base import TaskInfo
from ntkcl.methods.proteus import Proteus, ProteusParams
from ntkcl.models.backbone import create_backbone
from ntkcl.models.signatures import GaussianMixtureSignature


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call after `warmup` calls."""
    for _ in range(warmup):
        function()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def stored_tasks(backbone, device, count: int, args) -> Proteus:
    """A PROTEUS that has finished `count` tasks of 10 classes: LoRA units, signatures and a ridge head."""
    torch.manual_seed(0)
    method = Proteus(backbone, ProteusParams(projection_dim=args.projection_dim)).to(device)
    dim = backbone.embed_dim
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        method.begin_task(TaskInfo(index, count, 10 * index, 10))
        with torch.no_grad():
            for lora in [*method.tasks[index].q, *method.tasks[index].v]:
                lora.up.normal_(std=0.02)
        factors = torch.randn(args.components, dim, dim, generator=generator) / dim**0.5
        covariances = factors @ factors.transpose(1, 2) + 0.1 * torch.eye(dim)
        signature = GaussianMixtureSignature(args.components, dim)
        signature.set_parameters(
            torch.full((args.components,), 1 / args.components),
            torch.randn(args.components, dim, generator=generator),
            covariances,
        )
        method.signatures.append(signature.to(device))
    method.tasks.requires_grad_(False)
    method.train_head = None
    with torch.no_grad():
        method.head.weight.normal_()
    method.seen_classes = 10 * count
    return method.eval()


def measure_training(backbone, device, autocast, args) -> dict:
    """Images/s of one training step of the fifth task (four tasks in the pool), Adam, clipping at 1.0."""
    method = stored_tasks(backbone, device, 4, args)
    method.begin_task(TaskInfo(4, 5, 40, 10))
    method.to(device).train()
    parameters = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    size = backbone.img_size
    images = torch.rand(args.batch, 3, size, size, device=device)
    labels = torch.randint(40, 50, (args.batch,), device=device)

    def step():
        with autocast:
            loss = method.training_step(images, labels).total()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    seconds = timed(step, args.steps, args.warmup, device)
    return {"batch": args.batch, "images_per_s": args.batch / seconds}


def measure_evaluation(backbone, device, autocast, tasks: int, args) -> dict:
    method = stored_tasks(backbone, device, tasks, args)
    size = backbone.img_size
    images = torch.rand(args.eval_batch, 3, size, size, device=device)
    result = {}
    for mode, per_pass in (("batched", 0), ("looped", 1)):
        method.params.tasks_per_pass = per_pass

        def predict():
            with torch.no_grad(), autocast:
                method.predict(images)

        result[f"{mode}_images_per_s"] = args.eval_batch / timed(predict, args.steps, args.warmup, device)
    result["batched_speedup"] = result["batched_images_per_s"] / result["looped_images_per_s"]
    return result


def measure_gmm(dim: int, args) -> dict:
    """Seconds of one DP-GMM fit on `--gmm-images` features from a 10-cluster Gaussian mixture."""
    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(10, dim, generator=generator)
    features = centres[torch.randint(0, 10, (args.gmm_images,), generator=generator)]
    features = features + torch.randn(args.gmm_images, dim, generator=generator)
    _, fit = GaussianMixtureSignature.fit(features, args.gmm_components, 0.1, max_iter=args.gmm_max_iter, seed=0)
    return {
        "images": args.gmm_images,
        "dim": dim,
        "max_components": args.gmm_components,
        "kept_components": fit.components,
        "iterations": fit.iterations,
        "converged": fit.converged,
        "seconds_per_task": fit.seconds,
        "seconds_per_iteration": fit.seconds / max(fit.iterations, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--tasks", default="5,10,20", help="stored task counts for evaluation")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--projection-dim", type=int, default=10_000)
    parser.add_argument("--components", type=int, default=20, help="Gaussians per stored signature")
    parser.add_argument("--gmm-images", type=int, default=2000)
    parser.add_argument("--gmm-components", type=int, default=20)
    parser.add_argument("--gmm-max-iter", type=int, default=100)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    backbone = create_backbone(args.backbone, pretrained=False).to(device)
    document = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "backbone": f"{args.backbone} (random init)",
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "steps": args.steps,
        "projection_dim": args.projection_dim,
        "signature_components": args.components,
        "torch": torch.__version__,
        "training": measure_training(backbone, device, autocast, args),
        "evaluation": {
            "batch": args.eval_batch,
            **{
                f"{count}_tasks": measure_evaluation(backbone, device, autocast, count, args)
                for count in (int(value) for value in args.tasks.split(","))
            },
        },
        "dp_gmm_fit": measure_gmm(backbone.embed_dim, args),
    }
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
