"""Optuna pruning inside a kiln run: the trial hears the monitored metric after every validation."""

from __future__ import annotations

from typing import Any

import lightning as L
import optuna


class TrialPruning(L.Callback):
    """Reports `metric` to the trial each epoch; raises optuna.TrialPruned when the pruner says the
    trial is worse than the others were at the same epoch (kiln search records it as pruned)."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        epoch = trainer.current_epoch
        self.trial.report(float(trainer.callback_metrics[self.metric]), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} at epoch {epoch + 1} is worse than the median trial's")
