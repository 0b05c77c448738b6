"""The ntk-cl presets hold the reference's per-dataset settings (shared/reference/ntk-cl.md, section 2)."""

import pytest

from ntkcl.presets import resolve_config

BACKBONES = ("vit_base_patch16_224.augreg_in21k_ft_in1k", "vit_base_patch16_224.augreg_in21k")

# stream: (lr, batch size, epochs, weight decay, use_init_ptm, nce weight)
REFERENCE = {
    "cifar100": (0.025, 16, 20, 5e-4, False, 0.03),
    "imagenet-r": (0.02, 16, 20, 5e-3, False, 0.2),
    "imagenet-a": (0.02, 16, 20, 5e-3, False, 0.2),
    "domainnet": (0.02, 96, 50, 5e-3, False, 0.2),
    "oxford-pets": (0.02, 96, 5, 5e-3, True, 0.2),
    "eurosat": (1e-4, 96, 5, 5e-3, True, 0.2),
    "plantvillage": (5e-3, 96, 5, 5e-3, True, 0.2),
    "vtab": (0.03, 96, 45, 5e-3, True, 0.2),
    "kvasir": (5e-3, 96, 5, 5e-3, True, 0.2),
}


def ntk_cl_params(config) -> dict:
    from ntkcl.methods.ntk_cl import NTKCLParams

    return NTKCLParams(**config.method.params).model_dump()


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("stream", sorted(REFERENCE))
def test_each_stream_gets_the_reference_settings_on_both_backbones(stream, backbone):
    config = resolve_config(
        overrides={"stream": {"dataset": stream}, "method": {"name": "ntk-cl"}, "backbone": {"name": backbone}}
    )
    lr, batch, epochs, weight_decay, use_init_ptm, nce_weight = REFERENCE[stream]
    optim = config.optim
    assert (optim.optimizer, optim.momentum, optim.scheduler, optim.min_lr) == ("sgd", 0.9, "cosine", 0.0)
    assert (optim.lr, optim.batch_size, optim.epochs, optim.weight_decay) == (lr, batch, epochs, weight_decay)
    params = ntk_cl_params(config)
    assert params["use_init_ptm"] is use_init_ptm and params["nce_weight"] == nce_weight
    assert (params["bottleneck"], params["num_prompts"], params["orth_weight"], params["reg_weight"]) == (
        16,
        10,
        1e-4,
        1e-3,
    )
    assert config.backbone.name == backbone and config.backbone.normalize == "none"
    assert config.stream.augment == "paper"


def test_flags_override_the_preset():
    config = resolve_config(
        overrides={"stream": {"dataset": "vtab"}, "optim": {"lr": 0.1}, "method": {"params": {"use_init_ptm": False}}}
    )
    assert config.optim.lr == 0.1 and config.optim.epochs == 45
    assert ntk_cl_params(config)["use_init_ptm"] is False


def test_reference_defaults_elsewhere():
    params = ntk_cl_params(resolve_config(overrides={"stream": {"dataset": "imagenet-r"}}))
    assert (params["alpha"], params["beta"], params["gamma"]) == (0.1, 1.0, 0.3)
    assert params["fusion_weights"] == (0.5, 1.0, 0.1) and params["fusion_heads"] == 8
    assert (params["orth_loss"], params["orth_basis"], params["mi_sign"], params["fusion"]) == (
        "signed_sum",
        "reference",
        "reference",
        "reference",
    )
    assert params["average_after_last_task"] is False and params["model_name"] == "both"
