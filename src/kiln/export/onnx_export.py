"""A torch net -> one ONNX file: the dynamo exporter, a dynamic batch axis, a pinned opset, no
external data (DESIGN.md, "Facts measured": `dynamic_shapes` in the tuple form, an example batch
above 1, `external_data=False`).

When the exporter cannot handle the net, the error names the module it stopped at.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from contextlib import redirect_stdout

import onnx
import torch
from torch import Tensor, nn

from kiln.errors import KilnError


class Exported(nn.Module):
    """What ships: the net, with a regressor's (rows, 1) output squeezed to (rows,), as KilnModule does."""

    def __init__(self, net: nn.Module, task: str) -> None:
        super().__init__()
        self.net = net
        self.squeeze = task == "regression"

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.squeeze else out


def export_net(net: nn.Module, task: str, input_shape: Sequence[int], opset: int) -> onnx.ModelProto:
    """The net as an ONNX model with input `input` of shape (batch, *input_shape) and one output."""
    wrapper = Exported(net, task).eval()
    example = torch.rand(2, *input_shape)
    try:
        return _export(wrapper, example, opset)
    except Exception as exc:
        culprit = find_unexportable(net, example, opset)
        reason = _root_reason(exc)
        if culprit:
            raise KilnError(
                f"the ONNX exporter cannot handle module {culprit} ({reason}); replace it with standard "
                "torch layers, or write it with operators ONNX supports"
            ) from exc
        raise KilnError(f"the ONNX exporter cannot handle the net ({reason})") from exc


def _export(module: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    _quiet_exporter()
    batch = torch.export.Dim("batch")
    with torch.no_grad(), warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            external_data=False,
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            input_names=["input"],
            output_names=["output"],
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    model = program.model_proto
    for node in model.graph.node:  # torch's stack traces per node: a sixth of a small net's file
        del node.metadata_props[:]
        node.doc_string = ""
    return model


def find_unexportable(net: nn.Module, example: Tensor, opset: int) -> str | None:
    """Export the children of a Sequential one by one; name the first one that fails."""
    if not isinstance(net, nn.Sequential):
        return f"net ({type(net).__name__})"
    x = example
    for name, child in net.named_children():
        try:
            _export(child.eval(), x, opset)
        except Exception:
            return f"net.{name} ({type(child).__name__})"
        with torch.no_grad():
            x = child(x)
    return None


def _root_reason(exc: BaseException) -> str:
    """The innermost cause's first line, which usually names the missing operator."""
    lines = []
    current: BaseException | None = exc
    while current is not None:
        text = str(current).strip()
        if text:
            lines.append(text.splitlines()[0])
        current = current.__cause__ or current.__context__
    for line in reversed(lines):
        if "aten" in line or "operator" in line.lower():
            return line[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _quiet_exporter() -> None:
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
