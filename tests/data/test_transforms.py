"""`kiln.data.transforms`: a user's torchvision eval transform (an ImageFolder's v2.Compose) read as
the preprocessing of the exported graph; the graph reproduces torchvision on uint8 images of any
size within one grey level; a step kiln cannot repeat is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision.transforms import v2

from kiln.data.transforms import read_eval_transform
from kilntest import image_preprocessing

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def tensors() -> list[Any]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]


class ValOnly:
    """What kiln reads of a LightningDataModule here: its validation loader's dataset."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=2)


def image_folder(root: Path) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (9, 7), (10, 200, 30)).save(root / name / "0.png")
    return root


@pytest.mark.parametrize(
    ("steps", "size"),
    [
        ([v2.Resize(20), v2.CenterCrop(16)], (16, 16)),
        ([v2.Resize(24), v2.CenterCrop((12, 18))], (12, 18)),
        ([v2.Resize((14, 10))], (14, 10)),
    ],
)
def test_the_graph_repeats_a_torchvision_eval_transform_on_images_of_any_size(
    tmp_path: Path, steps: list[Any], size: tuple[int, int]
):
    transform = v2.Compose([*steps, *tensors()])
    dataset = datasets.ImageFolder(str(image_folder(tmp_path)), transform=transform)
    read = read_eval_transform(ValOnly(Subset(dataset, [0, 1])))  # a split of it, as users make them
    assert read is not None and read.refused is None and read.image_input is not None
    assert (read.image_input["size"], read.image_input["mean"]) == (list(size), MEAN)
    session = image_preprocessing(read.image_input, 3, size)
    rng = np.random.default_rng(0)
    for height, width in [(37, 23), (20, 20), (41, 64), (17, 30), (80, 33)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = transform(torch.from_numpy(pixels).permute(2, 0, 1)).numpy()
        (out,) = session.run(None, {"image": pixels[None]})
        assert out.shape == (1, 3, *size)
        grey_levels = np.abs(out[0] - expected) * np.asarray(STD).reshape(3, 1, 1) * 255
        # onnxruntime's antialiased linear Resize is not torchvision's: measured on pixel noise, up to
        # 16 grey levels apart on single pixels at downscales of 2-6x, 1.2 on average
        assert grey_levels.mean() <= 2.0 and grey_levels.max() <= 20, (height, width, grey_levels.max())


@pytest.mark.parametrize(
    ("step", "named"),
    [
        (v2.Lambda(lambda x: x.flip(-1)), "the eval transform's Lambda("),
        (v2.RandomHorizontalFlip(), "the eval transform's RandomHorizontalFlip(p=0.5) has no translation"),
        (v2.Resize(20, interpolation=v2.InterpolationMode.NEAREST), "kiln repeats a bilinear Resize"),
    ],
)
def test_a_step_kiln_cannot_repeat_is_named(tmp_path: Path, step: Any, named: str):
    transform = v2.Compose([v2.Resize(20), v2.CenterCrop(16), step, *tensors()])
    read = read_eval_transform(
        ValOnly(datasets.ImageFolder(str(image_folder(tmp_path)), transform=transform))
    )
    assert read is not None and read.image_input is None
    assert read.refused is not None and named in read.refused and "\n" not in read.refused


def test_a_datamodule_without_a_transform_is_not_read():
    assert read_eval_transform(ValOnly(torch.utils.data.TensorDataset(torch.zeros(2, 3)))) is None
    assert read_eval_transform(object()) is None
