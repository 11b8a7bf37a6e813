"""int8 with onnxruntime, applied to the net's fp32 ONNX file (before the table preprocessing and
the head are added: quantizing raw inputs wrecks accuracy, DESIGN.md).

- dynamic: weights int8, activations quantized on the fly. Made for Linear-heavy nets; on
  convolutions (ConvInteger) it can be many times slower than fp32, and kiln says so.
- static: QDQ, per-channel int8 weights, activation ranges calibrated on batches drawn from the
  training split, after `quant_pre_process` (run in a temp directory: it leaves files behind) and
  an exact rewrite of an image net's 3-channel strided stem into a space-to-depth convolution,
  which onnxruntime's int8 kernels run fast (stems_to_space_to_depth).

`torch.ao.quantization` is not used: deprecated, and its models mostly do not export to ONNX.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from kiln.errors import require

CONV_OPS = ("Conv", "ConvTranspose")


def calibration_batches(features: np.ndarray, batches: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """`batches` random batches of `batch_size` rows from the training split's features."""
    require(
        isinstance(batches, int) and batches >= 1,
        "calibration_batches",
        f"the calibration set would be empty ({batches} batches); use 1 or more (8 is a good start)",
    )
    require(
        isinstance(batch_size, int) and batch_size >= 1,
        "calibration_batch_size",
        f"must be >= 1, got {batch_size}",
    )
    require(
        len(features) > 0,
        "calibration_batches",
        "the calibration set is empty: the training split has no rows",
    )
    generator = np.random.default_rng(seed)
    rows = generator.permutation(len(features))
    chosen = [rows[(i * batch_size) % len(rows) :][:batch_size] for i in range(batches)]
    return [np.ascontiguousarray(features[index], dtype=np.float32) for index in chosen if len(index)]


def calibration_from_loader(datamodule: Any, batches: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Calibration batches of model inputs from the datamodule's own training loader: enough
    loader batches for `batches * batch_size` inputs (fewer if the split is smaller), then drawn
    as `calibration_batches` does. Only the inputs `x` are kept (kiln.contract.batch_input)."""
    from kiln.contract import batch_input

    require(isinstance(batches, int) and batches >= 1, "calibration_batches", f"must be >= 1, got {batches}")
    wanted = batches * batch_size
    parts, rows = [], 0
    loader = datamodule.train_dataloader()
    for batch in loader:
        x = batch_input(batch).detach().float().cpu().numpy()
        parts.append(x)
        rows += len(x)
        if rows >= wanted:
            break
    del loader
    require(
        bool(parts),
        "calibration_batches",
        "the calibration set is empty: the training loader gave no batches",
    )
    return calibration_batches(np.concatenate(parts), batches, batch_size, seed)


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # onnxruntime's CalibrationMethod, by kiln's names


@dataclass(frozen=True)
class StaticSettings:
    """How one static int8 graph is made: the calibration method of the activation ranges,
    per-channel weight scales, 7-bit weights (`reduce_range`: for CPUs without VNNI, where 8-bit
    products can saturate), and the nodes kept in fp32."""

    method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool = False
    exclude: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """`minmax, per-channel`: the calibration, as the report names it."""
        parts = [self.method, "per-channel" if self.per_channel else "per-tensor"]
        return ", ".join([*parts, "reduce_range"] if self.reduce_range else parts)


def quantize_static(
    source: Path,
    target: Path,
    input_name: str,
    calibration: Sequence[np.ndarray],
    per_channel: bool = True,
    settings: StaticSettings | None = None,
) -> None:
    """Static QDQ int8 of the fp32 net at `source` (pre-processed first) written to `target`."""
    settings = settings or StaticSettings(per_channel=per_channel)
    with tempfile.TemporaryDirectory(prefix="kiln-quantize-") as temp:
        prepared = prepare(source, Path(temp) / "prepared.onnx")
        quantize_prepared(prepared, target, input_name, calibration, settings)


def prepare(source: Path, prepared: Path) -> Path:
    """onnxruntime's pre-processing (shape inference, graph optimization) of the fp32 net: the
    graph the quantizer rewrites, and whose node names `exclude` refers to."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, prepared = source.resolve(), prepared.resolve()
    with tempfile.TemporaryDirectory(prefix="kiln-quantize-") as temp, _inside(Path(temp)), _quiet():
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
    model = onnx.load(str(prepared))
    if stems_to_space_to_depth(model):
        onnx.save(model, str(prepared))
    return prepared


STEM_MARK = "_kiln_stem_"  # the nodes stems_to_space_to_depth adds: they stay fp32 (see quantize_prepared)


def stems_to_space_to_depth(model: onnx.ModelProto) -> list[str]:
    """Rewrite each strided convolution on a graph input with few channels (an image net's stem:
    3 channels, 7x7, stride 2) into the same convolution on a space-to-depth input: Pad, then
    SpaceToDepth(stride) gives stride^2 x the channels at 1/stride the size, and the kernel,
    zero-padded to a multiple of the stride and rearranged alike, runs with stride 1. The result
    is the same to float rounding. Why: onnxruntime's int8 convolution (QLinearConv, VNNI) is fast
    when the input channels are a multiple of 4; on 3 channels ResNet-18's stem took a fifth of
    the int8 graph's time and ran barely faster than fp32 (README: static int8's speed). Returns the
    names of the rewritten convolutions."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    inputs = {value.name: value for value in model.graph.input}
    rewritten = []
    for node in list(model.graph.node):
        if node.op_type == "Conv" and node.input[0] in inputs and node.input[1] in initializers:
            stem = _stem_geometry(node, initializers[node.input[1]], inputs[node.input[0]])
            if stem is not None:
                _rewrite_stem(model, node, stem)
                rewritten.append(node.name)
    return rewritten


@dataclass(frozen=True)
class _Stem:
    weight: np.ndarray  # (out, in, kernel, kernel)
    stride: int
    pads: tuple[int, int, int, int]  # top, left, bottom, right: the padded input splits evenly into blocks


def _stem_geometry(
    node: onnx.NodeProto, weight: onnx.TensorProto, value: onnx.ValueInfoProto
) -> _Stem | None:
    """The stem's geometry when the rewrite applies: one group, a square stride of 2 or more with
    no dilation, explicit pads, input channels not a multiple of 4 (those are fast already) that
    become one after the rewrite, and a known image size; else None."""
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = onnx.numpy_helper.to_array(weight)
    strides = list(attributes.get("strides", [1, 1]))
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]
    if (
        kernel.ndim != 4
        or len(dims) != 4
        or attributes.get("group", 1) != 1
        or attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        or any(d != 1 for d in attributes.get("dilations", [1, 1]))
        or len(set(strides)) != 1
        or strides[0] < 2
        or kernel.shape[1] % 4 == 0
        or kernel.shape[1] * strides[0] ** 2 % 4 != 0
        or not dims[2] * dims[3]
    ):
        return None
    stride = int(strides[0])
    top, left, bottom, right = (int(p) for p in attributes.get("pads", [0, 0, 0, 0]))
    blocks = -(-max(kernel.shape[2:]) // stride)  # the kernel's side in blocks of stride x stride
    out_h = (dims[2] + top + bottom - kernel.shape[2]) // stride + 1
    out_w = (dims[3] + left + right - kernel.shape[3]) // stride + 1
    bottom = stride * (out_h - 1 + blocks) - dims[2] - top
    right = stride * (out_w - 1 + blocks) - dims[3] - left
    if min(bottom, right) < 0:
        return None
    return _Stem(kernel, stride, (top, left, bottom, right))


def _rewrite_stem(model: onnx.ModelProto, node: onnx.NodeProto, stem: _Stem) -> None:
    out_channels, channels, height, width = stem.weight.shape
    stride, side = stem.stride, -(-max(height, width) // stem.stride)
    padded = np.zeros((out_channels, channels, side * stride, side * stride), stem.weight.dtype)
    padded[:, :, :height, :width] = stem.weight
    # SpaceToDepth puts input pixel (c, stride*y + p, stride*x + q) at channel (p*stride + q)*channels + c
    blocked = padded.reshape(out_channels, channels, side, stride, side, stride).transpose(0, 3, 5, 1, 2, 4)
    weight = np.ascontiguousarray(blocked.reshape(out_channels, stride * stride * channels, side, side))
    for tensor in model.graph.initializer:
        if tensor.name == node.input[1]:
            tensor.CopyFrom(onnx.numpy_helper.from_array(weight, node.input[1]))
    top, left, bottom, right = stem.pads
    pads = onnx.numpy_helper.from_array(
        np.array([0, 0, top, left, 0, 0, bottom, right], np.int64), f"{node.name}{STEM_MARK}pads"
    )
    model.graph.initializer.append(pads)
    pad = onnx.helper.make_node(
        "Pad",
        [node.input[0], pads.name],
        [f"{node.name}{STEM_MARK}padded"],
        name=f"{node.name}{STEM_MARK}pad",
    )
    blocks = onnx.helper.make_node(
        "SpaceToDepth",
        pad.output,
        [f"{node.name}{STEM_MARK}blocks"],
        name=f"{node.name}{STEM_MARK}space_to_depth",
        blocksize=stride,
    )
    position = list(model.graph.node).index(node)
    model.graph.node.insert(position, blocks)
    model.graph.node.insert(position, pad)
    node.input[0] = blocks.output[0]
    kept = [a for a in node.attribute if a.name not in ("strides", "pads", "kernel_shape")]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.extend(
        [
            onnx.helper.make_attribute("strides", [1, 1]),
            onnx.helper.make_attribute("pads", [0, 0, 0, 0]),
            onnx.helper.make_attribute("kernel_shape", [side, side]),
        ]
    )


def quantize_prepared(
    prepared: Path,
    target: Path,
    input_name: str,
    calibration: Sequence[np.ndarray],
    settings: StaticSettings,
    cache: Path | None = None,
) -> None:
    """Static QDQ int8 of a prepared net. `cache`: a file keeping the calibrated activation ranges
    (onnxruntime's calibration cache), so that a retry with other nodes kept in fp32 does not
    calibrate again."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    require(
        len(calibration) > 0 and all(len(b) > 0 for b in calibration),
        "calibration_batches",
        "the calibration set is empty; use 1 or more batches",
    )
    require(
        settings.method in CALIBRATION_METHODS,
        "quantize_static.calibration",
        f"unknown method {settings.method!r}; use one or more of {', '.join(CALIBRATION_METHODS)}",
    )
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[settings.method]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    prepared, target = prepared.resolve(), target.resolve()
    with tempfile.TemporaryDirectory(prefix="kiln-quantize-") as temp, _inside(Path(temp)), _quiet():
        ort_quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[*settings.exclude, *_stem_nodes(prepared)] or None,
            calibrate_method=method,
            calibration_cache_path=None if cache is None else str(cache.resolve()),
        )
    if settings.exclude:
        shield_fp32_layers(target, settings.exclude)


def _stem_nodes(prepared: Path) -> list[str]:
    """The Pad and SpaceToDepth nodes of a rewritten stem: quantized, each would run between a
    QuantizeLinear and a DequantizeLinear (measured slower); kept fp32, one QuantizeLinear follows."""
    return [node.name for node in onnx.load(str(prepared)).graph.node if STEM_MARK in node.name]


def shield_fp32_layers(path: Path, exclude: Sequence[str]) -> None:
    """Keep the excluded layers in fp32 when onnxruntime loads the graph, too. Its graph optimizer
    (WeightBiasQuantization, onnxruntime 1.2x+) quantizes the float weights of a Conv/Gemm/MatMul
    whose input comes from a DequantizeLinear, undoing `nodes_to_exclude` (measured: an excluded
    layer's error came back whole). A `Max(x, x)` between the two is an identity no optimizer
    removes, and the layer then runs in fp32 as asked."""
    model = onnx.load(str(path))
    producers = {output: node for node in model.graph.node for output in node.output}
    nodes = list(model.graph.node)
    for node in nodes:
        source = producers.get(node.input[0]) if node.name in exclude and node.input else None
        if source is None or source.op_type != "DequantizeLinear":
            continue
        shielded = f"{node.input[0]}_kiln_fp32_{node.name}"
        guard = onnx.helper.make_node(
            "Max", [node.input[0], node.input[0]], [shielded], name=f"{node.name}_kiln_fp32"
        )
        model.graph.node.insert(list(model.graph.node).index(node), guard)
        node.input[0] = shielded
    onnx.save(model, str(path))


def quantize_dynamic(source: Path, target: Path, per_channel: bool = False) -> list[str]:
    """Returns warnings to show (convolutions)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    source, target = source.resolve(), target.resolve()
    convs = sum(node.op_type in CONV_OPS for node in onnx.load(str(source)).graph.node)
    with tempfile.TemporaryDirectory(prefix="kiln-quantize-") as temp, _inside(Path(temp)), _quiet():
        ort_quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=per_channel)
    if convs:
        return [
            f"quantize_dynamic: the net has {convs} convolution(s); onnxruntime's dynamic int8 (ConvInteger) "
            "is often many times slower than fp32 on them (onnxruntime #15888): prefer quantize_static"
        ]
    return []


@contextmanager
def _inside(directory: Path) -> Iterator[None]:
    """Run in `directory` (onnxruntime's pre-processing writes temp files into the working directory)."""
    previous = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def _quiet() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization" etc.
    try:
        yield
    finally:
        root.setLevel(level)
