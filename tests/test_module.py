"""KilnModule in a real Lightning Trainer on tiny in-memory data: the direct optimizer steps it
takes on one device train exactly what Lightning's wrappers train, step hooks still run when a
callback implements them, epoch losses are row-weighted means (also across a preemption inside
an epoch), and the optimizer runs on torch's fused kernel unless the config chose an
implementation."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from kiln.data import SyntheticDataModule
from kiln.data.batches import chunk_loader
from kiln.errors import KilnError
from kiln.models import KilnModule
from kiln.models.module import build_optimizer
from kiln.models.nets import mlp
from kiln.training.preemption import PREEMPTED_CHECKPOINT, ExactResume, Preemption
from kilntest import PreemptAt

ROWS, FEATURES, CLASSES, BATCH = 300, 6, 3, 32  # 300 rows: the last batch of 32 is partial


def tiny_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(ROWS, FEATURES, generator=generator)
    targets = (features[:, :CLASSES].argmax(dim=1) + (features[:, -1] > 1.5).long()) % CLASSES
    return features, targets


def loaders(features: torch.Tensor, targets: torch.Tensor) -> tuple[Any, Any]:
    rows = torch.arange(len(targets))
    common = {"batch_size": BATCH, "seed": 3}
    train = chunk_loader(features, targets, rows, batches_per_chunk=4, shuffle=True, **common)
    val = chunk_loader(features, targets, rows, batches_per_chunk=1, shuffle=False, **common)
    return train, val


def new_module(dropout: float = 0.2, module_class: type[KilnModule] = KilnModule) -> KilnModule:
    torch.manual_seed(0)
    return module_class(
        net=mlp([FEATURES], CLASSES, hidden_sizes=[16], dropout=dropout),
        task="classification",
        input_shape=[FEATURES],
        class_names=[str(c) for c in range(CLASSES)],
        optimizer=partial(torch.optim.AdamW, lr=0.01),
        seed=7,
    )


def quiet_trainer(callbacks: list[L.Callback], epochs: int, **settings: Any) -> L.Trainer:
    """A one-CPU Trainer with nothing but the given callbacks: no logger, checkpoints or bar."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **settings,
    )


def fit(
    module: KilnModule, callbacks: list[L.Callback], epochs: int = 3, precision: str = "32-true"
) -> L.Trainer:
    trainer = quiet_trainer(callbacks, epochs, precision=precision)
    train, val = loaders(*tiny_data())
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return trainer


class EpochLosses(L.Callback):
    """Records train/loss as callbacks see it at each epoch's end."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


class StepHooks(L.Callback):
    """Implements the hooks Lightning's manual_backward and LightningOptimizer.step call."""

    def __init__(self) -> None:
        self.calls = {"on_before_backward": 0, "on_after_backward": 0, "on_before_optimizer_step": 0}

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self.calls["on_before_backward"] += 1

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self.calls["on_before_optimizer_step"] += 1


STEPS_PER_EPOCH = -(-ROWS // BATCH)  # 10 optimizer steps an epoch


@pytest.mark.slow
def test_direct_steps_train_exactly_what_lightnings_wrappers_train_and_count_every_step():
    direct, wrapped = new_module(), new_module()
    hooks = StepHooks()
    direct_trainer = fit(direct, [])
    wrapped_trainer = fit(wrapped, [hooks])

    assert direct._direct_steps is True
    assert wrapped._direct_steps is False  # a callback implements step hooks: Lightning's path
    assert hooks.calls == dict.fromkeys(hooks.calls, 3 * STEPS_PER_EPOCH)  # every step reached the hooks
    assert direct_trainer.global_step == wrapped_trainer.global_step == 3 * STEPS_PER_EPOCH
    for (name, a), (_, b) in zip(direct.state_dict().items(), wrapped.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # bit for bit: same dropout masks, same updates
    assert direct_trainer.callback_metrics["val/loss"] == wrapped_trainer.callback_metrics["val/loss"]


def test_a_module_overriding_a_step_hook_also_takes_lightnings_path():
    class Hooked(KilnModule):
        def on_after_backward(self) -> None:
            self.after_backward_calls = getattr(self, "after_backward_calls", 0) + 1

    module = new_module(dropout=0.0, module_class=Hooked)
    fit(module, [], epochs=1)
    assert module._direct_steps is False
    assert module.after_backward_calls == STEPS_PER_EPOCH


def test_epoch_losses_are_means_over_rows_not_over_batches():
    module = new_module(dropout=0.0)
    trainer = fit(module, [], epochs=1)
    features, targets = tiny_data()
    module.eval()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(module(features), targets)
        accuracy = (module(features).argmax(dim=1) == targets).float().mean()
    # the partial last batch (12 rows) weighs 12/300, not 1/10
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(float(accuracy), abs=1e-6)
    assert {"train/loss", "train/acc", "val/loss", "val/auroc"} <= set(trainer.callback_metrics)


def test_a_loss_that_becomes_nan_stops_training_naming_the_epoch():
    class NanLoss(nn.Module):
        def forward(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return out.sum() * float("nan")

    module = new_module()
    module.loss_fn = NanLoss()
    with pytest.raises(Exception, match=r"the training loss became nan at epoch 1 \(step 4\)"):
        fit(module, [], epochs=1)


def test_callbacks_see_this_epochs_training_loss_at_epoch_end():
    """Callbacks' on_train_epoch_end (checkpointing, progress lines) runs before the module's."""

    class Recorded(KilnModule):
        def on_fit_start(self) -> None:
            self.logged: list[float] = []

        def _log_epoch(self, stage: str) -> None:
            if stage == "train":
                self.logged.append(float(self.train_loss.compute()))
            super()._log_epoch(stage)

    module = new_module(dropout=0.0, module_class=Recorded)
    seen = EpochLosses()
    fit(module, [seen], epochs=3)
    assert len(seen.losses) == 3 and len(set(seen.losses)) == 3
    assert seen.losses == pytest.approx(module.logged, abs=1e-7)  # each epoch's own, logged once


def test_optimizers_take_torchs_fused_kernel_unless_the_config_chose_one():
    parameters = list(new_module().parameters())
    assert build_optimizer(partial(torch.optim.AdamW, lr=0.01), parameters).defaults["fused"] is True
    assert build_optimizer(partial(torch.optim.SGD, lr=0.1), parameters).defaults["fused"] is True
    # the user's choice wins: fused=false, or foreach
    assert not build_optimizer(partial(torch.optim.AdamW, lr=0.01, fused=False), parameters).defaults["fused"]
    foreach = build_optimizer(partial(torch.optim.AdamW, lr=0.01, foreach=True), parameters)
    assert foreach.defaults["foreach"] is True and not foreach.defaults["fused"]
    # an optimizer without a fused kernel, and a setting the fused kernel refuses: torch's default
    assert "fused" not in build_optimizer(partial(torch.optim.RMSprop, lr=0.01), parameters).defaults
    differentiable = build_optimizer(partial(torch.optim.Adam, lr=0.01, differentiable=True), parameters)
    assert differentiable.defaults["differentiable"] is True and not differentiable.defaults["fused"]


@pytest.mark.parametrize(("precision", "fused"), [("32-true", True), ("bf16-mixed", False)])
def test_gradient_clipping_under_mixed_precision_keeps_torchs_default_loop(precision: str, fused: bool):
    """Lightning refuses to clip a fused optimizer's gradients under mixed precision."""
    module = new_module()
    module.gradient_clip_val = 1.0
    trainer = fit(module, [], epochs=1, precision=precision)
    assert bool(module.optimizers().optimizer.defaults["fused"]) is fused
    assert trainer.global_step == STEPS_PER_EPOCH and torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.slow
def test_the_fused_kernel_trains_what_torchs_default_loop_trains():
    fused, default = new_module(dropout=0.0), new_module(dropout=0.0)
    default.optimizer_factory = partial(torch.optim.AdamW, lr=0.01, fused=False)
    fit(fused, [], epochs=2)
    fit(default, [], epochs=2)
    assert fused.optimizers().optimizer.defaults["fused"] is True
    assert not default.optimizers().optimizer.defaults["fused"]
    for (name, a), (_, b) in zip(fused.state_dict().items(), default.state_dict().items(), strict=True):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-5), name  # the same algorithm, up to rounding


def fit_synthetic(callbacks: list[L.Callback], ckpt_path: Path | None = None) -> None:
    data = SyntheticDataModule(
        num_samples=1_200, num_features=FEATURES, num_classes=CLASSES, batch_size=BATCH, batches_per_chunk=2
    )
    trainer = quiet_trainer(callbacks, epochs=2, deterministic=True)
    trainer.fit(new_module(), datamodule=data, ckpt_path=ckpt_path)


@pytest.mark.slow
def test_a_run_preempted_inside_an_epoch_resumes_with_that_epochs_whole_training_loss(tmp_path: Path):
    straight = EpochLosses()
    fit_synthetic([ExactResume(), straight])

    preemption = Preemption(tmp_path, stopped_within_s=0)
    with pytest.raises(KilnError, match="did not stop the job"):  # saved, then waited for SLURM
        fit_synthetic([PreemptAt(preemption, epoch=1, chunk=5), preemption])
    resumed = EpochLosses()
    fit_synthetic([ExactResume(), resumed], ckpt_path=tmp_path / PREEMPTED_CHECKPOINT)

    # the second epoch's loss covers its 6 chunks before the save and the 8 after it
    assert len(straight.losses) == 2 and resumed.losses == pytest.approx(straight.losses[1:], abs=1e-6)


@pytest.mark.slow
def test_a_signal_in_an_epochs_last_step_saves_at_the_end_of_that_epoch(tmp_path: Path):
    """Saved in an epoch's last step, a resume would enter an epoch with no steps left, which
    Lightning ends without validating: the save waits for the epoch's end (after validation)."""
    straight = EpochLosses()
    fit_synthetic([ExactResume(), straight])

    preemption = Preemption(tmp_path, stopped_within_s=0)
    with pytest.raises(KilnError, match="did not stop the job"):
        fit_synthetic([PreemptAt(preemption, epoch=0, chunk=13), preemption])  # 14 chunks an epoch
    saved = torch.load(tmp_path / PREEMPTED_CHECKPOINT, weights_only=False)
    assert saved["epoch"] == 0 and "kiln_epoch_position" not in saved  # resumes at epoch 1's start
    resumed = EpochLosses()
    fit_synthetic([ExactResume(), resumed], ckpt_path=tmp_path / PREEMPTED_CHECKPOINT)
    assert resumed.losses == pytest.approx(straight.losses[1:], abs=1e-6)
