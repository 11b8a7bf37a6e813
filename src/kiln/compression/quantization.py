"""int8 with onnxruntime, applied to the net's fp32 ONNX file (before the table preprocessing and
the head are added: quantizing raw inputs wrecks accuracy, DESIGN.md).

- dynamic: weights int8, activations quantized on the fly. Made for Linear-heavy nets; on
  convolutions (ConvInteger) it can be many times slower than fp32, and kiln says so.
- static: QDQ, per-channel int8 weights, activation ranges calibrated on batches drawn from the
  training split, after `quant_pre_process` (run in a temp directory: it leaves files behind).

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
    return prepared


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
            nodes_to_exclude=list(settings.exclude) or None,
            calibrate_method=method,
            calibration_cache_path=None if cache is None else str(cache.resolve()),
        )
    if settings.exclude:
        shield_fp32_layers(target, settings.exclude)


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
