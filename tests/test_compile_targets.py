"""Compile targets of the methods beyond NTK-CL: captured by dynamo (eager backend, as tests/test_compile.py
explains) they train exactly as the eager passes, with no compilation failure."""

import torch

from ntkcl.engine.compile import CompilePlan, compile_method
from tests.test_cl_lora import engine_step, second_task_method


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
