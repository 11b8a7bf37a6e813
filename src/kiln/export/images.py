"""Image files -> an image model's predictions, with onnxruntime, numpy and Pillow only (no torch).

An image model (kiln.export.graphs, `image_input`) takes uint8 (batch, height, width, channels) of
any height and width and resizes and normalizes inside its graph. `kiln predict` gives it:

    input=photo.jpg             one image file
    input=photos/               every image file under the folder (sorted; other files, and image
                                files that cannot be decoded, are skipped and counted on stderr)
    input=batch.npy             uint8 (N, H, W, C) or (H, W, C) as the model takes it, or float
                                (N, C, H, W) / (C, H, W) in [0, 1] (a tensor as torch holds it)

Images of one size run together in batches; images of different sizes run in groups by size.
Each file is decoded and converted to the model's channels (RGB or grayscale) as at training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def export_image_input(datamodule: Any) -> dict[str, Any] | None:
    """The datamodule's `image_input`, or its torchvision eval transform read as one
    (kiln.data.transforms). A transform kiln cannot repeat in the graph is named in one warning
    line, and the model takes the transformed tensor instead (None)."""
    from kiln.data.transforms import UNTRANSLATABLE_FIX, image_input

    try:
        found = image_input(datamodule)
    except ValueError as exc:  # the datamodule's own attribute, malformed: its author's fix
        raise KilnError(f"export: {exc}") from exc
    if found.refused is not None:
        print(f"kiln export: warning: {found.refused}; {UNTRANSLATABLE_FIX}", file=sys.stderr, flush=True)
    return found.image_input


def framed_for_graph(pixels: np.ndarray, image: dict[str, Any]) -> np.ndarray:
    """uint8 (batch, height, width, channels) images of the net's input size, framed so that the
    graph gives them to the net unchanged: a graph with torchvision's Resize and CenterCrop
    (`resize`) would resize them first, so each sits where the crop takes it from, on a canvas the
    resize keeps as it is (its shorter side already `shorter`, or exactly the resize's size).
    Parity with torch then compares the same pixels."""
    resize = image.get("resize")
    if resize is None or "crop" not in image:
        return pixels
    canvas_height, canvas_width = (
        (int(resize["shorter"]),) * 2 if "shorter" in resize else (int(s) for s in resize["size"])
    )
    batch, height, width, channels = pixels.shape
    top, left = round((canvas_height - height) / 2), round((canvas_width - width) / 2)  # as CenterCrop
    canvas = np.zeros((batch, canvas_height, canvas_width, channels), dtype=np.uint8)
    canvas[:, top : top + height, left : left + width] = pixels
    return canvas


def takes_image_tensors(specs: list[Any]) -> bool:
    """A model of one (batch, channels, height, width) float input: an image net whose
    preprocessing stayed outside its graph."""
    return len(specs) == 1 and len(specs[0].shape) == 4 and specs[0].type.startswith("tensor(float")


def tensor_input_needed(key: str, spec: Any) -> str:
    """What such a model takes, for someone who gave it image files."""
    shape = ", ".join("batch" if d is None else str(d) for d in spec.shape)
    dtype = spec.type.removeprefix("tensor(").removesuffix(")")
    return (
        f"{key}: image files, but this model takes {dtype} tensors shaped ({shape}), as the "
        "datamodule's eval transform makes them (its graph holds no image preprocessing); save "
        "them as a .npy array and give input=<file>.npy"
    )


def predict_images(session: Any, images: list[np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Every output of the model for every image, in order; images of one size run together."""
    from kiln.export.checks import run_batched

    spec = session.get_inputs()[0]
    by_size: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(position)
    outputs: dict[str, list[tuple[int, np.ndarray]]] = {}
    for positions in by_size.values():
        batch = np.stack([images[p] for p in positions])
        for name, values in run_batched(session, {spec.name: batch}, batch_size).items():
            outputs.setdefault(name, []).extend(zip(positions, values, strict=True))
    return {
        name: np.stack([value for _, value in sorted(pairs, key=lambda pair: pair[0])])
        for name, pairs in outputs.items()
    }


def at_training_size(images: list[np.ndarray], meta: dict[str, str]) -> list[np.ndarray]:
    """The images resized to the size the model was trained at (its `kiln.image_input`), as the
    drift baseline's were (bilinear, or bicubic where the model says so): sharpness and contrast
    depend on the size and the filter. A torchvision eval transform's images (`resize`, `crop`) are
    resized and centre-cropped as it did."""
    try:
        image = json.loads(meta.get("kiln.image_input", "{}"))
        height, width = (int(s) for s in image["size"])
    except (ValueError, KeyError, TypeError):
        return images
    if isinstance(image.get("resize"), dict):
        return [torchvision_resize_and_crop(pixels, image) for pixels in images]
    resize = bicubic if image.get("interpolation") == "bicubic" else bilinear
    return [
        pixels if pixels.shape[:2] == (height, width) else resize(pixels, height, width) for pixels in images
    ]


def torchvision_resize_and_crop(pixels: np.ndarray, image: dict[str, Any]) -> np.ndarray:
    """torchvision's Resize (on a Pillow image: Pillow's antialiased bilinear or bicubic) and CenterCrop, as
    the user's eval transform made the drift baseline's images."""
    from PIL import Image

    resize, (height, width) = image["resize"], pixels.shape[:2]
    if "shorter" in resize:  # the longer side in proportion, truncated, as torchvision computes it
        short, long = sorted((height, width))
        sides = (int(resize["shorter"]), int(int(resize["shorter"]) * long / short))
        new_height, new_width = sides if height <= width else sides[::-1]
    else:
        new_height, new_width = (int(s) for s in resize["size"])
    if (new_height, new_width) != (height, width):
        picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        bicubic = image.get("interpolation") == "bicubic"
        resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
        resized = np.asarray(picture.resize((new_width, new_height), resample))
        pixels = resized[:, :, None] if resized.ndim == 2 else resized
    crop = image.get("crop")
    if crop is None:
        return pixels
    top, left = round((new_height - int(crop[0])) / 2), round((new_width - int(crop[1])) / 2)
    return pixels[top : top + int(crop[0]), left : left + int(crop[1])]


def bilinear(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no antialiasing, rounded to uint8: OpenCV's
    INTER_LINEAR, which resized the training images (Pillow's resize antialiases: other statistics)."""

    def axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
        low = np.floor(position).astype(np.int64)
        return low, np.minimum(low + 1, size_in - 1), (position - low).astype(np.float32)

    y0, y1, wy = axis(pixels.shape[0], height)
    x0, x1, wx = axis(pixels.shape[1], width)
    image = pixels.astype(np.float32)
    top = image[y0][:, x0] * (1 - wx)[None, :, None] + image[y0][:, x1] * wx[None, :, None]
    bottom = image[y1][:, x0] * (1 - wx)[None, :, None] + image[y1][:, x1] * wx[None, :, None]
    mixed = top * (1 - wy)[:, None, None] + bottom * wy[:, None, None]
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def bicubic(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize as OpenCV's INTER_CUBIC (half-pixel centres, a = -0.75, edge pixels repeated),
    rounded and saturated to uint8: what resized the training images of a bicubic model."""

    def along(values: np.ndarray, axis: int, size_out: int) -> np.ndarray:
        size_in = values.shape[axis]
        position = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
        low = np.floor(position).astype(np.int64)
        mixed = np.zeros_like(np.take(values, low.clip(0, size_in - 1), axis=axis))
        for tap in range(-1, 3):
            weight = _cubic_weight(position - (low + tap)).astype(np.float32)
            shape = [1] * values.ndim
            shape[axis] = size_out
            mixed += np.take(values, (low + tap).clip(0, size_in - 1), axis=axis) * weight.reshape(shape)
        return mixed

    resized = along(along(pixels.astype(np.float32), 0, height), 1, width)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def _cubic_weight(distance: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel at `distance` from a sample (OpenCV's and ONNX's a = -0.75)."""
    d = np.abs(distance)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def model_channels(session: Any) -> int:
    shape = session.get_inputs()[0].shape
    return int(shape[3]) if len(shape) == 4 and isinstance(shape[3], int) else 3


def read_images(source: Path, channels: int) -> tuple[list[str], list[np.ndarray]]:
    """(names, uint8 (height, width, channels) arrays) from a file, a folder or a .npy batch."""
    key = f"input={source}"
    if source.suffix.lower() == ".npy":
        return _from_npy(source, channels, key)
    if source.is_dir():
        files = sorted(f for f in source.rglob("*") if f.is_file() and not f.name.startswith("."))
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise KilnError(f"{key}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        if len(images) < len(files):
            print(
                f"kiln predict: skipped {len(files) - len(images)} file(s) that are not images in {source}",
                file=sys.stderr,
            )
        return _decode_folder(source, images, channels, key)
    if source.suffix.lower() not in IMAGE_SUFFIXES:
        raise KilnError(
            f"{key}: this model takes images; give an image file ({', '.join(IMAGE_SUFFIXES)}), a folder of them, or a .npy batch"
        )
    return [source.name], [decode(source, channels)]


def _decode_folder(
    source: Path, files: list[Path], channels: int, key: str
) -> tuple[list[str], list[np.ndarray]]:
    """A folder's images, skipping (and naming) those that cannot be decoded: one damaged photo
    among thousands should not withhold the other answers; a folder of none is an error."""
    names, images, unreadable = [], [], []
    for file in files:
        name = str(file.relative_to(source))
        try:
            images.append(decode(file, channels))
        except KilnError as exc:
            unreadable.append(f"{name} ({_problem(exc.__cause__)})")
            continue
        names.append(name)
    if not images:
        raise KilnError(
            f"{key}: none of its {len(files)} image file(s) can be read as an image, e.g. {unreadable[0]}; "
            "remove or replace them"
        )
    if unreadable:
        shown = ", ".join(unreadable[:SHOWN_UNREADABLE])
        more = f" and {len(unreadable) - SHOWN_UNREADABLE} more" if len(unreadable) > SHOWN_UNREADABLE else ""
        print(
            f"kiln predict: skipped {len(unreadable)} image file(s) that cannot be read: {shown}{more}",
            file=sys.stderr,
        )
    return names, images


SHOWN_UNREADABLE = 5  # files named in the warning; the count covers the rest


def decode(path: Path, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise KilnError(
            f"input: {path} cannot be read as an image ({_problem(exc)}); remove or replace it"
        ) from exc
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _problem(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"


def _from_npy(source: Path, channels: int, key: str) -> tuple[list[str], list[np.ndarray]]:
    try:
        values = np.load(source, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise KilnError(f"{key}: cannot read it as a .npy array ({exc})") from exc
    if values.ndim == 3:
        values = values[None]
    if values.ndim != 4 or len(values) == 0:
        raise KilnError(
            f"{key}: expected images shaped (N, H, W, {channels}) uint8 or (N, {channels}, H, W) float, got {values.shape}"
        )
    if values.dtype == np.uint8 and values.shape[3] == channels:
        batch = values
    elif values.dtype.kind == "f" and values.shape[1] == channels:
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise KilnError(
                f"{key}: float images must hold values in [0, 1] (a tensor before normalization); scale them, or give uint8"
            )
        batch = np.rint(values.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)
    else:
        raise KilnError(
            f"{key}: {values.dtype} {values.shape} is not an image batch this model takes: give uint8 (N, H, W, "
            f"{channels}) or float (N, {channels}, H, W) in [0, 1]"
        )
    return [f"{source.name}[{i}]" for i in range(len(batch))], list(np.ascontiguousarray(batch))
