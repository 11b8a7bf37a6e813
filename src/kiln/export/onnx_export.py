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

Several inputs (a forward of several tensors, or of one dict: NamedInputs) export through a thin
wrapper that takes them one positional tensor each, so both exporters see plain tensors; the graph's
inputs carry forward's argument names (or the dict's keys) and the axes of `dynamic_axes`' rule.
"""

from __future__ import annotations

import inspect
import io
import logging
import warnings
from collections.abc import Mapping
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from kiln.errors import KilnError


@dataclass(frozen=True)
class NamedInputs:
    """A forward's several inputs by name, in the order forward takes them: one tensor each
    (`forward(input_ids, attention_mask)`), or one dict of them (`forward(batch)`, `as_dict`).
    `axes`: the dynamic axes of each input, {name: {axis: axis name}}; inputs sharing an axis name
    share its size (a mask as long as its token ids)."""

    tensors: dict[str, Tensor]
    axes: dict[str, dict[int, str]]
    as_dict: bool = False

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def call(self, net: Any, tensors: dict[str, Tensor] | None = None) -> Any:
        """`net`'s forward on these inputs (or on `tensors` of the same names), as it takes them."""
        values = self.tensors if tensors is None else tensors
        return net(dict(values)) if self.as_dict else net(*(values[name] for name in self.names))

    def rows(self, count: int) -> NamedInputs:
        return NamedInputs({n: t[:count] for n, t in self.tensors.items()}, self.axes, self.as_dict)

    def shapes(self) -> dict[str, list[int]]:
        """Each input's shape without the batch axis, as this example has it."""
        return {name: list(tensor.shape[1:]) for name, tensor in self.tensors.items()}


Example = Tensor | NamedInputs  # what export, pruning and the checks run the net on
BATCH_AXIS, SEQUENCE_AXIS = "batch", "sequence"


def example_input(module: Any, datamodule: Any) -> Example:
    """Two example inputs for export and pruning: the module's `example_input_array` (Lightning's
    own attribute: a tensor, a tuple of tensors for a forward taking several, or a dict of them),
    else the input of the first batch of the validation loader (a dict batch: the entries named
    like forward's arguments). Two rows, because a dynamic batch dimension must be traced with a
    size above 1. Several inputs come back as NamedInputs (see dynamic_axes for their axes)."""
    from kiln.contract import batch_input, export_module

    forward = getattr(export_module(module), "forward", None)
    example = getattr(module, "example_input_array", None)
    if example is None:
        try:
            batch = next(iter(datamodule.val_dataloader()))
        except StopIteration as exc:
            raise KilnError(
                "export: the validation loader is empty; kiln takes an example input from it"
            ) from exc
        named = inputs_of_batch(batch, forward)
        if named is not None:
            return _two_rows(named, module)
        try:
            example = batch_input(batch)
        except TypeError as exc:
            raise KilnError(f"export: {exc}") from exc
    if isinstance(example, tuple | list | Mapping) and not (
        isinstance(example, tuple | list) and len(example) == 1 and isinstance(example[0], Tensor)
    ):
        return _two_rows(named_example(example, forward), module)
    if isinstance(example, tuple | list):
        example = example[0]
    if not isinstance(example, Tensor):
        raise KilnError(
            f"export: the model input of a batch is a {type(example).__name__}, not a tensor; set the module's "
            "example_input_array to an example input tensor (or a tuple or dict of them)"
        )
    example = example.detach().cpu()
    if len(example) < 2:
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    return example[:2].contiguous()


def forward_arguments(forward: Any) -> list[str]:
    """The names of the arguments `forward` takes one by one (not *args or **kwargs)."""
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in kinds]


def inputs_of_batch(batch: Any, forward: Any) -> dict[str, Tensor] | None:
    """A dict batch's entries named like forward's arguments ({input_ids, attention_mask} of a
    batch that also holds `labels`), or a tuple batch's first items when forward requires several
    tensors; None when the batch has one input (kiln.contract.batch_input finds it)."""
    names = forward_arguments(forward)
    if isinstance(batch, Mapping):
        named = {name: batch[name] for name in names if isinstance(batch.get(name), Tensor)}
        return named if len(named) >= 2 else None  # one input: kiln.contract.batch_input's rules
    required = [
        name
        for name, p in _parameters(forward).items()
        if name in names and p.default is inspect.Parameter.empty
    ]
    if isinstance(batch, tuple | list) and len(required) >= 2 and len(batch) >= len(required):
        items = batch[: len(required)]
        if all(isinstance(item, Tensor) for item in items):
            return dict(zip(required, items, strict=True))
    return None


def named_example(example: Any, forward: Any) -> tuple[dict[str, Any], bool]:
    """(the inputs by name in forward's order, whether forward takes them as one dict) from an
    example_input_array that is a tuple (forward(*example)), a dict (forward(**example)) or a
    tuple holding one dict (forward(example[0]))."""
    names = forward_arguments(forward)
    if isinstance(example, tuple | list) and len(example) == 1 and isinstance(example[0], Mapping):
        return dict(example[0]), True
    if isinstance(example, Mapping):
        keys = list(example)
        if len(names) == 1 and names[0] not in keys:  # forward(batch): one dict
            return dict(example), True
        ordered = [n for n in names if n in keys] + [k for k in keys if k not in names]
        return {str(k): example[k] for k in ordered}, False
    named = [names[i] if i < len(names) else f"input_{i}" for i in range(len(example))]
    return dict(zip(named, example, strict=True)), False


def _two_rows(named: dict[str, Any] | tuple[dict[str, Any], bool], module: Any) -> NamedInputs:
    tensors, as_dict = named if isinstance(named, tuple) else (named, False)
    not_tensors = [name for name, value in tensors.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise KilnError(
            f"export: the model input {not_tensors[0]!r} is a {type(tensors[not_tensors[0]]).__name__}, not a "
            "tensor; set the module's example_input_array to tensors (a tuple or dict of them)"
        )
    rows = {len(tensor) for tensor in tensors.values()}
    if len(rows) != 1:
        raise KilnError(
            f"export: the model inputs {', '.join(tensors)} have different numbers of rows "
            f"({', '.join(str(len(t)) for t in tensors.values())}); the first axis of each must be the batch"
        )
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if len(tensor) < 2:
            tensor = tensor.repeat(2, *([1] * (tensor.dim() - 1)))
        out[str(name)] = tensor[:2].contiguous()
    return NamedInputs(out, dynamic_axes(out, getattr(module, "kiln_dynamic_axes", None)), as_dict)


def dynamic_axes(tensors: Mapping[str, Tensor], declared: Any = None) -> dict[str, dict[int, str]]:
    """The axes left dynamic in the graph. The rule: the first axis of every input is `batch`;
    the second axis of an integer or boolean input with two or more axes (token ids, an attention
    mask) is `sequence`. A module's `kiln_dynamic_axes` ({input: {axis: name}}) replaces the rule
    for the inputs it names. An axis whose example size is 1 stays fixed (torch.export needs a
    dynamic size above 1)."""
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in tensors.items():
        own = {0: BATCH_AXIS}
        if tensor.dim() >= 2 and not tensor.is_floating_point() and not tensor.is_complex():
            own[1] = SEQUENCE_AXIS
        if isinstance(declared, Mapping) and isinstance(declared.get(name), Mapping):
            own = {0: BATCH_AXIS, **{int(a): str(n) for a, n in declared[name].items()}}
        axes[name] = {a: n for a, n in own.items() if a < tensor.dim() and (a == 0 or tensor.shape[a] > 1)}
    return axes


def _parameters(forward: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return {}


def input_shape(example: Example) -> list[int] | dict[str, list[int]]:
    """The example's shape without the batch axis; per input for several."""
    return example.shapes() if isinstance(example, NamedInputs) else list(example.shape[1:])


class PositionalForward(nn.Module):
    """`net` taking its named inputs one positional tensor each, as the exporters feed them."""

    def __init__(self, net: nn.Module, example: NamedInputs) -> None:
        super().__init__()
        self.net = net
        self.example = example

    def forward(self, *inputs: Tensor) -> Any:
        return self.example.call(self.net, dict(zip(self.example.names, inputs, strict=True)))


@dataclass(frozen=True)
class Signature:
    """How an exporter sees a net: what it calls, the example arguments, the inputs' names and
    their dynamic axes (in torch.export's Dim form and in torchscript's named form)."""

    net: nn.Module
    args: tuple[Tensor, ...]
    names: list[str]
    axes: dict[str, dict[int, str]]

    @classmethod
    def of(cls, net: nn.Module, example: Example) -> Signature:
        if isinstance(example, NamedInputs):
            return cls(
                PositionalForward(net, example), tuple(example.tensors.values()), example.names, example.axes
            )
        return cls(net, (example,), ["input"], {"input": {0: BATCH_AXIS}})

    def dynamic_shapes(self) -> tuple[Any, ...]:
        dims: dict[str, Any] = {}
        shapes = tuple(
            {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in self.axes[name].items()}
            for name in self.names
        )
        # a forward(*inputs) takes its tensors as one tuple argument
        return (shapes,) if isinstance(self.net, PositionalForward) else shapes

    def named_axes(self) -> dict[str, dict[int, str]]:
        return {**self.axes, "output": {0: BATCH_AXIS}}

    def varied(self) -> tuple[Tensor, ...]:
        """The example grown to 3 rows (it was traced with 2) and its dynamic non-batch axes cut
        by one: a graph that answers these like torch really has the dynamic axes it claims."""
        out = []
        for name, tensor in zip(self.names, self.args, strict=True):
            tensor = torch.cat([tensor, tensor[:1]])
            for axis in self.axes[name]:
                if axis > 0 and tensor.shape[axis] > 2:
                    tensor = tensor.narrow(axis, 0, tensor.shape[axis] - 1)
            out.append(tensor.contiguous())
        return tuple(out)


EXPORTERS = ("auto", "dynamo", "torchscript")
TRUST_ATOL = 1e-4  # torchscript's graph vs torch on a 3-row input, before auto uses it


@dataclass(frozen=True)
class Exported:
    """An exported net, the exporter that made it, and why auto did not use torchscript (if so)."""

    model: onnx.ModelProto
    exporter: str
    fallback_reason: str = ""


def export_net(net: nn.Module, example: Example, opset: int, exporter: str = "auto") -> onnx.ModelProto:
    """`net` (its forward) as an ONNX model with input `input` of shape (batch, *example.shape[1:])
    (several inputs: named as forward's arguments, with their dynamic axes) and output `output`. A net that cannot be exported is one KilnError naming the part that failed."""
    return export_graph(net, example, opset, exporter).model


def check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise KilnError(
            f"export.exporter={exporter}: use auto (torchscript when its graph is trusted, else dynamo), "
            "dynamo or torchscript"
        )


def export_graph(net: nn.Module, example: Example, opset: int, exporter: str = "auto") -> Exported:
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


def _export_or_explain(net: nn.Module, example: Example, opset: int) -> onnx.ModelProto:
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


def _export(module: nn.Module, example: Example, opset: int) -> onnx.ModelProto:
    _quiet_exporter()
    _reuse_torchlib_registry()
    signature = Signature.of(module, example)
    with torch.no_grad(), warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            signature.net,
            signature.args,
            dynamo=True,
            external_data=False,
            opset_version=opset,
            dynamic_shapes=signature.dynamic_shapes(),
            input_names=signature.names,
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


def _export_torchscript(net: nn.Module, example: Example, opset: int) -> onnx.ModelProto:
    _quiet_exporter()
    signature = Signature.of(net, example)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                signature.net,
                signature.args,
                buffer,  # type: ignore[arg-type]  # the torchscript exporter writes to a file object too
                dynamo=False,
                opset_version=opset,
                input_names=signature.names,
                output_names=["output"],
                dynamic_axes=signature.named_axes(),
            )
        except Exception as exc:  # removed from torch, an unsupported operator or opset, ...
            raise Untrusted(f"the torchscript exporter failed ({_root_reason(exc)})") from exc
    traced = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if traced:
        first = str(traced[0].message).strip().split(". ")[0][:160]
        raise Untrusted(f"the torchscript trace may not hold for other inputs ({first})")
    model = onnx.load_from_string(buffer.getvalue())
    _require_same_answers(signature, model)
    return model


def _require_same_answers(signature: Signature, model: onnx.ModelProto) -> None:
    """onnxruntime's answer to a 3-row input (a shorter sequence, where one is dynamic) equals
    torch's, or the graph is not used."""
    from kiln.export.checks import open_session

    if len(model.graph.output) != 1:
        raise Untrusted(f"the net returns {len(model.graph.output)} outputs, not one tensor")
    inputs = signature.varied()
    with torch.no_grad():
        expected = signature.net(*inputs)
    if not isinstance(expected, Tensor):
        raise Untrusted(f"the net returns a {type(expected).__name__}, not a tensor")
    try:
        session = open_session("the torchscript graph", threads=1, model=model.SerializeToString())
        (answer,) = session.run(None, {n: x.numpy() for n, x in zip(signature.names, inputs, strict=True)})
    except Exception as exc:  # a KilnError from open_session, or onnxruntime's own
        raise Untrusted(f"onnxruntime cannot run the torchscript graph ({_root_reason(exc)})") from exc
    wanted = expected.float().numpy()
    if answer.shape != wanted.shape or not np.allclose(answer, wanted, rtol=1e-3, atol=TRUST_ATOL):
        raise Untrusted("the torchscript graph answers a 3-row input unlike torch")


def find_unexportable(net: nn.Module, example: Example, opset: int) -> str | None:
    """Export the children of a Sequential (the net itself, or the `net` its forward runs) one by
    one; name the first one that fails. None when the net is no Sequential (or takes several inputs)."""
    if isinstance(example, NamedInputs):
        return None
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


def skip_reason(candidate: Any, example: Example) -> str | None:
    """Why a compression candidate cannot apply to a model of several inputs (None: it can).
    Structured pruning traces the net with one example tensor and static int8 calibrates one
    input from the training loader; dynamic int8 needs neither, so it applies to any graph."""
    if not isinstance(example, NamedInputs):
        return None
    takes = f"this model takes {len(example.names)} inputs ({', '.join(example.names)})"
    if getattr(candidate, "prune_steps", None):
        return f"structured pruning traces one input tensor; {takes}: use quantize_dynamic"
    if hasattr(getattr(candidate, "quantize_step", None), "calibration_batches"):
        return f"static int8 calibrates one input tensor; {takes}: use quantize_dynamic"
    return None


def exported_by(exported: Any) -> dict[str, str]:
    """A variant's record of the exporter that made its net (and why auto did not use torchscript)."""
    record = {"exporter": exported.exporter}
    if exported.fallback_reason:
        record["exporter_fallback"] = exported.fallback_reason
    return record
