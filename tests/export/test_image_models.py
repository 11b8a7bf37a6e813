"""An image model's graph takes uint8 images of any size and resizes and normalizes inside it;
`kiln predict` serves it image files, folders and .npy batches with onnxruntime and Pillow."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from kiln.errors import KilnError
from kiln.export.graphs import assemble, set_metadata
from kiln.export.onnx_export import export_net

IMAGE_INPUT = {"size": [16, 16], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CLASSES = ["a", "b", "c"]


def normalized(pixels: np.ndarray) -> torch.Tensor:
    """What the datamodule feeds the net: uint8 NHWC at the training size -> normalized NCHW."""
    mean = np.asarray(IMAGE_INPUT["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGE_INPUT["std"], np.float32).reshape(1, 3, 1, 1)
    return torch.from_numpy((pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255 - mean) / std)


@pytest.fixture(scope="module")
def image_model(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    )
    graph = assemble(
        export_net(net, torch.zeros(2, 3, 16, 16), 20),
        task="classification",
        class_names=CLASSES,
        image=IMAGE_INPUT,
    )
    set_metadata(
        graph,
        {
            "kiln.input_kind": "image",
            "kiln.class_names": CLASSES,
            "kiln.image_input": IMAGE_INPUT,
            "kiln.variant": "fp32",
        },
    )
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    onnx.save(graph, str(path))
    return path, net.eval()


def test_graph_takes_uint8_images_and_matches_torch_on_normalized_ones(image_model):
    path, net = image_model
    session = ort.InferenceSession(str(path))
    (spec,) = session.get_inputs()
    assert spec.type == "tensor(uint8)" and spec.shape == ["batch", "height", "width", 3]
    pixels = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    logits = session.run(["logits"], {"image": pixels})[0]
    with torch.no_grad():
        expected = net(normalized(pixels)).numpy()
    assert np.abs(logits - expected).max() < 1e-4


def test_graph_resizes_other_sizes_as_training_does(image_model):
    """A 40x56 image: the graph's bilinear resize matches OpenCV's (the training resize) to within
    rounding of the resized pixels to uint8, which training does and the graph does not."""
    import albumentations as A

    path, net = image_model
    session = ort.InferenceSession(str(path))
    big = np.random.default_rng(1).integers(0, 256, (1, 40, 56, 3), dtype=np.uint8)
    resized = A.Resize(16, 16)(image=big[0])["image"][None]
    with torch.no_grad():
        expected = net(normalized(resized)).numpy()
    logits = session.run(["logits"], {"image": big})[0]
    assert np.abs(logits - expected).max() < 0.02


def predict(model: Path, source: Path, output: Path) -> list[dict[str, str]]:
    from kiln.stages.predict import run

    run(
        {
            "model": str(model),
            "input": str(source),
            "output": str(output),
            "batch_size": 4,
            "drift_threshold": None,
        }
    )
    with output.open() as handle:
        return list(csv.DictReader(handle))


def test_predict_reads_a_folder_of_images_of_mixed_sizes_and_modes(image_model, tmp_path, capsys):
    path, net = image_model
    folder = tmp_path / "photos"
    rng = np.random.default_rng(2)
    arrays = {}
    for index, (size, mode) in enumerate([(16, "RGB"), (16, "RGB"), (24, "RGB"), (16, "L"), (16, "RGB")]):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        (folder / ("sub" if index == 4 else "")).mkdir(parents=True, exist_ok=True)
        file = folder / ("sub" if index == 4 else "") / f"{index}.png"
        image.save(file)
        arrays[str(file.relative_to(folder))] = np.asarray(image.convert("RGB"))
    (folder / "readme.txt").write_text("not an image")
    rows = predict(path, folder, tmp_path / "preds.csv")
    assert [row["file"] for row in rows] == sorted(arrays)  # every image, in order, by name
    assert "skipped 1 file(s) that are not images" in capsys.readouterr().err
    for row in rows:
        pixels = arrays[row["file"]]
        if pixels.shape[0] != 16:
            continue
        with torch.no_grad():
            probabilities = net(normalized(pixels[None])).softmax(-1)[0].numpy()
        assert row["prediction"] == CLASSES[int(probabilities.argmax())]
        assert np.allclose([float(row[f"probability_{c}"]) for c in CLASSES], probabilities, atol=1e-4)


def test_predict_reads_npy_batches_uint8_and_float(image_model, tmp_path):
    path, _ = image_model
    pixels = np.random.default_rng(3).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", pixels)
    np.save(tmp_path / "f32.npy", pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    first = predict(path, tmp_path / "u8.npy", tmp_path / "a.csv")
    second = predict(path, tmp_path / "f32.npy", tmp_path / "b.csv")
    assert [r["prediction"] for r in first] == [r["prediction"] for r in second]
    assert [r["file"] for r in first] == [f"u8.npy[{i}]" for i in range(5)]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.png", b"not a png", r"broken.png cannot be read as an image"),
        ("rows.csv", b"a,b\n1,2\n", r"this model takes images; give an image file"),
        ("wrong.npy", None, r"is not an image batch this model takes"),
    ],
)
def test_predict_bad_image_input_is_one_line_and_writes_nothing(
    image_model, tmp_path, name, content, message
):
    path, _ = image_model
    source = tmp_path / name
    if content is None:
        np.save(source, np.zeros((2, 16, 16, 3), dtype=np.float32))
    else:
        source.write_bytes(content)
    with pytest.raises(KilnError, match=message) as raised:
        predict(path, source, tmp_path / "out.csv")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out.csv").exists()
