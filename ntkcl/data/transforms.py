"""Image transforms.

"paper" is the recipe of NTK-CL, PILOT and l2p/dualprompt-pytorch, scaled to the backbone's input size:
train RandomResizedCrop(scale 0.05-1, ratio 3/4-4/3) + horizontal flip; test Resize(size * 256/224,
bicubic) + CenterCrop(size). Both end in ToTensor with no mean/std (normalisation, when wanted, is done by
the backbone). "resize" only resizes: for tiny images (digits, synthetic) where crops would destroy them.
"timm" is timm's `create_transform` from the backbone's pretrained data configuration (`crop_pct`,
interpolation, mean/std; training: RandomResizedCropAndInterpolation, flip, colour jitter), normalised here,
so the backbone must not normalise again (`backbone.normalize = "none"`).
"clip" is CLIP's preprocessing, which ZSCL and KeepLoRA use for training and testing alike: Resize(size,
bicubic) of the shorter side + CenterCrop(size), no augmentation.
"""

from __future__ import annotations

from torchvision import transforms as T

AUGMENTATIONS = ("paper", "resize", "clip", "timm")


def paper_resize(image_size: int) -> int:
    """The test transform's shorter side before the centre crop: 256 for 224-pixel models."""
    return round(image_size * 256 / 224)


def build_transforms(augment: str, image_size: int, timm_config: dict | None = None) -> tuple[T.Compose, T.Compose]:
    """(train transform, test transform) for `augment` in AUGMENTATIONS.

    Args:
        timm_config: the backbone's timm data configuration (input_size, interpolation, mean, std, crop_pct,
            crop_mode), needed by "timm".
    """
    if augment == "timm":
        from timm.data import create_transform

        if timm_config is None:
            raise ValueError("augment 'timm' needs the backbone's timm data configuration")
        return create_transform(**timm_config, is_training=True), create_transform(**timm_config, is_training=False)
    if augment == "paper":
        # torchvision's RandomResizedCrop + flip with draws the batched transform reproduces from a seed
        from ntkcl.data.batched_transforms import PerImageRandomResizedCrop

        train = PerImageRandomResizedCrop(image_size)
        test = T.Compose(
            [
                T.Resize(paper_resize(image_size), interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(image_size),
                T.ToTensor(),
            ]
        )
        return train, test
    if augment == "clip":
        plain = T.Compose(
            [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size), T.ToTensor()]
        )
        return plain, plain
    if augment == "resize":
        plain = T.Compose([T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor()])
        return plain, plain
    raise ValueError(f"unknown augmentation {augment!r}; valid: {', '.join(AUGMENTATIONS)}")
