"""scripts/benchmark_images.py's augmentation comparison: every way it times computes kiln's own
augmentation, and its ratios are paired round by round."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.data.augment import check_augment
from kiln.data.images import IMAGENET_MEAN, IMAGENET_STD
from kilntest import script


@pytest.fixture(scope="module")
def benchmark():
    return script("benchmark_images")


@pytest.mark.parametrize("train", [True, False])
def test_every_way_gives_kilns_normalized_tensor(benchmark, train: bool) -> None:
    """A plain-coloured image stays plain under any crop, resize or flip, so each way's output is
    exactly (colour / 255 - mean) / std everywhere, at the training size, contiguous float CHW."""
    augment = check_augment({"crop_scale": [0.8, 1.0], "horizontal_flip": 0.5})
    colour = np.array([200, 100, 30], dtype=np.uint8)
    image = np.broadcast_to(colour, (40, 52, 3)).copy()
    expected = (torch.tensor(colour / 255.0) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    pipelines = benchmark.augmentation_pipelines((24, 32), augment, IMAGENET_MEAN, IMAGENET_STD, train=train)
    assert list(pipelines) == [
        "albumentations (kiln)",
        "torchvision ToImage",
        "torchvision HWC view",
        "torchvision on PIL",
    ]
    for name, (prepare, transform) in pipelines.items():
        output = transform(prepare(image))
        assert output.shape == (3, 24, 32) and output.dtype == torch.float32 and output.is_contiguous(), name
        per_channel = output.reshape(3, -1)
        assert torch.allclose(per_channel, expected.float()[:, None].expand_as(per_channel), atol=1e-5), name


def test_evaluation_outputs_agree_within_a_grey_level(benchmark) -> None:
    """albumentations' resize and torchvision's (no antialias) do the same arithmetic."""
    augment = check_augment({"crop_scale": [0.8, 1.0]})
    image = np.random.default_rng(0).integers(0, 256, size=(48, 60, 3), dtype=np.uint8)
    pipelines = benchmark.augmentation_pipelines((24, 30), augment, IMAGENET_MEAN, IMAGENET_STD, train=False)
    # at most one uint8 rounding step apart (plus float error from undoing the normalization)
    assert benchmark.same_output(pipelines, image, IMAGENET_STD) <= 1.001


def test_times_are_taken_per_round_and_ratios_paired(benchmark) -> None:
    calls: list[str] = []
    pipelines = {
        name: ((lambda pixels: pixels), (lambda x, name=name: calls.append(name)))
        for name in ("albumentations (kiln)", "torchvision ToImage", "torchvision HWC view")
    }
    times = benchmark.time_pipelines(pipelines, [np.zeros((2, 2, 3), np.uint8)] * 2, rounds=3)
    assert {name: len(values) for name, values in times.items()} == dict.fromkeys(pipelines, 3)
    # one warm-up call each, then 2 images a round; the order rotates: round 2 starts with the second
    assert calls[3:5] == ["albumentations (kiln)"] * 2 and calls[9:11] == ["torchvision ToImage"] * 2
    line, best = benchmark.describe_times(
        {
            "albumentations (kiln)": [100.0, 200.0, 100.0],
            "torchvision ToImage": [300.0, 400.0, 500.0],  # 3.0, 2.0, 5.0: median 3.0
            "torchvision HWC view": [150.0, 500.0, 160.0],  # 1.5, 2.5, 1.6: median 1.6
        }
    )
    assert best == pytest.approx(1.6)
    assert "torchvision ToImage 400 us (3.00x [2.00, 5.00])" in line
    assert "torchvision HWC view 160 us (1.60x [1.50, 2.50])" in line
