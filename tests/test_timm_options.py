"""timm's training options, each opt-in: what it changes in the optimizer, the schedule or the step.

The defaults must stay the papers' (torch SGD, one group, cosine per epoch); each option is checked
against its documented effect on a finetune method over a 16-pixel, two-block ViT.
"""

import math

import pytest
import timm.optim
import torch

from ntkcl.config import OptimConfig, RunConfig
from ntkcl.engine.builders import build_run_transforms
from ntkcl.engine.optim import TaskOptimization, backbone_layers, layer_of
from ntkcl.engine.training import ShardedBatches, train_step
from ntkcl.errors import BadInputError
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.finetune import Finetune, FinetuneParams
from ntkcl.models.backbone import create_backbone

UPDATES_PER_EPOCH = 4


@pytest.fixture
def method():
    backbone = create_backbone("test_vit", pretrained=False, model_kwargs={"img_size": 16, "patch_size": 8, "depth": 2})
    torch.manual_seed(0)
    finetune = Finetune(backbone, FinetuneParams(adapter_dropout=0.0))
    finetune.begin_task(TaskInfo(index=0, num_tasks=1, known_classes=0, num_new_classes=3))
    return finetune


def build(method, **options) -> TaskOptimization:
    settings = OptimConfig(lr=0.1, epochs=4, weight_decay=0.05, **options)
    return TaskOptimization.build(method, settings, UPDATES_PER_EPOCH, settings.epochs)


def names_by_group(method, optimization):
    names = {id(p): n for n, p in method.named_parameters()}
    return [sorted(names[id(p)] for p in group["params"]) for group in optimization.optimizer.param_groups]


@pytest.mark.filterwarnings("ignore:Detected call of")  # the schedule alone, no training
def test_defaults_are_the_papers_torch_sgd_and_cosine(method):
    optimization = build(method)
    assert type(optimization.optimizer) is torch.optim.SGD
    assert len(optimization.optimizer.param_groups) == 1
    group = optimization.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 0.05, False)
    assert type(optimization.schedule.scheduler) is torch.optim.lr_scheduler.CosineAnnealingLR
    learning_rates = []
    for epoch in range(4):
        learning_rates.append(optimization.learning_rate)
        optimization.epoch_end(epoch + 1)
    assert learning_rates == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])


def test_weight_decay_exclude_1d_takes_biases_and_vectors_out_of_decay(method):
    optimization = build(method, weight_decay_exclude_1d=True)
    decays = {}
    for group, names in zip(optimization.optimizer.param_groups, names_by_group(method, optimization)):
        decays.update(dict.fromkeys(names, group["weight_decay"]))
    for name, parameter in method.named_parameters():
        if parameter.requires_grad:
            expected = 0.0 if parameter.ndim == 1 or name.endswith(".bias") else 0.05
            assert decays[name] == expected, name
    assert decays["adapters.0.down.weight"] == 0.05 and decays["adapters.0.down.bias"] == 0.0


def test_layer_decay_scales_each_block_and_applies_through_timms_scheduler(method):
    optimization = build(method, layer_decay=0.5)
    assert optimization.schedule.scheduler.__class__.__module__.startswith("timm.scheduler")
    lrs = {}
    for group, names in zip(optimization.optimizer.param_groups, names_by_group(method, optimization)):
        lrs.update(dict.fromkeys(names, (group["lr_scale"], group["lr"])))
    # timm's layers for two blocks: embeddings 0 (0.5^2), block 0 and its adapter 1 (0.5), block 1, final norm
    # and heads 2 (1)
    assert lrs["adapters.0.down.weight"] == (0.5, pytest.approx(0.05))
    assert lrs["adapters.1.up.weight"] == (1.0, pytest.approx(0.1))
    assert lrs["heads.0.weight"] == (1.0, pytest.approx(0.1))
    layers = backbone_layers(method.backbone)
    assert layer_of(method, "backbone.vit.blocks.1.attn.qkv.weight", 2, layers) == 2
    assert layer_of(method, "backbone.vit.patch_embed.proj.weight", 2, layers) == 0
    assert layer_of(method, "backbone.vit.norm.weight", 2, layers) == 2


def test_warmup_epochs_ramp_linearly_from_warmup_lr(method):
    optimization = build(method, warmup_epochs=2, warmup_lr=0.001)
    learning_rates = []
    for epoch in range(4):
        learning_rates.append(optimization.learning_rate)
        optimization.epoch_end(epoch + 1)
    assert learning_rates[:2] == pytest.approx([0.001, 0.001 + (0.1 - 0.001) / 2])
    assert learning_rates[2] == pytest.approx(0.1 * (1 + math.cos(math.pi * 2 / 4)) / 2)


def test_sched_on_updates_moves_the_rate_after_every_update(method):
    optimization = build(method, sched_on_updates=True)
    before = optimization.learning_rate
    optimization.update()  # no gradients: only the schedule moves
    optimization.end_step()
    assert optimization.learning_rate == pytest.approx(0.1 * (1 + math.cos(math.pi / (4 * UPDATES_PER_EPOCH))) / 2)
    assert optimization.learning_rate < before


def test_onecycle_is_torchs_stepped_per_update(method):
    optimization = build(method, scheduler="onecycle")
    scheduler = optimization.schedule.scheduler
    assert type(scheduler) is torch.optim.lr_scheduler.OneCycleLR and scheduler.total_steps == 4 * UPDATES_PER_EPOCH
    start = optimization.learning_rate
    assert start == pytest.approx(0.1 / 25)
    optimization.update()
    optimization.end_step()
    assert optimization.learning_rate > start


def test_timm_optimizer_names_use_timms_factory(method):
    assert type(build(method, optimizer="lamb").optimizer) is timm.optim.Lamb
    assert type(build(method, optimizer="nesterov").optimizer).__name__ == "SGD"
    assert build(method, optimizer="nesterov").optimizer.param_groups[0]["nesterov"] is True


def test_unknown_optimizer_and_inconsistent_options_are_rejected():
    with pytest.raises(ValueError, match="timm optimizer"):
        OptimConfig(optimizer="no-such-optimizer")
    with pytest.raises(ValueError, match="accumulation_steps"):
        OptimConfig(batch_size=10, accumulation_steps=4)
    with pytest.raises(ValueError, match="onecycle"):
        OptimConfig(scheduler="onecycle", warmup_epochs=1)


def step_once(method, images, labels, **options):
    """One optimizer step of `method` (a copy) on the batch; returns the changed trainable tensors."""
    model = type(method)(method.backbone, method.params)
    model.begin_task(TaskInfo(index=0, num_tasks=1, known_classes=0, num_new_classes=3))
    model.load_state_dict(method.state_dict())
    settings = OptimConfig(lr=0.1, epochs=1, momentum=0.0, batch_size=len(labels), **options)
    optimization = TaskOptimization.build(model, settings, 1, settings.epochs)
    shards = ShardedBatches(len(labels), len(labels), 1, 0)
    parts = shards.micro_batches(0, len(labels), settings.accumulation_steps)
    train_step(model, model, optimization, images, labels, parts, torch.device("cpu"), "fp32")
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_clip_grad_bounds_the_update_and_accumulation_keeps_the_step(method):
    torch.manual_seed(1)
    images, labels = torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,))
    start = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    plain = step_once(method, images, labels)
    clipped = step_once(method, images, labels, clip_grad=1e-3)
    # SGD without momentum: the update is lr x gradient, so clipping the norm to 1e-3 bounds it by 1e-4.
    update_norm = torch.cat([(clipped[n] - start[n]).flatten() for n in start]).norm()
    assert update_norm == pytest.approx(0.1 * 1e-3, rel=1e-4)
    assert torch.cat([(plain[n] - start[n]).flatten() for n in start]).norm() > 10 * update_norm
    # Four micro-batches of two images give the gradient of the batch of eight: the same step.
    accumulated = step_once(method, images, labels, accumulation_steps=4)
    for name, value in plain.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("size", "world_size", "accumulation"), [(21, 2, 2), (9, 2, 4), (3, 1, 2)])
def test_micro_batches_weights_sum_to_the_step_mean(size, world_size, accumulation):
    batch = 4 * world_size
    for step in range(-(-size // batch)):
        total = 0.0
        for rank in range(world_size):
            shards = ShardedBatches(size, batch, world_size, rank)
            per_process = batch // world_size
            loaded = min(per_process, -(-size // world_size) - step * per_process)
            parts = shards.micro_batches(step, loaded, accumulation)
            assert sum(part.real for part in parts) == shards.real_on_rank(step)
            assert all(part.stop > part.start for part in parts)
            total += sum(part.loss_weight for part in parts)
        assert total == pytest.approx(world_size)


def test_run_config_records_the_defaults():
    optim = RunConfig().optim
    assert (optim.warmup_epochs, optim.clip_grad, optim.accumulation_steps, optim.layer_decay) == (0, None, 1, None)
    assert optim.weight_decay_exclude_1d is False and optim.sched_on_updates is False


def test_timm_augment_follows_the_backbones_data_config(method):
    from torchvision import transforms as T

    config = RunConfig()
    config.stream.augment = "timm"
    train, test = build_run_transforms(config, method.backbone)
    data = method.backbone.data_config()
    assert data["input_size"] == (3, 16, 16)
    resize, crop = test.transforms[0], test.transforms[1]
    assert resize.size == math.floor(16 / data["crop_pct"]) and crop.size == (16, 16)
    assert resize.interpolation == T.InterpolationMode.BICUBIC == T.InterpolationMode(data["interpolation"])
    normalize = test.transforms[-1]
    assert tuple(normalize.mean.tolist()) == tuple(data["mean"]) and tuple(normalize.std.tolist()) == tuple(data["std"])
    assert type(train.transforms[0]).__name__ == "RandomResizedCropAndInterpolation"
    method.backbone.normalize = "timm"
    with pytest.raises(BadInputError, match="normalised twice"):
        build_run_transforms(config, method.backbone)
