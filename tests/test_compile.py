"""Step compilation: the policy, equality with eager execution, and the eager fallback.

Inductor needs minutes to compile even the tiny ViT's passes on two CPU cores (measured: about 240 s for
NTK-CL's whole step), so on CPU the compiled path is checked with dynamo's capture and the "eager" backend;
the inductor / CUDA-graph path is checked against the fp32 sequential reference by the GPU test below.
"""

import pytest
import torch

from ntkcl.config import RuntimeConfig
from ntkcl.engine.compile import COMPILE_PAYBACK_STEPS, CompilePlan, compile_method, plan_compilation
from tests.test_ntk_cl import fast_and_sequential_at_task_1

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_compilation_is_off_by_default_on_cpu_and_auto_needs_a_long_cuda_run():
    setting = RuntimeConfig().compile
    assert setting == "auto"
    assert not plan_compilation(setting, CPU, 10**6, False, (16,)).enabled
    assert not plan_compilation(setting, CUDA, COMPILE_PAYBACK_STEPS - 1, False, (16,)).enabled
    long_run = plan_compilation(setting, CUDA, COMPILE_PAYBACK_STEPS, False, (16, 128, 16))
    assert long_run.enabled and long_run.mode == "reduce-overhead" and long_run.batch_sizes == (16, 128)
    assert plan_compilation(setting, CUDA, 10**6, True, (8,)).mode == "default"  # no CUDA graphs under DDP
    assert plan_compilation("on", CPU, 1, False, (16,)).enabled
    assert not plan_compilation("off", CUDA, 10**6, False, (16,)).enabled


def gradients(method) -> list[torch.Tensor | None]:
    return [p.grad for p in method.parameters() if p.requires_grad]


def test_captured_features_give_the_eager_loss_and_gradients_and_odd_batches_run_eagerly():
    methods = fast_and_sequential_at_task_1()
    eager, compiled = methods["fast"], fast_and_sequential_at_task_1()["fast"]
    assert compile_method(compiled, CompilePlan(True, "test", backend="eager", batch_sizes=(4,)), print) == ["features"]
    wrapper = compiled.features
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([2, 3, 3, 2])
    losses = []
    for method in (eager, compiled):
        torch.manual_seed(5)
        loss = method.training_step(images, labels).total()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(gradients(compiled), gradients(eager), strict=True):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    calls = []
    wrapper.eager = lambda *args: calls.append(args[0].shape[0]) or eager.features(*args)
    with torch.no_grad():
        compiled.features(images[:3])  # a task's last, smaller batch
    assert calls == [3] and wrapper.compiled is not None


def test_a_compilation_error_is_reported_once_and_the_target_runs_eagerly():
    method = fast_and_sequential_at_task_1()["fast"]
    reports = []
    compile_method(method, CompilePlan(True, "test", backend="eager", batch_sizes=(2,)), reports.append)
    wrapper = method.features

    def failing_compiler(*args, **kwargs):
        raise RuntimeError("backend exploded")

    wrapper.compiled = failing_compiler
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        first = method.features(images)
        second = method.features(images)
        expected = wrapper.eager(images)
    assert len(reports) == 1 and "backend exploded" in reports[0] and wrapper.compiled is None
    for output in (first, second):
        for mine, theirs in zip(output, expected, strict=True):
            assert torch.equal(mine, theirs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_bf16_step_on_gpu_tracks_the_fp32_sequential_reference():
    """Inductor with CUDA graphs, bf16 autocast: loss and gradients within bf16 tolerance of the reference."""
    methods = fast_and_sequential_at_task_1(CUDA)
    compiled, reference = methods["fast"], methods["sequential"]
    plan = plan_compilation("on", CUDA, 1, False, (8,))
    compile_method(compiled, plan, pytest.fail)
    images = torch.rand(8, 3, 32, 32, device=CUDA)
    labels = torch.tensor([2, 3] * 4, device=CUDA)
    for _ in range(3):  # warm-up, CUDA-graph recording, replay
        for parameter in compiled.parameters():
            parameter.grad = None
        torch.manual_seed(5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled.training_step(images, labels).total()
        loss.backward()
    torch.manual_seed(5)
    reference_loss = reference.training_step(images, labels).total()
    reference_loss.backward()
    torch.testing.assert_close(loss.float(), reference_loss, rtol=2e-2, atol=2e-2)
    for mine, theirs in zip(gradients(compiled), gradients(reference), strict=True):
        if theirs is None or theirs.abs().max() == 0:
            continue
        cosine = torch.nn.functional.cosine_similarity(mine.flatten().float(), theirs.flatten(), dim=0)
        assert cosine > 0.99
        assert (mine.float() - theirs).norm() <= 5e-2 * theirs.norm()
