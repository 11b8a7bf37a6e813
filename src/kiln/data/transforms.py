"""A user's torchvision eval transform, read as the preprocessing kiln puts inside the exported graph.

A DataModule written as the Lightning docs teach builds its evaluation images with
`torchvision.datasets.ImageFolder(root, transform=v2.Compose([...]))`. kiln reads that Compose
(from the validation loader's dataset) and translates the steps it knows:

    Resize(size)                  an int: the shorter side to `size`, the longer in proportion
                                  (torchvision's truncation); [h, w]: exactly that size. Bilinear,
                                  or bicubic of the PIL image (before ToImage: Pillow's, as
                                  timm.data.create_transform makes it)
    CenterCrop(size)              the centre, as torchvision rounds it
    ToImage, PILToTensor          nothing (the graph starts from uint8 pixels)
    ToDtype(float32, scale=True)  / 255 (ToTensor, the old API, and timm's MaybeToTensor too)
    Normalize(mean, std)          (x - mean) / std per channel

into an `image_input` (kiln.contract) with `resize` and `crop`. Anything else (a Lambda, a random
op, another interpolation) cannot be repeated in the graph: `read_eval_transform` then says which
step, and the model takes the transformed tensor instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.runs import RunLayout

UNTRANSLATABLE_FIX = (
    f"{RunLayout.MODEL} takes the transformed tensor instead of images; or give the datamodule an image_input "
    "(README: Your own Lightning code) to have images in the graph"
)


# PIL image -> float tensor / 255: torchvision's old API, and timm's (create_transform's eval steps)
SCALING_TO_TENSOR = ("ToTensor", "MaybeToTensor")


@dataclass(frozen=True)
class EvalTransform:
    """What reading found: an `image_input` (None when the transform cannot be translated) and,
    when it cannot, the step that stops it, in words."""

    image_input: dict[str, Any] | None
    refused: str | None = None


def image_input(datamodule: Any) -> EvalTransform:
    """How `x` is made from an image, for the export, the drift baseline and the graph: the
    datamodule's own `image_input` (kiln.contract; a malformed one raises ValueError), else its
    torchvision eval transform read here; EvalTransform(None) when `x` is not known to be an image."""
    from kiln import contract

    own = contract.image_input(datamodule)
    if own is not None:
        return EvalTransform(own)
    return read_eval_transform(datamodule) or EvalTransform(None)


def read_eval_transform(datamodule: Any) -> EvalTransform | None:
    """The eval transform of `datamodule` (set up) as an `image_input`; None when it has none kiln
    can find (no validation dataset with a `transform`)."""
    transform = _eval_transform(datamodule)
    if transform is None:
        return None
    spec: dict[str, Any] = {"channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3}
    scaled = on_tensor = False  # until ToImage (or the like), the steps see the PIL image
    for step in list(getattr(transform, "transforms", [transform])):
        refused = _translate(step, spec, on_tensor)
        if refused is not None:
            return EvalTransform(None, refused)
        scaled = scaled or type(step).__name__ in ("ToDtype", *SCALING_TO_TENSOR)
        on_tensor = on_tensor or type(step).__name__ in ("ToImage", "PILToTensor", *SCALING_TO_TENSOR)
    if "shorter" in spec.get("resize", {}) and "crop" not in spec:
        return EvalTransform(
            None, f"{_describe(transform)} resizes the shorter side with no CenterCrop after it"
        )
    if not scaled or "size" not in spec:
        missing = "ToDtype(float32, scale=True)" if not scaled else "a Resize"
        return EvalTransform(None, f"{_describe(transform)} has no {missing}")
    return EvalTransform(spec)


def _eval_transform(datamodule: Any) -> Any:
    dataset = _validation_dataset(datamodule)
    while getattr(dataset, "transform", None) is None and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # torch.utils.data.Subset and the like
    return getattr(dataset, "transform", None)


def _validation_dataset(datamodule: Any) -> Any:
    """The validation loader's dataset; the datamodule is set up first if its loader needs it.
    None when it has no validation loader (or any loader kiln can read a dataset from)."""
    for attempt in range(2):
        try:
            return datamodule.val_dataloader().dataset
        except Exception:  # a user's loader before setup, or none: nothing to read
            if attempt or not callable(getattr(datamodule, "setup", None)):
                return None
            try:
                datamodule.setup("validate")
            except Exception:
                return None
    return None


def _translate(step: Any, spec: dict[str, Any], on_tensor: bool) -> str | None:
    """Add `step` to `spec`; the reason in words when it cannot be added."""
    name = type(step).__name__
    if name == "Resize":
        return _resize(step, spec, on_tensor)
    if name == "CenterCrop":
        height, width = _pair(step.size)
        spec["crop"] = [height, width]
        spec["size"] = [height, width]
        return None
    if name in ("ToImage", "PILToTensor", *SCALING_TO_TENSOR):
        return None
    if name == "ToDtype":
        import torch

        dtype = step.dtype.get(torch.Tensor, None) if isinstance(step.dtype, dict) else step.dtype
        if dtype != torch.float32 or not step.scale:
            return f"{_describe(step)} (kiln repeats ToDtype(torch.float32, scale=True) only)"
        return None
    if name == "Normalize":
        spec["mean"], spec["std"] = [float(v) for v in step.mean], [float(v) for v in step.std]
        spec["channels"] = len(spec["mean"])
        return None
    return f"{_describe(step)} has no translation into the graph"


def _resize(step: Any, spec: dict[str, Any], on_tensor: bool) -> str | None:
    """Bilinear, or bicubic of a PIL image (Pillow's, which the graph repeats to a few grey levels;
    torch's bicubic of a tensor it does not: measured 4 grey levels apart on average)."""
    interpolation = str(getattr(getattr(step, "interpolation", None), "value", step.interpolation))
    pillow_bicubic = interpolation == "bicubic" and not on_tensor
    if (
        (interpolation != "bilinear" and not pillow_bicubic)
        or getattr(step, "max_size", None) is not None
        or "crop" in spec
    ):
        return (
            f"{_describe(step)} (kiln repeats a bilinear Resize, or a bicubic one before ToImage, without "
            "max_size, before any crop)"
        )
    if pillow_bicubic:
        spec["interpolation"] = "bicubic"
    size = step.size if isinstance(step.size, (list, tuple)) else [step.size]
    if len(size) == 1:
        spec["resize"] = {"shorter": int(size[0])}
        spec["size"] = [int(size[0]), int(size[0])]  # at least; the crop that usually follows decides
    else:
        spec["resize"] = {"size": [int(size[0]), int(size[1])]}
        spec["size"] = [int(size[0]), int(size[1])]
    spec["antialias"] = bool(getattr(step, "antialias", True))
    return None


def _pair(size: Any) -> tuple[int, int]:
    values = list(size) if isinstance(size, (list, tuple)) else [size]
    return (int(values[0]), int(values[-1]))


def _describe(step: Any) -> str:
    text = " ".join(repr(step).split())
    return f"the eval transform's {text[:120]}"
