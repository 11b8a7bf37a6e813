"""Pruning a trained net, then fine-tuning it on the same datamodule.

Structured pruning (torch-pruning) removes whole channels and neurons, so the net really gets
smaller and faster; unstructured L1 pruning zeroes single weights, which a dense ONNX file stores
all the same (same size, same speed: DESIGN.md, PyTorch #36214). Unstructured masks are made
permanent (`prune.remove`) before export.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import prune

from kiln.errors import require

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_ratio(ratio: float, argument: str) -> None:
    require(
        isinstance(ratio, int | float) and 0 < ratio < 1,
        argument,
        f"must be between 0 and 1 (the fraction removed), got {ratio}",
    )


def prune_structured(net: nn.Module, input_shape: Sequence[int], ratio: float) -> nn.Module:
    """A copy of `net` with `ratio` of the channels/neurons of each layer removed (L1 magnitude).

    The output layer keeps its size. Layers joined by a residual or a flatten are pruned together
    (torch-pruning's dependency graph), so the copy still runs.
    """
    import torch_pruning as tp

    check_ratio(ratio, "ratio")
    pruned = copy.deepcopy(net).eval()
    layers = [m for m in pruned.modules() if isinstance(m, PRUNABLE)]
    require(bool(layers), "ratio", "the net has no Linear or Conv layer to prune")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            pruned,
            torch.rand(2, *input_shape),
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=[layers[-1]],
        )
        pruner.step()
    return pruned


def prune_unstructured(net: nn.Module, amount: float, scope: str) -> nn.Module:
    """A copy of `net` with the smallest `amount` of weights masked to zero (global or per layer).

    The masks stay on during a fine-tune (masked weights stay zero); call `make_permanent` after.
    """
    check_ratio(amount, "amount")
    require(scope in ("global", "layer"), "scope", f"must be global or layer, got {scope!r}")
    pruned = copy.deepcopy(net)
    layers = [(m, "weight") for m in pruned.modules() if isinstance(m, PRUNABLE)]
    require(bool(layers), "amount", "the net has no Linear or Conv layer to prune")
    if scope == "global":
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, name in layers:
            prune.l1_unstructured(module, name, amount=amount)
    return pruned


def make_permanent(net: nn.Module) -> nn.Module:
    """Fold pruning masks into the weights: plain parameters again, ready for export."""
    for module in net.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
    return net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def count_nonzero(net: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in net.parameters())


def weight_sparsity(net: nn.Module) -> float:
    """Fraction of zero weights among the Linear/Conv weights."""
    weights = [m.weight for m in net.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0


def fit_to_state_dict(net: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize the Linear/Conv/BatchNorm layers of a freshly built net to a pruned state dict's shapes.

    A structurally pruned net is saved as a plain state dict (no pickled modules); this rebuilds it.
    """
    for name, module in list(net.named_modules()):
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None:
            continue
        if isinstance(module, nn.Linear):
            replacement: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            replacement = type(module)(
                weight.shape[1] * module.groups,
                weight.shape[0],
                module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                groups=module.groups,
                bias=module.bias is not None,
            )
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            replacement = type(module)(weight.shape[0])
        else:
            continue
        _set_module(net, name, replacement)
    net.load_state_dict(state)
    return net


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def finetune(
    module: Any,
    datamodule: Any,
    *,
    epochs: int,
    patience: int,
    monitor: str,
    mode: str,
    lr_scale: float = 1.0,
) -> dict[str, Any]:
    """Train `module` (its net already pruned) for up to `epochs` with early stopping on `monitor`,
    and keep the best weights. The model's own optimizer, its learning rate times `lr_scale`, no
    scheduler. Returns what happened: epochs run and the best score."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    require(isinstance(epochs, int) and epochs >= 0, "finetune_epochs", f"must be >= 0, got {epochs}")
    require(patience >= 1, "patience", f"must be >= 1, got {patience}")
    require(lr_scale > 0, "lr_scale", f"must be > 0, got {lr_scale}")
    if epochs == 0:
        return {"epochs": 0, "best_score": None}
    factory = module.optimizer_factory
    if isinstance(factory, functools.partial) and "lr" in factory.keywords:
        module.optimizer_factory = functools.partial(
            factory.func, *factory.args, **{**factory.keywords, "lr": factory.keywords["lr"] * lr_scale}
        )
    module.scheduler_factory = None
    keep = KeepBest(monitor, mode)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[EarlyStopping(monitor=monitor, mode=mode, patience=patience), keep],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=datamodule)
    if keep.best_state is not None:
        module.load_state_dict(keep.best_state)
    module.eval()
    return {"epochs": trainer.current_epoch, "best_score": keep.best_score}


class KeepBest(Callback):
    """Keeps the best weights in memory (a pruned net is not saved as a checkpoint).

    `on_validation_end`, as EarlyStopping: the epoch's metrics are logged by then."""

    def __init__(self, monitor: str, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking:
            return
        score = float(value)
        if self.best_score is None or (
            score > self.best_score if self.mode == "max" else score < self.best_score
        ):
            self.best_score = score
            self.best_state = copy.deepcopy(pl_module.state_dict())
