"""timm's data config reaches both places an image is resized: kiln's image datamodule (training and
evaluation) and the exported graph, which then resize alike (bicubic for most timm models); the
user's data.* settings win, one startup line says what came from timm, and the images keep
data.image_size (the line says timm's size and how to train at it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from kiln import contract
from kiln.builder import build, build_module
from kiln.config import compose
from kiln.data.augment import eval_transform
from kiln.data.transforms import read_eval_transform
from kiln.errors import KilnError
from kiln.export.images import at_training_size, bicubic, export_image_input
from kilntest import image_preprocessing

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}
OTHER = {"bicubic": "bilinear", "bilinear": "bicubic"}
CUBIC = ["data.image_size=24", "model=backbone", "model.net.name=resnet18"]  # timm's resnet18: bicubic


def photo_folder(root: Path) -> Path:
    """Three classes of noisy colour photos of sizes from 17 to 45 pixels, none 24x24."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(8):
            height, width = (int(s) for s in rng.integers(17, 46, size=2))
            pixels = np.asarray(colour) + rng.normal(0, 60, size=(height, width, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{index}.png")
    return root


def images_with_net(folder: Path, overrides: list[str]) -> Any:
    """kiln's image datamodule as `kiln train` builds it, with its net (which hands it timm's config)."""
    cfg = compose("train", ["data=image_folder", f"data.path={folder}", "data.num_workers=0", *overrides])
    datamodule = build("data", cfg.data, seed=0)
    datamodule.setup("fit")
    build_module(cfg, datamodule)
    return datamodule


def val_batch(datamodule: Any) -> np.ndarray:
    return next(iter(datamodule.val_dataloader()))[0].numpy()


def graph_answers(datamodule: Any, image: dict[str, Any], rows: int) -> np.ndarray:
    """What the exported preprocessing of `image` makes of the files of the first validation batch."""
    session = image_preprocessing(image, 3, datamodule.image_size)
    files = [datamodule.images.paths[i] for i in datamodule.splits.val[:rows]]
    pixels = [np.asarray(Image.open(file).convert("RGB"))[None] for file in files]
    return np.stack([session.run(None, {"image": one})[0][0] for one in pixels])


def grey_levels(a: np.ndarray, b: np.ndarray, datamodule: Any) -> np.ndarray:
    """|a - b| of two normalized batches, in grey levels of the uint8 pixels."""
    return np.abs(a - b) * np.asarray(datamodule.std).reshape(1, -1, 1, 1) * 255


@pytest.mark.parametrize(
    ("overrides", "interpolation"), [([], "bicubic"), (["data.interpolation=bilinear"], "bilinear")]
)
def test_the_graph_resizes_as_training_did_with_timms_interpolation_unless_the_data_config_sets_one(
    tmp_path: Path, overrides: list[str], interpolation: str
):
    datamodule = images_with_net(photo_folder(tmp_path / "photos"), [*CUBIC, *overrides])
    assert datamodule.interpolation == interpolation
    x = val_batch(datamodule)
    graph = graph_answers(datamodule, contract.image_input(datamodule), len(x))
    assert graph.shape == x.shape == (len(x), 3, 24, 24)
    apart = grey_levels(graph, x, datamodule)
    # bicubic: onnxruntime's cubic Resize, rounded and clipped, is OpenCV's INTER_CUBIC (measured: at
    # most 1 grey level, on a rare pixel); bilinear: within the rounding the graph leaves out
    assert apart.max() <= 1.0 and apart.mean() < 0.3, (apart.max(), apart.mean())
    # the filters differ: a graph with the other one misses the training images by many grey levels
    other = {**contract.image_input(datamodule), "interpolation": OTHER[interpolation]}
    assert grey_levels(graph_answers(datamodule, other, len(x)), x, datamodule).max() > 5


def test_training_images_are_resized_with_timms_interpolation(tmp_path: Path):
    from kiln.data.images import training_images

    datamodule = images_with_net(photo_folder(tmp_path / "photos"), CUBIC)
    train = datamodule.train_dataloader().dataset.transform  # the augmentation's crop and resize
    assert {step.interpolation for step in train.transforms} == {cv2.INTER_CUBIC}
    first = datamodule.images.paths[datamodule.splits.train[0]]
    pixels = np.asarray(Image.open(first).convert("RGB"))
    # the drift baseline's images, and what predict resizes new images to before comparing them
    (baseline, *_) = training_images(datamodule, contract.image_input(datamodule), 1)
    expected = cv2.resize(pixels, (24, 24), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(baseline, expected)
    meta = {"kiln.image_input": '{"size": [24, 24], "interpolation": "bicubic"}'}
    assert np.array_equal(at_training_size([pixels], meta)[0], expected)


@pytest.mark.parametrize(("size", "shape"), [((40, 56), (16, 16)), ((8, 9), (32, 20)), ((5, 3), (4, 7))])
def test_predicts_bicubic_resize_is_opencvs(size: tuple[int, int], shape: tuple[int, int]):
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = eval_transform(shape, "bicubic")(image=pixels)["image"]
    assert np.array_equal(bicubic(pixels, *shape), expected)


def test_one_line_says_what_came_from_timm_and_the_size_kept(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
):
    folder = photo_folder(tmp_path / "photos")
    capfd.readouterr()
    images_with_net(folder, CUBIC)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("kiln: data:")]
    assert lines == [
        f"kiln: data: from resnet18's timm data config: mean={mean}, std={std}, interpolation=bicubic "
        "(set data.mean, data.std, data.interpolation to choose others); images stay 24x24 "
        "(data.image_size); resnet18's timm data config is for 224x224: data.image_size=224 trains "
        "at that, slower"
    ]
    # what the line offers, as it says it: timm's size, and nothing left to say
    datamodule = images_with_net(
        folder,
        [
            *CUBIC,
            "data.image_size=224",
            "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.5,0.5,0.5]",
            "data.interpolation=bilinear",
        ],
    )
    assert datamodule.input_shape == (3, 224, 224)
    assert "kiln: data:" not in capfd.readouterr().err


def test_an_image_input_with_an_interpolation_the_graph_cannot_repeat_is_one_line():
    own = {"size": [32, 32], "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "lanczos"}
    with pytest.raises(KilnError) as info:
        export_image_input(type("Images", (), {"image_input": own})())
    assert str(info.value) == (
        'export: datamodule.image_input: "interpolation" must be "bilinear" or "bicubic", got \'lanczos\''
    )


class ValOnly:
    """A user's datamodule, as far as kiln reads it: a validation loader over a dataset."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.dataset)


def test_timms_own_eval_transform_goes_into_the_graph_with_its_bicubic_resize(tmp_path: Path):
    """timm.data.create_transform's eval steps (bicubic Resize of the PIL image, CenterCrop, timm's
    MaybeToTensor, Normalize), as a timm user's DataModule has them, are read and repeated."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from torchvision import datasets

    config = resolve_data_config({}, model=timm.create_model("resnet18", pretrained=False))
    transform = create_transform(**{**config, "input_size": (3, 32, 32)}, is_training=False)
    dataset = datasets.ImageFolder(str(photo_folder(tmp_path / "photos")), transform=transform)
    read = read_eval_transform(ValOnly(dataset))
    assert read is not None and read.refused is None and read.image_input is not None
    image = read.image_input
    assert (image["resize"], image["crop"], image["interpolation"]) == ({"shorter": 33}, [32, 32], "bicubic")
    session = image_preprocessing(image, 3, (32, 32))
    std = np.asarray(config["std"]).reshape(3, 1, 1)
    rng = np.random.default_rng(0)
    for height, width in [(37, 23), (20, 20), (41, 64), (17, 30), (80, 33), (120, 97)]:
        noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for pixels, worst in [(noise, 24), (cv2.GaussianBlur(noise, (7, 7), 3), 2)]:
            expected = transform(Image.fromarray(pixels)).numpy()
            (out,) = session.run(None, {"image": pixels[None]})
            grey = np.abs(out[0] - expected) * std * 255
            # onnxruntime's antialiased cubic (a = -0.5) is not Pillow's to the pixel: measured over 60
            # sizes, under half a grey level on average; on single pixels of pure noise up to 20
            # apart, of smooth (blurred) images 1
            assert grey.mean() <= 1.0 and grey.max() <= worst, (height, width, grey.mean(), grey.max())


def test_a_bicubic_resize_of_a_tensor_is_named_and_not_repeated(tmp_path: Path):
    from torchvision import datasets
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.Resize(36, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(32)]
    transform = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])
    dataset = datasets.ImageFolder(str(photo_folder(tmp_path / "photos")), transform=transform)
    read = read_eval_transform(ValOnly(dataset))
    assert read is not None and read.image_input is None
    assert read.refused == (
        "the eval transform's Resize(size=[36], interpolation=InterpolationMode.BICUBIC, antialias=True) "
        "(kiln repeats a bilinear Resize, or a bicubic one before ToImage, without max_size, before any crop)"
    )
