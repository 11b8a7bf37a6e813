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


def quantize_static(
    source: Path, target: Path, input_name: str, calibration: Sequence[np.ndarray], per_channel: bool = True
) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    require(
        len(calibration) > 0 and all(len(b) > 0 for b in calibration),
        "calibration_batches",
        "the calibration set is empty; use 1 or more batches",
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    source, target = source.resolve(), target.resolve()
    with tempfile.TemporaryDirectory(prefix="kiln-quantize-") as temp, _inside(Path(temp)), _quiet():
        prepared = Path(temp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        ort_quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )


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
