"""A torch net -> one ONNX file with a dynamic batch axis and a pinned opset.

Two exporters, chosen by `export.exporter`:
  dynamo       torch.export + torchlib, torch's default since 2.9 (DESIGN.md, "Facts measured":
               `dynamic_shapes` in the tuple form, an example batch above 1, `external_data=False`).
               Its first export in a process costs seconds of imports and table building (4.7 s of
               the demo's 9 s compress + export on 2 cores); later ones about a second.
  torchscript  the tracing exporter: about 0.1 s a net, but deprecated by torch (removal announced)
               and, being a trace, blind to Python control flow that depends on the input.
  auto         (the default) torchscript when its graph can be trusted, else dynamo. Trusted means: the
               tracer raised no TracerWarning (the trace may not generalize), the net returns one tensor,
               and onnxruntime answers a 3-row input (not the traced 2: the batch axis really is dynamic)
               like torch to 1e-4. Every variant is checked against torch again after export anyway.

When no exporter can handle the net, the error names the module it stopped at.
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Any

import numpy as np
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


EXPORTERS = ("auto", "dynamo", "torchscript")
TRUST_ATOL = 1e-4  # torchscript's graph vs torch on a 3-row input, before auto uses it


@dataclass(frozen=True)
class Exported:
    """An exported net, the exporter that made it, and why auto did not use torchscript (if so)."""

    model: onnx.ModelProto
    exporter: str
    fallback_reason: str = ""


def export_net(net: nn.Module, example: Tensor, opset: int, exporter: str = "auto") -> onnx.ModelProto:
    """`net` (its forward) as an ONNX model with input `input` of shape (batch, *example.shape[1:])
    and output `output`. A net that cannot be exported is one KilnError naming the part that failed."""
    return export_graph(net, example, opset, exporter).model


def check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise KilnError(
            f"export.exporter={exporter}: use auto (torchscript when its graph is trusted, else dynamo), "
            "dynamo or torchscript"
        )


def export_graph(net: nn.Module, example: Tensor, opset: int, exporter: str = "auto") -> Exported:
    """As export_net, saying which exporter made the graph (report.json records it)."""
    check_exporter(exporter)
    device = next(iter(net.parameters()), torch.empty(0)).device
    net = net.cpu().eval()
    try:
        reason = ""
        if exporter in ("auto", "torchscript"):
            try:
                return Exported(_export_torchscript(net, example, opset), "torchscript")
            except Untrusted as exc:
                if exporter == "torchscript":
                    raise KilnError(
                        f"export.exporter=torchscript: {exc}; use export.exporter=dynamo"
                    ) from exc
                reason = str(exc)
        return Exported(_export_or_explain(net, example, opset), "dynamo", reason)
    finally:
        net.to(device)


def _export_or_explain(net: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
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


class Untrusted(Exception):
    """The torchscript exporter failed, or made a graph kiln does not trust (the message says why)."""


def _export_torchscript(net: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    _quiet_exporter()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                net,
                (example,),
                buffer,  # type: ignore[arg-type]  # the torchscript exporter writes to a file object too
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
        except Exception as exc:  # removed from torch, an unsupported operator or opset, ...
            raise Untrusted(f"the torchscript exporter failed ({_root_reason(exc)})") from exc
    traced = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if traced:
        first = str(traced[0].message).strip().split(". ")[0][:160]
        raise Untrusted(f"the torchscript trace may not hold for other inputs ({first})")
    model = onnx.load_from_string(buffer.getvalue())
    _require_same_answers(net, model, example)
    return model


def _require_same_answers(net: nn.Module, model: onnx.ModelProto, example: Tensor) -> None:
    """onnxruntime's answer to a 3-row input equals torch's, or the graph is not used."""
    from kiln.export.checks import open_session

    if len(model.graph.output) != 1:
        raise Untrusted(f"the net returns {len(model.graph.output)} outputs, not one tensor")
    x = torch.cat([example, example[:1]])  # 3 rows: the traced batch was 2
    with torch.no_grad():
        expected = net(x)
    if not isinstance(expected, Tensor):
        raise Untrusted(f"the net returns a {type(expected).__name__}, not a tensor")
    try:
        session = open_session("the torchscript graph", threads=1, model=model.SerializeToString())
        (answer,) = session.run(None, {"input": x.numpy()})
    except Exception as exc:  # a KilnError from open_session, or onnxruntime's own
        raise Untrusted(f"onnxruntime cannot run the torchscript graph ({_root_reason(exc)})") from exc
    wanted = expected.float().numpy()
    if answer.shape != wanted.shape or not np.allclose(answer, wanted, rtol=1e-3, atol=TRUST_ATOL):
        raise Untrusted("the torchscript graph answers a 3-row input unlike torch")


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
