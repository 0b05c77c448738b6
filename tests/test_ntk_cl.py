"""NTK-CL pieces against hand computation and the reference's sizes (shared/reference/ntk-cl.md)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ntkcl.errors import BadInputError
from ntkcl.methods.base import TaskInfo
from ntkcl.methods.ntk_cl import (
    NTKCL,
    NTKCLParams,
    averaging_coefficients,
    finite_or_zero,
    info_nce,
    orthogonality_basis,
    orthogonality_loss,
    section_logits,
)
from ntkcl.models.backbone import create_backbone
from ntkcl.models.fusion import AttentionFusion
from tests.conftest import TINY_BACKBONE, ListData, finish_first_task


def tiny_method(**params) -> NTKCL:
    backbone = create_backbone(
        TINY_BACKBONE["name"], pretrained=False, model_kwargs=TINY_BACKBONE["model_kwargs"], init_seed=0
    )
    return NTKCL(backbone, NTKCLParams(fusion_heads=4, **params))


def test_averaging_coefficients_over_five_tasks():
    expected = [(0.0, 1.0), (1 / 2, 1 / 2), (2 / 3, 1 / 3), (3 / 4, 1 / 4), (4 / 5, 1 / 5)]
    for task, (a, b) in enumerate(expected):
        assert averaging_coefficients(task) == pytest.approx((a, b))


def test_averaged_copy_is_the_running_mean_of_end_of_task_parameters():
    method = tiny_method()
    snapshots = []
    for task in range(5):
        with torch.no_grad():
            for parameter in method.current.parameters():
                parameter.copy_(torch.randn_like(parameter))
        snapshots.append([p.clone() for p in method.current.parameters()])
        method.average_copies(task)
    for index, averaged in enumerate(method.averaged.parameters()):
        mean = torch.stack([snapshot[index] for snapshot in snapshots]).mean(0)
        torch.testing.assert_close(averaged, mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("after_last", "changes"), [(False, False), (True, True)])
def test_no_averaging_after_the_last_task_unless_asked(after_last, changes):
    method = tiny_method(average_after_last_task=after_last)
    task = TaskInfo(index=1, num_tasks=2, known_classes=2, num_new_classes=2)
    method.begin_task(TaskInfo(0, 2, 0, 2))
    method.begin_task(task)
    with torch.no_grad():
        method.current["channel"][0].up.weight.fill_(1.0)
    before = method.averaged["channel"][0].up.weight.clone()
    images = torch.rand(4, 3, 32, 32)
    method.eval()
    method.end_task(task, ListData([(images, torch.tensor([2, 2, 3, 3]))]))
    assert (not torch.equal(before, method.averaged["channel"][0].up.weight)) == changes


def test_prototypes_are_class_means_of_the_fused_feature_and_never_recomputed():
    method = tiny_method().eval()
    images, labels = finish_first_task(method)
    _, _, fused = method.features(images)  # after end_task: the averaged copy has been updated first
    expected = torch.stack([fused[labels == c].mean(0) for c in (0, 1)])
    torch.testing.assert_close(method.prototypes.prototypes, expected, rtol=1e-5, atol=1e-6)
    stored = method.prototypes.prototypes.clone()
    second = TaskInfo(1, 2, 2, 2)
    method.begin_task(second)
    with torch.no_grad():
        method.current["channel"][1].up.weight.normal_()
    method.end_task(second, ListData([(images[:4], labels[:4] + 2)]))
    assert torch.equal(method.prototypes.prototypes[:2], stored)
    assert method.prototypes.num_classes == 4


def test_section_weighted_logits_by_hand():
    # Two sections of width 2: the feature is (1,0 | 0,1); class 0 = (1,0 | 1,0), class 1 = (0,1 | 0,1).
    features = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    prototypes = torch.tensor([[2.0, 0.0, 3.0, 0.0], [0.0, 5.0, 0.0, 1.0]])
    logits = section_logits(features, prototypes, [0.3, 0.1])
    # class 0: 0.3*cos=1 + 0.1*cos=0 = 0.3; class 1: 0.3*0 + 0.1*1 = 0.1
    torch.testing.assert_close(logits, torch.tensor([[0.3, 0.1]]))
    three = section_logits(torch.ones(1, 6), torch.ones(1, 6), [1.0, 0.3, 0.1])
    torch.testing.assert_close(three, torch.tensor([[1.4]]))


def test_info_nce_by_hand_and_its_guard():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    t = 0.1
    # s = cos / t: s01 = s10 = 10, every pair with sample 2 is 0.
    positive = -math.log(2 * math.exp(10))
    rows = [math.log(math.exp(10) + 1), math.log(math.exp(10) + 1), math.log(2)]
    assert info_nce(features, labels, t).item() == pytest.approx(positive + sum(rows) / 3, rel=1e-5)
    no_positive = info_nce(features, torch.tensor([0, 1, 2]), t)
    assert math.isinf(no_positive.item())
    assert finite_or_zero(no_positive).item() == 0.0


def test_orthogonality_losses_by_hand():
    basis = torch.tensor([[1.0], [0.0], [0.0]])  # span(e1)
    features = torch.tensor([[3.0, 4.0, 0.0]])  # unit: (0.6, 0.8, 0)
    # signed sum of the residual (0, 0.8, 0) = 0.8; squared projection = 0.36
    assert orthogonality_loss(features, basis, "signed_sum").item() == pytest.approx(0.8)
    assert orthogonality_loss(features, basis, "projection").item() == pytest.approx(0.36)


def test_orthogonality_basis_quirk_and_corrected_variant():
    zeros = torch.zeros(5, 8)  # task 0: five zero prototype rows of width 8
    reference = orthogonality_basis(zeros, rank=40, old_classes=0, mode="reference")
    assert reference.shape == (8, 8)  # rank clipped by the width; arbitrary orthonormal directions
    torch.testing.assert_close(reference.T @ reference, torch.eye(8), atol=1e-5, rtol=0)
    assert orthogonality_basis(zeros, 40, 0, "old_prototypes") is None
    prototypes = torch.zeros(3, 8)
    prototypes[0, 0], prototypes[1, 1] = 2.0, 5.0  # two old classes, one new (zero) row
    corrected = orthogonality_basis(prototypes, 40, 2, "old_prototypes")
    assert corrected.shape == (8, 2)
    projection = corrected @ corrected.T
    torch.testing.assert_close(projection[:2, :2], torch.eye(2), atol=1e-5, rtol=0)


def test_reference_fusion_is_the_value_projection():
    fusion = AttentionFusion(dim=8, section_dim=4, num_heads=2).eval()
    channel, patch = torch.randn(3, 8), torch.randn(3, 8)
    expected = 0.5 * fusion.value(channel) + channel + 0.1 * patch
    torch.testing.assert_close(fusion(channel, patch), expected)
    sections = AttentionFusion(dim=8, section_dim=4, num_heads=2, mode="sections").eval()
    assert sections(channel, patch).shape == (3, 8)


def test_reference_sizes_on_vit_base():
    backbone = create_backbone("vit_base_patch16_224", pretrained=False)
    method = NTKCL(backbone, NTKCLParams())
    per_copy = sum(p.numel() for p in method.current.parameters())
    assert per_copy == 346_512
    assert sum(p.numel() for p in method.current["channel"].parameters()) == 304_320
    assert sum(p.numel() for p in method.current["patch"].parameters()) == 42_192
    assert sum(p.numel() for p in method.fusion.parameters()) == 3 * (1536**2 + 1536) == 7_082_496
    with_plain = NTKCL(backbone, NTKCLParams(use_init_ptm=True))
    assert sum(p.numel() for p in with_plain.fusion.parameters()) == 3 * (2304**2 + 2304)


def test_gradients_reach_only_the_current_copy_fusion_value_and_head():
    method = tiny_method()
    method.begin_task(TaskInfo(0, 2, 0, 2))
    method.begin_task(TaskInfo(1, 2, 2, 2))  # old prototypes exist (zero rows) so every term is active
    with torch.no_grad():
        method.prototypes.prototypes[:2].normal_()
    method.train()
    output = method.training_step(torch.rand(4, 3, 32, 32), torch.tensor([2, 3, 2, 3]))
    output.loss.backward()
    assert all(p.grad is None for p in method.backbone.parameters())
    assert all(p.grad is None for p in method.averaged.parameters())
    # query and key only meet the L2 pull towards the task-start values, whose gradient is zero here
    assert torch.count_nonzero(method.fusion.query.weight.grad) == 0
    assert torch.count_nonzero(method.fusion.key.weight.grad) == 0
    assert method.fusion.value.weight.grad is not None
    assert method.current["channel"][0].up.weight.grad.abs().sum() > 0
    assert method.current["patch"][1].token_mix.weight.grad is not None
    assert method.proxy_head.weight.grad is not None and method.proxy_head.sigma.grad is not None


def fast_and_sequential_at_task_1(device="cpu") -> dict[str, NTKCL]:
    """Two methods with equal state in their second task (old prototypes exist, every loss term is active)."""
    torch.manual_seed(0)
    methods = {execution: tiny_method(execution=execution) for execution in ("fast", "sequential")}
    fast = methods["fast"]
    fast.begin_task(TaskInfo(0, 2, 0, 2))
    with torch.no_grad():
        fast.prototypes.prototypes.normal_(generator=torch.Generator().manual_seed(1))
        for parameter in fast.current.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.05)
        fast.average_copies(0)
    sequential = methods["sequential"]
    sequential.begin_task(TaskInfo(0, 2, 0, 2))
    sequential.load_state_dict(fast.state_dict())
    for method in methods.values():
        method.seen_classes = 2
        method.begin_task(TaskInfo(1, 2, 2, 2))
    sequential.proxy_head.load_state_dict(fast.proxy_head.state_dict())
    for method in methods.values():
        method.to(device).eval()  # no dropout, so every execution sees the same function
    return methods


def test_every_execution_computes_the_same_loss_and_gradients():
    methods = fast_and_sequential_at_task_1()
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([2, 3, 3, 2])
    losses, gradients = {}, {}
    for execution, method in methods.items():
        torch.manual_seed(5)
        loss = method.training_step(images, labels).total()
        loss.backward()
        losses[execution] = loss.detach()
        # the last block's generator gets none: its prompts never reach the CLS token
        gradients[execution] = [p.grad for p in method.parameters() if p.requires_grad]
    torch.testing.assert_close(losses["sequential"], losses["fast"], rtol=1e-5, atol=1e-6)
    for theirs, mine in zip(gradients["sequential"], gradients["fast"], strict=True):
        assert (theirs is None) == (mine is None)
        if mine is not None:
            torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_fast_execution_on_gpu_tracks_the_fp32_reference():
    """The GPU path (bf16 autocast, stacked passes) stays close to the reference's fp32 sequential one;
    prototypes, averaged copies and the orthogonality basis stay fp32."""
    device = torch.device("cuda")
    methods = fast_and_sequential_at_task_1(device)
    images = torch.rand(8, 3, 32, 32, device=device)
    labels = torch.tensor([2, 3] * 4, device=device)
    torch.manual_seed(5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast_loss = methods["fast"].training_step(images, labels).total()
        fast_logits = methods["fast"].predict(images)
    torch.manual_seed(5)
    reference_loss = methods["sequential"].training_step(images, labels).total()
    reference_logits = methods["sequential"].predict(images)
    torch.testing.assert_close(fast_loss.float(), reference_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast_logits.float(), reference_logits, rtol=3e-2, atol=3e-2)
    fast = methods["fast"]
    assert fast._basis.dtype == torch.float32 and fast.prototypes.prototypes.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in fast.averaged.parameters())


def test_prompts_start_at_zero_and_join_attention_after_the_first_block():
    method = tiny_method()
    generator = method.current["patch"][0]
    tokens = torch.rand(2, method.backbone.num_tokens, method.backbone.embed_dim)
    assert torch.count_nonzero(generator(tokens)) == 0
    seen = []
    original = method.backbone.blocks[1].attn.forward

    def spy(x, *args, **kwargs):
        seen.append(x.shape[1])
        return original(x, *args, **kwargs)

    method.backbone.blocks[1].attn.forward = spy
    method._patch_pass(torch.rand(2, 3, 32, 32), method.current)
    assert seen == [method.backbone.num_tokens + method.params.num_prompts]


def test_saved_state_of_another_width_is_bad_input():
    saved = tiny_method(use_init_ptm=True)
    saved.begin_task(TaskInfo(0, 1, 0, 2))
    state = saved.learned_state()
    with pytest.raises(BadInputError, match="shape"):
        tiny_method(use_init_ptm=False).load_learned_state(state, [TaskInfo(0, 1, 0, 2)])


def test_unknown_model_name_is_a_one_line_exit_2(cli, data_root):
    result = cli("train", "--stream", "digits", "--set", "method.params.model_name=tokens")
    assert result.code == 2
    assert "method.params.model_name" in result.err and len(result.err.strip().splitlines()) == 1


def test_fusion_heads_that_do_not_divide_the_width_are_a_one_line_exit_2(cli, data_root):
    result = cli("train", "--stream", "digits", "--set", "method.params.fusion_heads=7")
    assert result.code == 2
    assert "fusion_heads=7" in result.err and len(result.err.strip().splitlines()) == 1


def test_channel_variant_trains_on_its_own_feature():
    method = tiny_method(model_name="channel")
    method.begin_task(TaskInfo(0, 1, 0, 2))
    output = method.training_step(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    assert set(output.logs) == {"ce", "train_acc"}
    channel, _, _ = method.features(torch.rand(2, 3, 32, 32))
    assert method._feature_for_prototypes(torch.rand(2, 3, 32, 32)).shape == channel.shape
    assert F.normalize(channel, dim=1).shape[1] == 2 * method.backbone.embed_dim


def test_ntk_cl_forgets_less_than_finetune_on_digits(cli, data_root, tmp_path):
    from tests.conftest import SHIPPED_BACKBONE_FLAGS

    forgetting = {}
    for method in ("finetune", "ntk-cl"):
        result = cli(
            "train",
            "--stream",
            "digits",
            "--method",
            method,
            *SHIPPED_BACKBONE_FLAGS,
            "--init-classes",
            "4",
            "--increment",
            "3",
            "--epochs",
            "2",
            "--lr",
            "0.01",
            "--batch-size",
            "32",
            "--num-workers",
            "0",
            "--out",
            tmp_path / method,
            "--json",
            "-q",
        )
        assert result.code == 0, result.err
        forgetting[method] = result.json()["metrics"]["forgetting"]
    assert forgetting["ntk-cl"] < forgetting["finetune"]


@pytest.mark.parametrize("use_init_ptm", [False, True])
def test_batched_branch_passes_equal_the_sequential_ones(use_init_ptm):
    fast = tiny_method(use_init_ptm=use_init_ptm).eval()
    sequential = tiny_method(use_init_ptm=use_init_ptm, execution="sequential").eval()
    with torch.no_grad():
        for parameter in fast.current.parameters():
            parameter.normal_(std=0.1)
        fast.average_copies(0)
        for parameter in fast.current.parameters():
            parameter.normal_(std=0.1)
    sequential.load_state_dict(fast.state_dict())
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        batched = fast.features(images)
    with torch.enable_grad():
        training_path = fast.features(images)
    reference = sequential.features(images)
    for mine, theirs, grad_path in zip(batched, reference, training_path, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_path, theirs, rtol=1e-4, atol=1e-5)
