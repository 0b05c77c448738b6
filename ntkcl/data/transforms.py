"""Image transforms.

"paper" is the recipe of NTK-CL, PILOT and l2p/dualprompt-pytorch, scaled to the backbone's input size:
train RandomResizedCrop(scale 0.05-1, ratio 3/4-4/3) + horizontal flip; test Resize(size * 256/224,
bicubic) + CenterCrop(size). Both end in ToTensor with no mean/std (normalisation, when wanted, is done by
the backbone). "resize" only resizes: for tiny images (digits, synthetic) where crops would destroy them.
"clip" is CLIP's preprocessing, which ZSCL and KeepLoRA use for training and testing alike: Resize(size,
bicubic) of the shorter side + CenterCrop(size), no augmentation.
"""

from __future__ import annotations

from torchvision import transforms as T

AUGMENTATIONS = ("paper", "resize", "clip")


def paper_resize(image_size: int) -> int:
    """The test transform's shorter side before the centre crop: 256 for 224-pixel models."""
    return round(image_size * 256 / 224)


def build_transforms(augment: str, image_size: int) -> tuple[T.Compose, T.Compose]:
    """(train transform, test transform) for `augment` in AUGMENTATIONS."""
    if augment == "paper":
        train = T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(0.05, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
                T.RandomHorizontalFlip(0.5),
                T.ToTensor(),
            ]
        )
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
