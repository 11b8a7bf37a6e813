"""Checks every exported file goes through: onnx.checker, one onnxruntime session, and parity.

Parity (fp32 variants): onnxruntime's output on raw rows against the PyTorch pipeline (kiln's
Python preprocessing, then the net in eager mode), max absolute difference of the logits (or
predicted values) within `atol`, and the same predicted classes. int8 variants cannot match fp32
to 1e-4 by design; they are checked by their metric on the test split instead (export stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.export.feeds import num_rows, take_rows


def check_file(path: Path) -> None:
    """onnx.checker with full shape inference; a failure is a KilnError naming the file."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KilnError(f"{path}: onnx.checker rejects it ({first[:200]})") from exc


def open_session(path: Path | str, threads: int | None = None, model: bytes | None = None) -> Any:
    """An onnxruntime CPU session of the file at `path` (or of `model`, that file's graph as
    changed in memory); a file that is not a readable ONNX model is a KilnError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: every error reaches the caller as an exception
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(
            model if model is not None else str(path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KilnError(
            f"{path}: not a readable ONNX model ({first[:160]}); the file may be truncated or corrupted: export it again"
        ) from exc


def run_batched(session: Any, feeds: dict[str, np.ndarray], batch_size: int = 1024) -> dict[str, np.ndarray]:
    """All outputs by name, computed `batch_size` rows at a time."""
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    rows = num_rows(feeds)
    for start in range(0, rows, batch_size):
        for name, value in zip(
            names, session.run(names, take_rows(feeds, start, start + batch_size)), strict=True
        ):
            parts[name].append(np.asarray(value))
    return {name: np.concatenate(values, axis=0) for name, values in parts.items()}


@dataclass
class Parity:
    max_abs: float
    same_predictions: float  # fraction of rows with the same class (1.0 for regression)
    atol: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs <= self.atol and self.same_predictions == 1.0)

    def describe(self) -> str:
        return (
            f"max |onnxruntime - torch| = {self.max_abs:.2e} (allowed {self.atol:.0e}), "
            f"same predictions on {self.same_predictions:.1%} of rows"
        )


def parity(onnx_out: np.ndarray, torch_out: np.ndarray, task: str, atol: float) -> Parity:
    if onnx_out.shape != torch_out.shape:
        raise KilnError(f"parity: onnxruntime gives shape {onnx_out.shape}, torch {torch_out.shape}")
    max_abs = (
        float(np.max(np.abs(onnx_out.astype(np.float64) - torch_out.astype(np.float64))))
        if onnx_out.size
        else 0.0
    )
    if not np.isfinite(max_abs):
        max_abs = float("inf")
    same = float(np.mean(onnx_out.argmax(-1) == torch_out.argmax(-1))) if task == "classification" else 1.0
    return Parity(max_abs, same, atol)
