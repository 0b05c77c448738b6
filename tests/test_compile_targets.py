"""Compile targets of the methods beyond NTK-CL: captured by dynamo (eager backend, as tests/test_compile.py
explains) they train and predict as the eager passes, with no compilation failure and no recompilation in
later tasks. Exactly, where the captured graph runs the eager operations; to rounding where it cannot:
eager `nn.MultiheadAttention` without autograd takes a fused kernel that capture does not (CLIP), and
compiled PROTEUS runs one pass per task over a padded pool instead of one stacked pass."""

import pytest
import torch
from torch._dynamo.utils import counters

from ntkcl.config import OptimConfig
from ntkcl.engine.compile import CompilePlan, compile_method
from ntkcl.engine.optim import TaskOptimization
from ntkcl.engine.training import ShardedBatches, train_step
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.keeplora import KeepLoRAPlus, KeepLoRAPlusParams
from ntkcl.methods.proteus import Proteus, ProteusParams
from ntkcl.models.backbone import create_backbone
from tests import test_keeplora
from tests.conftest import TINY_BACKBONE, TINY_CLIP, FakeData
from tests.test_cl_lora import SGD, engine_step, second_task_method


def test_cl_lora_passes_captured_train_as_the_eager_ones():
    eager, compiled = second_task_method(), second_task_method()
    plan = CompilePlan(True, "test", backend="eager", batch_sizes=(4,))
    assert compile_method(compiled, plan, print) == ["task_feature", "early_exit_feature"]
    images, labels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([2, 3, 3, 2])
    for method in (eager, compiled):
        torch.manual_seed(5)
        engine_step(method, images, labels)  # both stages: distillation, then cross-entropy
    for mine, theirs in zip(compiled.parameters(), eager.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert compiled.task_feature.failure is None and compiled.early_exit_feature.failure is None


# A step size at which these tiny models train stably, so that rounding differences stay rounding differences.
STABLE_SGD = {**SGD, "lr": 0.01}


def trained_task(method, task, data, steps: int = 2) -> list[dict[str, torch.Tensor]]:
    """The engine's loop for one task on one process: begin, prepare, `steps` SGD steps on the task's first
    full batch, then end in eval mode; returns the logged sums of every step."""
    method.begin_task(task)
    method.prepare_task(task, data)
    method.train()
    images, labels = next(data.batches())
    settings = OptimConfig(optimizer="sgd", **STABLE_SGD)
    optimization = TaskOptimization.build(method, settings, updates_per_epoch=steps, epochs=1)
    parts = ShardedBatches(len(labels), len(labels), 1, 0).micro_batches(0, len(labels), 1)
    logged = [
        train_step(method, method, optimization, images, labels, parts, images.device, "fp32") for _ in range(steps)
    ]
    method.eval()
    method.end_task(task, data)
    return logged


def assert_same_training(compiled, eager, compiled_logs, eager_logs) -> None:
    for mine, theirs in zip(compiled_logs, eager_logs, strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key])
    parameters = [dict(method.named_parameters()) for method in (compiled, eager)]
    torch.testing.assert_close(*parameters)
    torch.testing.assert_close(*({name: p.grad for name, p in named.items()} for named in parameters))


def compiled_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.usefixtures("one_thread")
def test_keeplora_plus_image_tower_captured_trains_and_predicts_as_the_eager_one():
    torch._dynamo.reset()
    settings = {key: value for key, value in TINY_CLIP.items() if key != "name"}
    eager, compiled = (
        test_keeplora.build(create_backbone(TINY_CLIP["name"], **settings), KeepLoRAPlus, KeepLoRAPlusParams)
        for _ in range(2)
    )
    assert compile_method(compiled, CompilePlan(True, "test", backend="eager", batch_sizes=(4,)), print) == [
        "image_features"
    ]
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    before, graphs = compiled_graphs(), []
    for index, known in enumerate((0, 3)):
        task = test_keeplora.make_task(index, known, 3)
        data = test_keeplora.task_data(task, count=8, seed=index)
        logs = []
        for method in (eager, compiled):
            torch.manual_seed(5)
            logs.append(trained_task(method, task, data))
        assert_same_training(compiled, eager, logs[1], logs[0])
        torch.testing.assert_close(compiled.predict(images), eager.predict(images))
        graphs.append(compiled_graphs() - before)
    # One graph each for the training step, the classifier's initial class means and prediction, all
    # captured in the first task: the LoRAs of the next one come in as parameters of the same graphs.
    assert graphs == [3, 3]
    assert compiled.image_features.failure is None


def test_proteus_task_pass_captured_trains_and_predicts_as_the_eager_one_without_recompiling_per_task():
    torch._dynamo.reset()

    def build() -> Proteus:
        backbone = create_backbone(
            TINY_BACKBONE["name"], pretrained=False, model_kwargs=TINY_BACKBONE["model_kwargs"], init_seed=0
        )
        torch.manual_seed(0)
        params = ProteusParams(added_units=2, projection_dim=16, n_components=2, down_init="orthogonal_to_pool")
        return Proteus(backbone, params)

    eager, compiled = build(), build()
    assert compile_method(compiled, CompilePlan(True, "test", backend="eager", batch_sizes=(4,)), print) == [
        "task_pass"
    ]
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tasks = [TaskInfo(index, 3, 2 * index, 2) for index in range(3)]
    for method in (eager, compiled):
        method.begin_stream(tasks)  # as the engine does: the final pool size is known before the first task
    before, graphs = compiled_graphs(), []
    for index, task in enumerate(tasks):
        generator = torch.Generator().manual_seed(index)
        data = FakeData(torch.rand(8, 3, 32, 32, generator=generator), 2 * index + torch.arange(8) % 2)
        logs = []
        for method in (eager, compiled):
            torch.manual_seed(5)
            logs.append(trained_task(method, task, data))
        assert_same_training(compiled, eager, logs[1], logs[0])
        with torch.no_grad():
            torch.testing.assert_close(compiled.predict(images), eager.predict(images))
        graphs.append(compiled_graphs() - before)
    # The first task captures the training step and the evaluation pass (the end-of-task embedding and
    # prediction share its shapes); later tasks, with more tasks listed and a larger pool, reuse them.
    assert graphs == [2, 2, 2]
    assert compiled.task_pass.failure is None
