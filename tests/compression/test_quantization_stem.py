"""Static int8's stem rewrite (compression/quantization.py, stems_to_space_to_depth): an image net's
strided convolution on 3 input channels becomes Pad + SpaceToDepth + a stride-1 convolution on 12
channels, which onnxruntime's int8 kernels run faster (README: static int8's speed). The rewrite
must not change the net's output, must leave the Pad and SpaceToDepth in fp32, and must keep the
stem's name, so that `quantize_static.exclude` and the fallback still find it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kiln.compression.int8_search import check_exclude, rank_layers
from kiln.compression.quantization import STEM_MARK, StaticSettings, prepare, quantize_prepared
from kiln.export.onnx_export import export_graph


def stem_net(kernel: int, stride: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel, stride, kernel // 2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


def prepared_stem(tmp_path: Path, kernel: int = 7, stride: int = 2, size: int = 20) -> Path:
    exported = export_graph(stem_net(kernel, stride), torch.zeros(2, 3, size, size), 18, "torchscript")
    onnx.save(exported.model, str(tmp_path / "fp32.onnx"))
    return prepare(tmp_path / "fp32.onnx", tmp_path / "prepared.onnx")


def images(size: int, seed: int = 0, rows: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 3, size, size)).astype(np.float32)


def outputs(path: Path, batch: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": batch})[0]


def stem(path: Path) -> onnx.NodeProto:
    return next(node for node in onnx.load(str(path)).graph.node if node.op_type == "Conv")


def weight_shape(path: Path, node: onnx.NodeProto) -> tuple[int, ...]:
    weights = {tensor.name: tensor for tensor in onnx.load(str(path)).graph.initializer}
    return tuple(weights[node.input[1]].dims)


@pytest.mark.parametrize(
    ("kernel", "stride", "size", "blocked"),
    [
        (7, 2, 20, (8, 12, 4, 4)),
        (7, 2, 17, (8, 12, 4, 4)),
        (3, 2, 16, (8, 12, 2, 2)),
        (5, 4, 24, (8, 48, 2, 2)),
    ],
)
def test_a_strided_three_channel_stem_becomes_a_space_to_depth_convolution_with_the_same_output(
    tmp_path: Path, kernel: int, stride: int, size: int, blocked: tuple[int, ...]
):
    prepared = prepared_stem(tmp_path, kernel, stride, size)
    node = stem(prepared)
    assert weight_shape(prepared, node) == blocked  # stride^2 x 3 channels, the kernel in blocks
    ops = [n.op_type for n in onnx.load(str(prepared)).graph.node]
    assert ops[:3] == ["Pad", "SpaceToDepth", "Conv"]
    batch = images(size)
    want = outputs(tmp_path / "fp32.onnx", batch)
    assert np.abs(outputs(prepared, batch) - want).max() < 1e-5 * max(1.0, float(np.abs(want).max()))


def test_a_stem_that_is_already_fast_is_left_as_it_is(tmp_path: Path):
    prepared = prepared_stem(tmp_path, kernel=3, stride=1)  # stride 1: nothing to fold into channels
    assert next(n.op_type for n in onnx.load(str(prepared)).graph.node) == "Conv"
    assert weight_shape(prepared, stem(prepared)) == (8, 3, 3, 3)


def test_the_rewritten_stem_runs_int8_while_its_pad_and_blocks_stay_fp32(tmp_path: Path):
    prepared = prepared_stem(tmp_path)
    calibration = [images(20, seed) for seed in range(2)]
    quantize_prepared(prepared, tmp_path / "int8.onnx", "input", calibration, StaticSettings())
    model = onnx.load(str(tmp_path / "int8.onnx"))
    producers = {output: node for node in model.graph.node for output in node.output}
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    assert producers[conv.input[0]].op_type == "DequantizeLinear"  # the stem itself is int8
    for name in ("pad", "space_to_depth"):
        node = next(node for node in model.graph.node if node.name.endswith(f"{STEM_MARK}{name}"))
        assert producers.get(node.input[0]) is None or producers[node.input[0]].op_type != "DequantizeLinear"
    want = outputs(prepared, calibration[1])
    got = outputs(tmp_path / "int8.onnx", calibration[1])
    assert float(np.mean((got - want) ** 2) / np.mean(want**2)) < 1e-2  # int8's usual error, no more


def test_the_stem_keeps_its_name_so_the_fallback_can_keep_it_in_fp32(tmp_path: Path):
    prepared = prepared_stem(tmp_path)
    name = stem(tmp_path / "fp32.onnx").name
    assert stem(prepared).name == name
    check_exclude(prepared, [name])  # quantize_static.exclude names the layer as the user saw it
    calibration = [images(20, seed) for seed in range(2)]
    quantize_prepared(prepared, tmp_path / "int8.onnx", "input", calibration, StaticSettings())
    assert name in rank_layers(prepared, tmp_path / "int8.onnx", calibration[0])
    quantize_prepared(prepared, tmp_path / "kept.onnx", "input", calibration, StaticSettings(exclude=(name,)))
    model = onnx.load(str(tmp_path / "kept.onnx"))
    dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    kept = next(node for node in model.graph.node if node.name == name)
    assert kept.input[1] not in dequantized  # its weights stay fp32
