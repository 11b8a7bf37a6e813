"""A torch net -> one ONNX file: the dynamo exporter, a dynamic batch axis, a pinned opset, no
external data (DESIGN.md, "Facts measured": `dynamic_shapes` in the tuple form, an example batch
above 1, `external_data=False`).

When the exporter cannot handle the net, the error names the module it stopped at.
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import redirect_stdout
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from kiln.errors import KilnError


def example_input(module: Any, datamodule: Any) -> Tensor:
    """Two example inputs for export and pruning: the module's `example_input_array` (Lightning's
    own attribute) when it is a tensor, else `x` from the first batch of the validation loader.
    Two rows, because a dynamic batch dimension must be traced with a size above 1."""
    from kiln.contract import batch_input

    example = getattr(module, "example_input_array", None)
    if not isinstance(example, Tensor):
        try:
            batch = next(iter(datamodule.val_dataloader()))
            example = batch_input(batch)
        except TypeError as exc:
            raise KilnError(f"export: {exc}") from exc
        except StopIteration as exc:
            raise KilnError(
                "export: the validation loader is empty; kiln takes an example input from it"
            ) from exc
    if not isinstance(example, Tensor):
        raise KilnError(
            f"export: the model input of a batch is a {type(example).__name__}, not a tensor; set the module's "
            "example_input_array to an example input tensor"
        )
    example = example.detach().cpu()
    if len(example) < 2:
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    return example[:2].contiguous()


def export_net(net: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    """`net` (its forward) as an ONNX model with input `input` of shape (batch, *example.shape[1:])
    and output `output`. A net that cannot be exported is one KilnError naming the part that failed."""
    device = next(iter(net.parameters()), torch.empty(0)).device
    net = net.cpu().eval()
    try:
        return _export(net, example, opset)
    except Exception as exc:
        culprit = find_unexportable(net, example, opset)
        reason = _root_reason(exc)
        if culprit:
            raise KilnError(
                f"the ONNX exporter cannot handle module {culprit} ({reason}); replace it with standard "
                "torch layers, or write it with operators ONNX supports"
            ) from exc
        raise KilnError(
            f"the ONNX exporter cannot handle {type(net).__name__}.forward ({reason}); make forward use "
            "operators ONNX supports, or define kiln_export_module() returning the part to deploy"
        ) from exc
    finally:
        net.to(device)


def _export(module: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    _quiet_exporter()
    _reuse_torchlib_registry()
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
    """Export the children of a Sequential (the net itself, or the `net` its forward runs) one by
    one; name the first one that fails. None when the net is no Sequential."""
    sequential = net if isinstance(net, nn.Sequential) else getattr(net, "net", None)
    if not isinstance(sequential, nn.Sequential):
        return None
    if sequential is not net:  # the fault may lie in forward itself: one export tells, not one per child
        try:
            _export(sequential, example, opset)
            return None
        except Exception:
            pass
    x = example
    for name, child in sequential.named_children():
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


def _reuse_torchlib_registry() -> None:
    """torch.onnx rebuilds its table of ATen-to-ONNX functions from torchlib on every export (a
    second or two on 2 cores, a third of exporting the demo's CNN); the table depends on the opset
    only and kiln never adds to it, so it is built once per opset and process. This touches a
    private torch API: where it has moved, exports simply take longer."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return
    registry = getattr(_registration, "ONNXRegistry", None)
    build = getattr(registry, "from_torchlib", None)
    if build is None or getattr(build, "kiln_cached", False):
        return
    built: dict[Any, Any] = {}

    def from_torchlib(cls: Any, *args: Any, **kwargs: Any) -> Any:
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build.__func__(cls, *args, **kwargs)
        return built[key]

    from_torchlib.kiln_cached = True  # type: ignore[attr-defined]
    registry.from_torchlib = classmethod(from_torchlib)  # type: ignore[union-attr]
