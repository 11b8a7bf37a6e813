"""Image transforms from plain settings, built on albumentations (uint8 HWC arrays in and out).

Training images get the configured augmentation and then come out at the training size;
evaluation images are only resized. Normalization (mean and std) is not done here: it happens on
the tensor (kiln.data.images) and again inside the exported graph, so the graph and training
apply the same arithmetic.

    crop_scale       random resized crop keeping this share of the image's area, e.g. [0.8, 1.0]
    horizontal_flip  probability of a left-right flip (never for digits or text)
    color_jitter     strength of random brightness, contrast and saturation, e.g. 0.2
    policy           "trivial" (TrivialAugment: one random operation at a random strength) or
                     "rand" (RandAugment: `rand_ops` operations at strength `rand_magnitude` of 10)
    extra            any albumentations transforms, given as `_target_` config nodes
    mixup_alpha      > 0: blend pairs of training images and their labels (mixup, Zhang et al. 2018)
    cutmix_alpha     > 0: paste a box of one training image into another, labels by area (CutMix,
                     Yun et al. 2019); with both set, each batch takes one of them at random
Mixup and CutMix work on whole batches, after the per-image transforms (`MixCollate`): training
batches then carry soft targets, (batch, classes) probabilities, which cross-entropy takes as
they are; KilnModule's training metrics score the larger share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from kiln.errors import KilnError, require

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI at import otherwise

POLICIES = ("trivial", "rand")
AUGMENT_KEYS = (
    "crop_scale",
    "horizontal_flip",
    "color_jitter",
    "policy",
    "rand_ops",
    "rand_magnitude",
    "extra",
)


def check_augment(augment: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings with defaults filled in; a wrong key or value is an InvalidArgument naming it."""
    settings: dict[str, Any] = {
        "crop_scale": None,
        "horizontal_flip": 0.0,
        "color_jitter": 0.0,
        "policy": None,
        "rand_ops": 2,
        "rand_magnitude": 9,
        "extra": [],
        "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0,
    }
    for key, value in dict(augment or {}).items():
        require(key in settings, f"augment.{key}", f"no such setting; settings: {', '.join(AUGMENT_KEYS)}")
        settings[key] = value
    scale = settings["crop_scale"]
    require(
        scale is None
        or (isinstance(scale, Sequence) and len(scale) == 2 and 0 < float(scale[0]) <= float(scale[1]) <= 1),
        "augment.crop_scale",
        f"must be null or [low, high] with 0 < low <= high <= 1, got {scale}",
    )
    flip = settings["horizontal_flip"]
    if isinstance(flip, bool):
        settings["horizontal_flip"] = flip = 0.5 if flip else 0.0
    require(0 <= float(flip) <= 1, "augment.horizontal_flip", f"must be a probability in [0, 1], got {flip}")
    jitter = settings["color_jitter"]
    require(0 <= float(jitter) < 1, "augment.color_jitter", f"must be in [0, 1), e.g. 0.2, got {jitter}")
    require(
        settings["policy"] in (None, *POLICIES),
        "augment.policy",
        f"must be null, trivial or rand, got {settings['policy']!r}",
    )
    require(
        isinstance(settings["rand_ops"], int) and settings["rand_ops"] >= 1,
        "augment.rand_ops",
        f"must be an integer >= 1, got {settings['rand_ops']}",
    )
    require(
        0 <= settings["rand_magnitude"] <= 10,
        "augment.rand_magnitude",
        f"must be in 0..10, got {settings['rand_magnitude']}",
    )
    require(
        isinstance(settings["extra"], Sequence) and not isinstance(settings["extra"], str),
        "augment.extra",
        "must be a list of albumentations transforms as _target_ nodes",
    )
    for key in ("mixup_alpha", "cutmix_alpha"):
        value = settings[key]
        require(
            isinstance(value, int | float) and not isinstance(value, bool) and value >= 0,
            f"augment.{key}",
            f"must be a number >= 0 (0: off; 0.2 to 1 are usual), got {value}",
        )
    return settings


class MixCollate:
    """Collates a training batch (items that failed to decode are left out), then applies mixup or
    CutMix to the whole batch: x mixed with a shuffled copy of itself, y as soft targets."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, collate: Any) -> None:
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.collate = collate
        self._rng: Any = None
        self._seed: int | None = None

    def rng(self) -> Any:
        """A generator per process, seeded from torch's seed there (a worker's own, derived from
        the run's seed): batches repeat from run to run and differ between workers."""
        import numpy as np
        import torch

        seed = torch.initial_seed() % 2**32
        if self._rng is None or seed != self._seed:
            self._rng, self._seed = np.random.default_rng(seed), seed
        return self._rng

    def __call__(self, items: list[Any]) -> Any:
        import torch
        from torch.nn import functional as F

        x, y = self.collate(items)
        if len(y) == 0:
            return [x, y]
        rng = self.rng()
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        share = float(rng.beta(alpha, alpha))
        partner = torch.from_numpy(rng.permutation(len(y)))
        if use_cutmix:
            height, width = x.shape[-2:]
            cut_h, cut_w = int(height * (1 - share) ** 0.5), int(width * (1 - share) ** 0.5)
            top, left = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
            x = x.clone()
            x[..., top : top + cut_h, left : left + cut_w] = x[partner][
                ..., top : top + cut_h, left : left + cut_w
            ]
            share = 1 - cut_h * cut_w / (height * width)  # the labels follow the pasted area exactly
        else:
            x = share * x + (1 - share) * x[partner]
        targets = F.one_hot(y, self.num_classes).float()
        return [x, share * targets + (1 - share) * targets[partner]]


def train_transform(
    size: tuple[int, int], augment: Mapping[str, Any], interpolation: str = "bilinear"
) -> Any:
    """Augmentation, then exactly `size` (height, width), resized with `interpolation`."""
    import albumentations as A

    settings = check_augment(augment)
    flag = opencv_interpolation(interpolation)
    steps: list[Any] = []
    if settings["crop_scale"] is not None:
        scale = tuple(float(s) for s in settings["crop_scale"])
        steps.append(A.RandomResizedCrop(size=size, scale=scale, interpolation=flag))
    else:
        steps.append(A.Resize(*size, interpolation=flag))
    if settings["horizontal_flip"]:
        steps.append(A.HorizontalFlip(p=float(settings["horizontal_flip"])))
    if settings["color_jitter"]:
        strength = float(settings["color_jitter"])
        steps.append(
            A.ColorJitter(brightness=strength, contrast=strength, saturation=strength, hue=0.0, p=0.8)
        )
    if settings["policy"] == "trivial":
        steps.append(A.OneOf(_operations(None), p=1.0))
    elif settings["policy"] == "rand":
        steps.append(A.SomeOf(_operations(settings["rand_magnitude"] / 10), n=settings["rand_ops"], p=1.0))
    steps.extend(_extra(settings["extra"]))
    # whatever `extra` did to the size, training sees `size`
    steps.append(A.Resize(*size, interpolation=flag))
    return A.Compose(steps)


def eval_transform(size: tuple[int, int], interpolation: str = "bilinear") -> Any:
    import albumentations as A

    return A.Compose([A.Resize(*size, interpolation=opencv_interpolation(interpolation))])


# the resize filters the exported graph repeats: ONNX Resize's linear and cubic (half-pixel
# centres, a = -0.75) give OpenCV's INTER_LINEAR and INTER_CUBIC to within a grey level
INTERPOLATIONS = ("bilinear", "bicubic")


def opencv_interpolation(interpolation: str) -> int:
    """OpenCV's flag for a resize filter named as timm and torchvision name it."""
    import cv2

    flags = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
    require(
        interpolation in flags,
        "interpolation",
        f"must be {' or '.join(INTERPOLATIONS)} (what the exported graph repeats), got {interpolation!r}",
    )
    return int(flags[interpolation])


def _operations(magnitude: float | None) -> list[Any]:
    """The operations of TrivialAugment and RandAugment (Müller & Hutter 2021; Cubuk et al. 2020),
    as albumentations transforms. `magnitude` in [0, 1] fixes the strength (RandAugment); None
    draws it uniformly up to the maximum each time (TrivialAugment)."""
    import albumentations as A

    def upto(maximum: float) -> tuple[float, float]:
        top = maximum if magnitude is None else maximum * magnitude
        return (-top, top)

    return [
        A.NoOp(),
        A.Affine(rotate=upto(30), p=1.0),
        A.Affine(shear={"x": upto(17), "y": (0, 0)}, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": upto(17)}, p=1.0),
        A.Affine(translate_percent={"x": upto(0.3), "y": (0, 0)}, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": upto(0.3)}, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=upto(0.9), contrast_limit=(0, 0), p=1.0),
        A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=upto(0.9), p=1.0),
        A.Sharpen(p=1.0),
        A.Posterize(num_bits=(4, 8), p=1.0),
        A.Solarize(p=1.0),
        A.Equalize(p=1.0),
        A.AutoContrast(p=1.0),
    ]


def _extra(nodes: Sequence[Any]) -> list[Any]:
    from hydra.utils import instantiate

    transforms = []
    for index, node in enumerate(nodes):
        if not isinstance(node, Mapping) or "_target_" not in node:
            raise KilnError(
                f"data.augment.extra[{index}]: expected an albumentations transform as a _target_ node, "
                f"e.g. {{_target_: albumentations.GaussNoise, p: 0.2}}, got {node!r}"
            )
        try:
            transforms.append(instantiate(dict(node)))
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise KilnError(
                f"data.augment.extra[{index}] ({node['_target_']}): {type(cause).__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else ''}; fix its arguments"
            ) from exc
    return transforms
