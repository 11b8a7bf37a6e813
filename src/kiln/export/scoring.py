"""Scoring with the user's own evaluation code: the module's `validation_step` / `test_step` on the
datamodule's own loaders, run by Lightning, with the exported part's `forward` served by an
onnxruntime session (or left in torch, for the baseline).

kiln never needs to know the user's metric functions: whatever the module logs is what each
variant is judged by. Measured on a plain LightningModule (DESIGN.md): the metrics of a patched
forward equal the PyTorch ones to 6 decimals. A validation_step that calls submodules directly
(`self.body(x)`) bypasses `forward`; the calls are counted, and none is one clear error rather
than PyTorch's metrics reported as the graph's.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kiln.errors import KilnError

EVALUATION_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",  # onnxruntime answers on the CPU; the torch baseline is timed there too
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def evaluation_trainer() -> Any:
    """A Lightning Trainer for evaluate(): one serves every pass of an export (building one reads
    every installed package's entry points, 15-20 ms: a tenth of scoring a variant of the demo)."""
    import lightning as L

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice (workers, srun) is about training, not this
        return L.Trainer(**EVALUATION_TRAINER)


def evaluate(
    module: Any, datamodule: Any, split: str, rows: RowRecorder | None = None, trainer: Any = None
) -> dict[str, float]:
    """What the module logs over one split ("val" or "test"), by its own validation/test step;
    with `rows`, every row's output and target are kept as well (for the bootstrap). `trainer`:
    an evaluation_trainer() to reuse (else a new one)."""
    trainer = trainer or evaluation_trainer()
    with warnings.catch_warnings(), rows.active(module) if rows else nullcontext():
        warnings.simplefilter("ignore")
        run = trainer.validate if split == "val" else trainer.test
        results = run(module, datamodule=datamodule, verbose=False)
    module.eval()
    return {name: float(value) for name, value in sorted(results[0].items())} if results else {}


class RowRecorder:
    """While active, keeps what `target` answered to each call and the target `y` of each batch
    the module's validation_step was given, in order: the rows a bootstrap resamples. The batch's
    `y` is its second element (Lightning's `x, y = batch`) or a dict's y/target/label(s) entry;
    without one, nothing is kept."""

    TARGET_KEYS = ("y", "target", "targets", "label", "labels")

    def __init__(self, target: nn.Module) -> None:
        self.target = target
        self.outputs: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.complete = True  # false once a batch had no target or an output was no tensor

    @contextmanager
    def active(self, module: Any) -> Iterator[RowRecorder]:
        step = module.validation_step

        def recording_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            y = self.batch_target(batch)
            if y is None:
                self.complete = False
            else:
                self.targets.append(y)
            return step(batch, *args, **kwargs)

        def keep_output(_module: Any, _inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                self.outputs.append(output.detach().float().cpu().numpy())
            else:
                self.complete = False

        hook = self.target.register_forward_hook(keep_output)
        module.__dict__["validation_step"] = recording_step  # this object only, as OnnxForward
        try:
            yield self
        finally:
            hook.remove()
            del module.__dict__["validation_step"]

    def batch_target(self, batch: Any) -> np.ndarray | None:
        y = None
        if isinstance(batch, list | tuple) and len(batch) >= 2:
            y = batch[1]
        elif isinstance(batch, dict):
            y = next((batch[key] for key in self.TARGET_KEYS if key in batch), None)
        return y.detach().cpu().numpy() if isinstance(y, Tensor) else None

    def rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(outputs, targets) of every row, or None when they cannot be paired one to one."""
        if not self.complete or not self.outputs or not self.targets:
            return None
        outputs, targets = np.concatenate(self.outputs), np.concatenate(self.targets)
        return (outputs, targets) if len(outputs) == len(targets) else None


class OnnxForward:
    """While active, `target.forward(...)` runs the ONNX graph at `session` (the first output back
    as a tensor on the inputs' device), and counts its calls. A graph of one input takes one
    tensor; a graph of several named inputs takes them as forward does: one tensor per argument
    (positional or by name, in the graph's input order) or one dict of them."""

    def __init__(self, target: nn.Module, session: Any) -> None:
        self.target = target
        self.session = session
        self.inputs = [(node.name, numpy_type(node.type)) for node in session.get_inputs()]
        self.calls = 0

    def __call__(self, *args: Any, **keywords: Any) -> Tensor:
        tensors = self.named_tensors(args, keywords)
        self.calls += 1
        feed = {
            name: np.ascontiguousarray(tensors[name].detach().cpu().numpy().astype(dtype, copy=False))
            for name, dtype in self.inputs
        }
        out = self.session.run(None, feed)[0]
        return torch.from_numpy(np.asarray(out)).to(next(iter(tensors.values())).device)

    def named_tensors(self, args: tuple[Any, ...], keywords: dict[str, Any]) -> dict[str, Tensor]:
        names = [name for name, _ in self.inputs]
        if len(args) == 1 and not keywords and isinstance(args[0], dict):
            given = dict(args[0])  # forward(batch) with a dict batch
        else:
            given = {**dict(zip(names, args, strict=False)), **keywords}
            if len(args) > len(names):
                given["(extra positional)"] = args[len(names)]
        wrong = [name for name in names if not isinstance(given.get(name), Tensor)]
        extra = [name for name in given if name not in names]
        if wrong or (extra and len(names) == 1):
            takes = "one tensor" if len(names) == 1 else f"the tensors {', '.join(names)}"
            raise KilnError(
                f"the exported forward takes {takes}; this module's forward was called with "
                f"{describe_call(args, keywords)} (define kiln_export_module() returning the part that "
                "takes what the graph takes)"
            )
        return {name: given[name] for name in names}

    @contextmanager
    def active(self) -> Iterator[OnnxForward]:
        # An instance attribute shadows the class's forward for this object only; nn.Module's
        # __call__ looks `forward` up on the instance.
        own = self.target.__dict__
        had_own, previous = "forward" in own, own.get("forward")
        own["forward"] = self
        try:
            yield self
        finally:
            if had_own:
                own["forward"] = previous
            else:
                del own["forward"]


def numpy_type(onnx_type: str) -> Any:
    """The numpy dtype of an onnxruntime input type string such as 'tensor(int64)'."""
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    return {"float": np.float32, "double": np.float64, "bool": np.bool_}.get(
        name, getattr(np, name, np.float32)
    )


def describe_call(args: tuple[Any, ...], keywords: dict[str, Any]) -> str:
    parts = [type(a).__name__ for a in args] + [f"{k}={type(v).__name__}" for k, v in keywords.items()]
    return f"({', '.join(parts)})"


def evaluate_graph(
    module: Any,
    target: nn.Module,
    session: Any,
    datamodule: Any,
    split: str,
    variant: str,
    rows: RowRecorder | None = None,
    trainer: Any = None,
) -> dict[str, float]:
    """The module's own metrics over a split with `target`'s forward served by `session`."""
    patched = OnnxForward(target, session)
    with patched.active():
        metrics = evaluate(module, datamodule, split, rows, trainer)
    if patched.calls == 0:
        raise KilnError(
            f"scoring {variant}: the module's {'validation' if split == 'val' else 'test'}_step never "
            f"called {type(target).__name__}.forward, so the exported graph cannot be scored; call self(x) "
            "there, or define kiln_export_module() returning the module it does call"
        )
    return metrics
