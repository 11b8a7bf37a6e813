"""How kiln learns that `x` is an image, without training anything: a datamodule's `image_input`
(with torchvision's resize and crop), or its torchvision eval transform read at export (a step
kiln cannot repeat named in one warning line); parity images the graph gives to the net unchanged;
and the drift statistics of `kiln predict` taken on images cropped as the eval transform crops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from kiln import contract
from kiln.errors import KilnError
from kiln.export.images import at_training_size, export_image_input, framed_for_graph
from kilntest import image_preprocessing

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
EVAL = [
    v2.Resize(20),
    v2.CenterCrop(16),
    v2.ToImage(),
    v2.ToDtype(torch.float32, scale=True),
    v2.Normalize(MEAN, STD),
]


class Images:
    """A datamodule as kiln reads it here: a validation loader over an ImageFolder."""

    def __init__(self, root: Path, transform: Any, image_input: dict[str, Any] | None = None) -> None:
        self.dataset = datasets.ImageFolder(str(root), transform=transform)
        if image_input is not None:
            self.image_input = image_input

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=2)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        pixels = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name / "0.png")
    return tmp_path


def test_the_eval_transform_becomes_the_image_input_silently(folder, capfd):
    image = export_image_input(Images(folder, v2.Compose(EVAL)))
    assert image is not None
    assert (image["resize"], image["crop"], image["size"], image["mean"]) == (
        {"shorter": 20},
        [16, 16],
        [16, 16],
        MEAN,
    )
    assert capfd.readouterr().err == ""


def test_a_lambda_in_the_eval_transform_is_one_warning_line_and_no_image_input(folder, capfd):
    def brighten(x: torch.Tensor) -> torch.Tensor:
        return x + 0.1

    assert export_image_input(Images(folder, v2.Compose([*EVAL, v2.Lambda(brighten)]))) is None
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith("kiln export: warning: the eval transform's Lambda(brighten")
    assert "model.onnx takes the transformed tensor instead of images" in line


def test_the_datamodules_own_image_input_wins_over_its_transform(folder, capfd):
    own = {"size": [8, 8], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    lambda_transform = v2.Compose([*EVAL, v2.Lambda(lambda x: x)])
    assert export_image_input(Images(folder, lambda_transform, own)) == own
    assert capfd.readouterr().err == ""


def test_image_input_takes_torchvisions_resize_and_crop():
    base = {"size": [32, 32], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    read = contract.image_input(type("Images", (), {"image_input": {**base, "resize": 36, "crop": [32, 32]}}))
    assert read == {**base, "resize": {"shorter": 36}, "crop": [32, 32], "antialias": True}
    exact = contract.image_input(type("Images", (), {"image_input": {**base, "resize": [32, 32]}}))
    assert exact is not None and (exact["resize"], "crop" in exact) == ({"size": [32, 32]}, False)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"resize": 36}, 'resizing the shorter side needs a centre crop to size, e.g. "crop": [32, 32]'),
        ({"resize": 36, "crop": [30, 30]}, "crop [30, 30] must equal size [32, 32]"),
        ({"resize": "big"}, 'resize must be n (the shorter side) or [h, w], e.g. "resize": 36'),
    ],
)
def test_a_malformed_resize_or_crop_is_one_line_at_export(folder, extra, message):
    own = {"size": [32, 32], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, **extra}
    with pytest.raises(KilnError) as raised:
        export_image_input(Images(folder, None, own))
    assert str(raised.value).startswith("export: datamodule.image_input=") and message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "resize_and_crop",
    [{"resize": {"shorter": 20}, "crop": [16, 16]}, {"resize": {"size": [19, 22]}, "crop": [16, 16]}],
)
def test_parity_images_reach_the_net_unchanged(resize_and_crop):
    """Parity feeds the graph the test inputs `x` as uint8 images: framed so that the graph's
    resize keeps them and its crop takes them back, they come out as `x` was."""
    image = {"size": [16, 16], "channels": 3, "mean": MEAN, "std": STD, "antialias": True, **resize_and_crop}
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    x = (pixels.transpose(0, 3, 1, 2) / 255.0 - np.reshape(MEAN, (1, 3, 1, 1))) / np.reshape(
        STD, (1, 3, 1, 1)
    )
    framed = framed_for_graph(pixels, image)
    assert framed.shape[1:3] != (16, 16)
    (out,) = image_preprocessing(image, image["channels"], image["size"]).run(None, {"image": framed})
    assert np.abs(out - x).max() < 1e-5


def test_drift_statistics_see_the_images_as_the_eval_transform_made_them():
    """`kiln predict` compares per-image statistics with the baseline's, which came from the eval
    transform's output: resized and centre-cropped, so the border a crop drops is not counted."""
    transform = v2.Compose([v2.Resize(20), v2.CenterCrop(16), v2.PILToTensor()])
    rng = np.random.default_rng(2)
    image = {
        "size": [16, 16],
        "channels": 3,
        "mean": MEAN,
        "std": STD,
        "resize": {"shorter": 20},
        "crop": [16, 16],
    }
    meta = {"kiln.image_input": json.dumps(image)}
    for height, width in [(23, 31), (64, 40), (12, 12), (20, 20)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = transform(Image.fromarray(pixels)).numpy().transpose(1, 2, 0)
        (seen,) = at_training_size([pixels], meta)
        assert seen.shape == (16, 16, 3)
        assert np.array_equal(seen, expected), (height, width)
