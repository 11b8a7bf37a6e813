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
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
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

    A structurally pruned net is saved as a plain state dict (no pickled modules); this resizes
    it in place: Linear, Conv (grouped and depthwise too) and BatchNorm layers take their pruned
    sizes, and every tensor (a LayerNorm's, a ConvNeXt's layer scale too) is resized to the saved
    one. The layers themselves are kept, not rebuilt: a subclass carries more than its sizes
    (timm's BatchNormAct2d holds its activation, which a rebuilt one would get wrong).
    """
    for name, module in net.named_modules():
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None:
            continue
        if isinstance(module, nn.Linear):
            module.in_features, module.out_features = weight.shape[1], weight.shape[0]
        elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            # a depthwise conv keeps one group per channel: pruning channels prunes groups
            outputs_per_group = module.out_channels // module.groups
            module.groups = max(1, weight.shape[0] // outputs_per_group)
            module.in_channels, module.out_channels = weight.shape[1] * module.groups, weight.shape[0]
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.num_features = weight.shape[0]
    _resize_tensors(net, state)
    net.load_state_dict(state)
    return net


def _resize_tensors(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
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
    budget: Budget | None = None,
) -> dict[str, Any]:
    """Train `module` (its weights already pruned) through its own training_step for up to `epochs`
    with early stopping on `monitor`, and keep the best weights. The module's own optimizer with
    its learning rate times `lr_scale`; `trainer_settings` are the run's Trainer arguments
    (accelerator, precision, ...; one device). With a `budget`, the fine-tune is not started when
    the pruned net is hopeless (`Budget.hopeless`) and stops as soon as the budget is out of reach
    (`Budget.out_of_reach`). Returns what happened: epochs run, the best score, and `abandoned`
    (why it gave up, or None) with the budget's drop before and after each epoch."""
    require(isinstance(epochs, int) and epochs >= 0, "finetune_epochs", f"must be >= 0, got {epochs}")
    require(patience >= 1, "patience", f"must be >= 1, got {patience}")
    require(lr_scale > 0, "lr_scale", f"must be > 0, got {lr_scale}")
    outcome: dict[str, Any] = {"epochs": 0, "best_score": None, "abandoned": None}
    if epochs == 0:
        return outcome
    quiet_lightning()
    settings = one_device_settings(trainer_settings, module)
    progress = None
    if budget is not None:
        progress = BudgetProgress(budget, epochs, patience)
        progress.start(validate(module, datamodule, settings))
        if progress.abandoned:
            module.cpu().eval()
            return {**outcome, **progress.record()}
    keep = KeepBest(monitor, mode)
    fresh_metric_states(module)
    trainer = quiet_trainer(
        settings,
        datamodule,
        max_epochs=epochs,
        callbacks=[
            EarlyStopping(monitor=monitor, mode=mode, patience=patience),
            keep,
            ScaleLearningRate(lr_scale),
            *([progress] if progress is not None else []),
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=datamodule)
    if keep.best_state is not None:
        module.load_state_dict(keep.best_state)
    module.cpu().eval()
    outcome.update(epochs=trainer.current_epoch, best_score=keep.best_score)
    return {**outcome, **(progress.record() if progress is not None else {})}


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def one_device_settings(trainer_settings: dict[str, Any] | None, module: Any) -> dict[str, Any]:
    from kiln.training.run import hand_accumulation_to_module

    return hand_accumulation_to_module(
        {"accelerator": "cpu", "devices": 1, **(trainer_settings or {})}, module
    )


def quiet_trainer(settings: dict[str, Any], datamodule: Any, **arguments: Any) -> Any:
    """A Trainer with no logger, checkpoints, bar or summary: the fine-tune's and the scoring's."""
    import lightning as L

    from kiln.contract import shards_by_rank

    return L.Trainer(
        **settings,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=not shards_by_rank(datamodule),
        **arguments,
    )


def validate(module: Any, datamodule: Any, settings: dict[str, Any]) -> dict[str, float]:
    """The module's own validation metrics (its validation_step over the datamodule's loader)."""
    # no inference mode: the metrics' states it would make read-only are updated again by a fine-tune
    trainer = quiet_trainer(settings, datamodule, inference_mode=False)
    fresh_metric_states(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(module, datamodule=datamodule, verbose=False)
    module.cpu().eval()
    return {str(k): float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def fresh_metric_states(module: Any) -> None:
    """Reset the module's torchmetrics outside inference mode: an earlier scoring pass under
    inference mode (the export's, the int8 search's) leaves their states as inference tensors,
    which a validation or fine-tune outside it cannot update in place."""
    from torchmetrics import Metric

    for child in module.modules():
        if isinstance(child, Metric):
            child.reset()


@dataclass(frozen=True)
class Budget:
    """The validation metric a pruned net must end within: its drop from the uncompressed model's
    `baseline` (kiln.compression.choose.metric_drop, in `unit`) at most `max_drop`, the drop the
    export's gate allows."""

    metric: str
    mode: str
    unit: str
    max_drop: float
    baseline: float

    def drop(self, value: float) -> float:
        from kiln.compression.choose import metric_drop

        return float(metric_drop(self.baseline, value, self.mode, self.unit))

    def describe(self, drop: float) -> str:
        from kiln.compression.choose import describe_drop

        return describe_drop(drop, self.unit)

    def hopeless(self, drop: float) -> bool:
        """The pre-check, before any fine-tune: a drop over HOPELESS_MULTIPLE budgets (and over
        HOPELESS_FLOOR, so that a zero budget does not make every pruned net hopeless)."""
        return drop > max(HOPELESS_MULTIPLE * self.max_drop, HOPELESS_FLOOR[self.unit])

    def out_of_reach(self, drops: list[float], epochs_left: int, window: int) -> float | None:
        """After an epoch, `drops` being the best drop so far before the fine-tune and after each
        epoch: the best drop the epochs left could reach if the best kept improving as fast as it
        did over the last `window` epochs, when that still misses the budget; None while it can
        make it. A linear projection is optimistic (a fine-tune's gains shrink), so only a
        fine-tune that cannot make it even so is stopped."""
        best = drops[-1]
        if best <= self.max_drop:
            return None
        window = min(window, len(drops) - 1)
        rate = max(0.0, (drops[-1 - window] - best) / window)
        reachable = best - rate * epochs_left
        return reachable if reachable > self.max_drop else None


# The pre-check's line: a pruned net that, before any fine-tune, loses more than 20 budgets and
# more than the floor (60 points of a score, a loss 9 times the baseline's) is near chance and is
# not fine-tuned. Measured at ratio 0.5: the resnet18 of experiment=images_resnet fell from val/acc
# 0.94 to 0.10 (84 points; val/loss +992%) and its fine-tune ended 78% over the loss it had; the
# demo CNN fell from 0.95 to 0.67 (28 points) and its fine-tune recovered all of it.
HOPELESS_MULTIPLE = 20.0
HOPELESS_FLOOR = {"points": 60.0, "percent": 800.0}


class BudgetProgress(Callback):
    """Follows the budget's drop of the best validation metric through a fine-tune and stops it
    (trainer.should_stop) when `Budget.out_of_reach`; `record()` says what happened."""

    def __init__(self, budget: Budget, epochs: int, window: int) -> None:
        self.budget, self.epochs, self.window = budget, epochs, window
        self.drops: list[float] = []  # the best drop so far: before the fine-tune, then per epoch
        self.abandoned: str | None = None

    def start(self, metrics: dict[str, float]) -> None:
        """The pre-check on the pruned net's metrics before any fine-tune."""
        value = metrics.get(self.budget.metric)
        if value is None:
            return
        self.drops.append(self.budget.drop(value))
        if self.budget.hopeless(self.drops[0]):
            self.abandoned = (
                f"not fine-tuned: before any fine-tune it loses {self.budget.describe(self.drops[0])} "
                f"of {self.budget.metric}, over {HOPELESS_MULTIPLE:g} times the budget "
                f"({self.budget.describe(self.budget.max_drop)}) and over "
                f"{self.budget.describe(HOPELESS_FLOOR[self.budget.unit])}: hopeless"
            )

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        value = trainer.callback_metrics.get(self.budget.metric)
        if value is None or trainer.sanity_checking or not self.drops or self.abandoned:
            return
        self.drops.append(min(self.drops[-1], self.budget.drop(float(value))))
        epoch = len(self.drops) - 1
        reachable = self.budget.out_of_reach(self.drops, self.epochs - epoch, self.window)
        if reachable is not None:
            self.abandoned = (
                f"fine-tune stopped after epoch {epoch} of {self.epochs}: its best {self.budget.metric} "
                f"loses {self.budget.describe(self.drops[-1])}; improving as over its last "
                f"{min(self.window, epoch)} epochs, the {self.epochs - epoch} left would reach "
                f"{self.budget.describe(reachable)} at best, over the budget of "
                f"{self.budget.describe(self.budget.max_drop)}"
            )
            trainer.should_stop = True

    def record(self) -> dict[str, Any]:
        return {"abandoned": self.abandoned, "budget_drops": [round(d, 4) for d in self.drops]}


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
