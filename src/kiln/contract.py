"""What kiln needs from your LightningModule and LightningDataModule, and what it uses if present.

kiln's own modules (KilnModule, the in-memory datamodules) are ordinary users of this contract.
Everything here reads plain Lightning objects; nothing requires a kiln attribute.

Required, exactly as the Lightning docs teach:

    LightningModule       training_step, configure_optimizers; validation_step logging
                          `monitor.metric` at epoch level (the default in validation);
                          test_step (kiln tests the best checkpoint); forward(x), the
                          computation to deploy (one tensor in, one tensor out), or
                          forward(a, b, ...) / forward(batch_dict): several named inputs
    LightningDataModule   train_dataloader, val_dataloader, test_dataloader; batches are
                          `(x, y, ...)` tuples or lists (the default collate) or a bare tensor x

Optional, used when present:

    module.example_input_array      Lightning's own: the example for export and the graph: a
                                    tensor; a tuple of tensors (forward(*example)); a dict
                                    (forward(**example)); a tuple of one dict (forward(example[0])).
                                    Without it, kiln takes `x` from the first validation batch,
                                    or a dict batch's entries named like forward's arguments.
                                    Several inputs become the graph's named inputs; dynamic axes:
                                    axis 0 of each is `batch`, axis 1 of an integer or boolean
                                    input of 2+ axes is `sequence` (kiln.export.onnx_export)
    module.kiln_dynamic_axes        {input name: {axis: name}}: replaces that rule for those inputs
    module.kiln_export_module()     the part to export, when `forward` is not it (e.g. a module
                                    whose forward returns a loss, or only the backbone)
    class_names / classes           on the datamodule (or the module): a classifier's class names;
                                    the exported model then answers with `label` and
                                    `probabilities`. Without them it answers with its raw `output`
    task                            "classification" or "regression", where the names are absent
    datamodule.shards_by_rank       True when its loaders split the rows by rank themselves
                                    (kiln's do); otherwise DDP gets Lightning's DistributedSampler
    datamodule.image_input          {"size": [h, w], "channels": c, "mean": [...], "std": [...]}
                                    when `x` is an image resized to `size`, scaled to [0, 1] and
                                    normalized: the exported model then takes uint8 images
                                    (batch, height, width, channels) of any size and does that
                                    inside its graph. Optional: "interpolation": "bilinear"
                                    (the default) or "bicubic", as OpenCV resizes (Pillow,
                                    with "resize"); as torchvision's Resize and CenterCrop:
                                    "resize": n (the shorter side to n) or [h, w],
                                    then "crop": [h, w] (the centre; equal to size). Without an
                                    image_input, kiln reads a torchvision eval transform
                                    (kiln.data.transforms)

Arguments kiln knows at run time (`net`, `task`, `input_shape`, `num_outputs`, `class_names`,
`seed`) are passed only to a `_target_` whose signature names them, only when the datamodule
knows them, and never over a value the config sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TASKS = ("classification", "regression")


def class_names(datamodule: Any, module: Any = None) -> list[str] | None:
    """The classes' names from the datamodule (`class_names`, or `classes` as torchvision's
    ImageFolder has them) or the module (attribute or hparam); None when neither says."""
    for owner in (datamodule, module):
        if owner is None:
            continue
        for name in ("class_names", "classes"):
            value = getattr(owner, name, None)
            if value is None:
                value = _hparam(owner, name)
            if isinstance(value, Sequence) and not isinstance(value, str) and len(value) >= 2:
                return [str(v) for v in value]
    return None


def task(datamodule: Any, module: Any = None) -> str | None:
    """ "classification" or "regression" when the datamodule or module says, or class names imply it."""
    for owner in (datamodule, module):
        if owner is None:
            continue
        value = getattr(owner, "task", None) or _hparam(owner, "task")
        if value in TASKS:
            return str(value)
    return "classification" if class_names(datamodule, module) else None


def shards_by_rank(datamodule: Any) -> bool:
    """Do this datamodule's loaders give each DDP rank its own rows? (Else Lightning's sampler does.)"""
    return bool(getattr(datamodule, "shards_by_rank", False))


def image_input(datamodule: Any) -> dict[str, Any] | None:
    """How the datamodule makes `x` from an image (see above), checked; None when it does not say."""
    value = getattr(datamodule, "image_input", None)
    if not isinstance(value, Mapping):
        return None
    missing = [key for key in ("size", "channels", "mean", "std") if key not in value]
    if missing:
        raise ValueError(
            f"datamodule.image_input lacks {', '.join(missing)}; it needs size, channels, mean and std"
        )
    channels = int(value["channels"])
    size = [int(s) for s in value["size"]]
    mean, std = [float(v) for v in value["mean"]], [float(v) for v in value["std"]]
    if len(size) != 2 or len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"datamodule.image_input={dict(value)}: size needs 2 values, mean and std one per channel"
        )
    image: dict[str, Any] = {"size": size, "channels": channels, "mean": mean, "std": std}
    interpolation = value.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(
            f'datamodule.image_input: "interpolation" must be "bilinear" or "bicubic", got {interpolation!r}'
        )
    if interpolation != "bilinear":  # bilinear is what a graph without the key does
        image["interpolation"] = interpolation
    if "resize" in value or "crop" in value:  # bicubic as Pillow's, as torchvision resizes a PIL image
        image.update(_resize_and_crop(value, size))
    return image


def _resize_and_crop(value: Mapping[str, Any], size: list[int]) -> dict[str, Any]:
    """image_input's optional torchvision-style steps, in the form the graph builder reads:
    {"resize": {"shorter": n} or {"size": [h, w]}, "crop": [h, w], "antialias": True}."""
    problem = f"datamodule.image_input={dict(value)}: "
    resize, crop = value.get("resize"), value.get("crop")
    steps: dict[str, Any] = {"antialias": bool(value.get("antialias", True))}
    if isinstance(resize, Mapping):  # as kiln writes it into model.onnx's metadata
        resize = resize.get("shorter", resize.get("size"))
    if isinstance(resize, int):
        steps["resize"] = {"shorter": resize}
    elif isinstance(resize, Sequence) and len(resize) == 2:
        steps["resize"] = {"size": [int(s) for s in resize]}
    else:
        raise ValueError(problem + 'resize must be n (the shorter side) or [h, w], e.g. "resize": 36')
    if crop is not None:
        pair = [int(crop), int(crop)] if isinstance(crop, int) else [int(c) for c in crop]
        if pair != size:
            raise ValueError(problem + f"crop {pair} must equal size {size} (the crop is what the net sees)")
        steps["crop"] = pair
    elif "shorter" in steps["resize"]:
        raise ValueError(
            problem + f'resizing the shorter side needs a centre crop to size, e.g. "crop": {size}'
        )
    elif steps["resize"]["size"] != size:
        raise ValueError(problem + f"resize {steps['resize']['size']} without a crop must equal size {size}")
    return steps


def export_module(module: Any) -> Any:
    """The torch module that becomes model.onnx: the hook's answer, or the LightningModule (forward)."""
    hook = getattr(module, "kiln_export_module", None)
    return hook() if callable(hook) else module


def batch_input(batch: Any) -> Any:
    """The model input `x` of a batch: a tensor as is, the first item of a tuple or list.
    A chunk of kiln's own loaders (a list of batches) gives its first batch's input."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch:
        first = batch[0]
        return batch_input(first) if isinstance(first, Sequence) and not isinstance(first, str) else first
    if isinstance(batch, Mapping):
        raise TypeError(
            "batches are dicts; kiln cannot tell which entry is the model input: set the module's "
            "example_input_array (Lightning's own attribute) to an example input tensor"
        )
    raise TypeError(f"a batch of type {type(batch).__name__} has no input tensor kiln can find")


def runtime_arguments(
    target: Any, offered: Mapping[str, Any], configured: Mapping[str, Any]
) -> dict[str, Any]:
    """The run-time arguments `target` names in its signature, except those the config already
    sets and those whose value is unknown (None). Never through **kwargs: a LightningModule's
    **kwargs usually end in nn.Module.__init__, which refuses them."""
    import inspect

    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    return {
        name: value
        for name, value in offered.items()
        if value is not None and name not in configured and name in parameters
    }


def _hparam(owner: Any, name: str) -> Any:
    hparams = getattr(owner, "hparams", None)
    if isinstance(hparams, Mapping):
        return hparams.get(name)
    return None
