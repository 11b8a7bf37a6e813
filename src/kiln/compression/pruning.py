"""Pruning a trained net, then fine-tuning it on the same datamodule.

Structured pruning (torch-pruning) removes whole channels and neurons, so the net really gets
smaller and faster; unstructured L1 pruning zeroes single weights, which a dense ONNX file stores
all the same (same size, same speed: DESIGN.md, PyTorch #36214). Unstructured masks are made
permanent (`prune.remove`) before export.
"""

from __future__ import annotations

import copy
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
    """A copy of `net` with `ratio` of the channels/neurons of each layer removed (L1 magnitude)."""
    pruned = copy.deepcopy(net)
    prune_structured_in_place(pruned, torch.rand(2, *input_shape), ratio)
    return pruned


def prune_structured_in_place(net: nn.Module, example: torch.Tensor, ratio: float) -> None:
    """Remove `ratio` of the channels/neurons of each layer of `net` (L1 magnitude), tracing the
    layers' dependencies through `net(example)`.

    The output layer (the last Linear or Conv registered) keeps its size. Layers joined by a
    residual or a flatten are pruned together (torch-pruning's dependency graph), so the net still
    runs.
    """
    import torch_pruning as tp

    check_ratio(ratio, "ratio")
    training = net.training
    net.eval()
    layers = [m for m in net.modules() if isinstance(m, PRUNABLE)]
    require(bool(layers), "ratio", "the net has no Linear or Conv layer to prune")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            net,
            example[:2].detach().to(next(net.parameters()).device),
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=[layers[-1], *attention_projections(net)],
        )
        pruner.step()
    net.train(training)


def attention_projections(net: nn.Module) -> list[nn.Module]:
    """The query/key/value/output layers of attention blocks (a ViT's): their outputs are split into
    heads of a size fixed at build time, so their channels stay; the MLPs between them and the
    residual stream are pruned."""
    return [
        layer
        for module in net.modules()
        if "attention" in type(module).__name__.lower()
        for layer in module.modules()
        if isinstance(layer, nn.Linear)
    ]


def prune_unstructured(net: nn.Module, amount: float, scope: str) -> nn.Module:
    """A copy of `net` with the smallest `amount` of weights masked to zero (global or per layer).

    The masks stay on during a fine-tune (masked weights stay zero); call `make_permanent` after.
    """
    pruned = copy.deepcopy(net)
    prune_unstructured_in_place(pruned, amount, scope)
    return pruned


def prune_unstructured_in_place(net: nn.Module, amount: float, scope: str) -> None:
    """Mask the smallest `amount` of `net`'s Linear/Conv weights to zero (global or per layer)."""
    check_ratio(amount, "amount")
    require(scope in ("global", "layer"), "scope", f"must be global or layer, got {scope!r}")
    pruned = net
    layers = [(m, "weight") for m in pruned.modules() if isinstance(m, PRUNABLE)]
    require(bool(layers), "amount", "the net has no Linear or Conv layer to prune")
    if scope == "global":
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, name in layers:
            prune.l1_unstructured(module, name, amount=amount)


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
    """Resize the layers of a freshly built net to a pruned state dict's shapes.

    A structurally pruned net is saved as a plain state dict (no pickled modules); this rebuilds
    it: Linear, Conv (grouped and depthwise too) and BatchNorm layers are rebuilt at their pruned
    sizes, and any other tensor (a LayerNorm's, a ConvNeXt's layer scale) is resized in place.
    """
    for name, module in list(net.named_modules()):
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None:
            continue
        if isinstance(module, nn.Linear):
            replacement: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            # a depthwise conv keeps one group per channel: pruning channels prunes groups
            outputs_per_group = module.out_channels // module.groups
            groups = max(1, weight.shape[0] // outputs_per_group)
            replacement = type(module)(
                weight.shape[1] * groups,
                weight.shape[0],
                module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                groups=groups,
                bias=module.bias is not None,
            )
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            replacement = type(module)(weight.shape[0])
        else:
            continue
        _set_module(net, name, replacement)
    _resize_other_tensors(net, state)
    net.load_state_dict(state)
    return net


def _resize_other_tensors(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in list(net.state_dict(keep_vars=True).items()):
        saved = state.get(name)
        if saved is None or saved.shape == tensor.shape:
            continue
        owner_name, _, attribute = name.rpartition(".")
        owner = net.get_submodule(owner_name) if owner_name else net
        empty = torch.empty(saved.shape, dtype=tensor.dtype)
        if isinstance(tensor, nn.Parameter):
            setattr(owner, attribute, nn.Parameter(empty, requires_grad=tensor.requires_grad))
        else:
            owner.register_buffer(attribute, empty)
        if attribute == "weight" and hasattr(owner, "normalized_shape"):  # LayerNorm and look-alikes
            owner.normalized_shape = tuple(saved.shape)  # type: ignore[assignment]


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
    trainer_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `module` (its weights already pruned) through its own training_step for up to `epochs`
    with early stopping on `monitor`, and keep the best weights. The module's own optimizer with
    its learning rate times `lr_scale`; `trainer_settings` are the run's Trainer arguments
    (accelerator, precision, ...; one device). Returns what happened: epochs run and the best score."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from kiln.contract import shards_by_rank

    require(isinstance(epochs, int) and epochs >= 0, "finetune_epochs", f"must be >= 0, got {epochs}")
    require(patience >= 1, "patience", f"must be >= 1, got {patience}")
    require(lr_scale > 0, "lr_scale", f"must be > 0, got {lr_scale}")
    if epochs == 0:
        return {"epochs": 0, "best_score": None}
    keep = KeepBest(monitor, mode)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from kiln.training.run import hand_accumulation_to_module

    settings = hand_accumulation_to_module(
        {"accelerator": "cpu", "devices": 1, **(trainer_settings or {})}, module
    )
    trainer = L.Trainer(
        **settings,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=not shards_by_rank(datamodule),
        callbacks=[
            EarlyStopping(monitor=monitor, mode=mode, patience=patience),
            keep,
            ScaleLearningRate(lr_scale),
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=datamodule)
    if keep.best_state is not None:
        module.load_state_dict(keep.best_state)
    module.cpu().eval()
    return {"epochs": trainer.current_epoch, "best_score": keep.best_score}


class ScaleLearningRate(Callback):
    """Multiplies every learning rate the module's configure_optimizers set (and its schedulers'
    base rates) by `scale`: a fine-tune starts from trained weights and wants smaller steps."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.scale == 1.0:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for key in ("lr", "initial_lr"):
                    if isinstance(group.get(key), float | int):
                        group[key] = group[key] * self.scale
        for config in trainer.lr_scheduler_configs:
            base = getattr(config.scheduler, "base_lrs", None)
            if base is not None:
                config.scheduler.base_lrs = [rate * self.scale for rate in base]


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
