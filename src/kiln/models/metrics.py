"""Metric collections per task. Keys are what users write as `monitor.metric` (e.g. `val/f1`)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

CLASSIFICATION_METRICS = ("acc", "precision", "recall", "f1", "auroc")
REGRESSION_METRICS = ("mse", "mae", "r2")


# On the training split, classifiers track accuracy only: the macro scores and AUROC (which keeps
# every row's probabilities until the epoch ends) cost a quarter of an MLP epoch on 2 CPU cores,
# and the validation split is where they decide anything.
TRAIN_CLASSIFICATION_METRICS = ("acc",)


def metric_collection(
    task: str, num_classes: int, prefix: str, *, training: bool = False
) -> MetricCollection:
    """Classification: accuracy, and macro precision, recall, F1 and AUROC (accuracy alone with
    `training`). Regression: MSE, MAE, R2."""
    if task == "classification" and training:
        return MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro")}, prefix=prefix)
    if task == "classification":
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "precision": MulticlassPrecision(num_classes, average="macro"),
                "recall": MulticlassRecall(num_classes, average="macro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
                "auroc": MulticlassAUROC(num_classes, average="macro"),
            },
            prefix=prefix,
        )
    return MetricCollection(
        {"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()}, prefix=prefix
    )


def metric_names(task: str, stage: str) -> list[str]:
    """Every key logged at epoch level for a stage ('train', 'val' or 'test')."""
    names: tuple[str, ...]
    if task == "classification":
        names = TRAIN_CLASSIFICATION_METRICS if stage == "train" else CLASSIFICATION_METRICS
    else:
        names = REGRESSION_METRICS
    return [f"{stage}/loss"] + [f"{stage}/{name}" for name in names]


class MeanLoss(Metric):
    """The mean loss over an epoch's rows: per-batch mean losses weighted by their row counts,
    summed over ranks. NaN stays NaN (a diverging run must show it). torchmetrics' MeanMetric
    either drops NaN values or, with nan_strategy="disable", drops the weights (torchmetrics 1.9)."""

    full_state_update = False
    loss_sum: Tensor
    rows: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("loss_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("rows", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, batch_losses: Tensor, batch_rows: Tensor) -> None:
        """`batch_losses`: mean losses of some batches; `batch_rows`: their row counts (same shape)."""
        self.loss_sum += (batch_losses.detach().float() * batch_rows).sum()
        self.rows += batch_rows.sum()

    def compute(self) -> Tensor:
        return self.loss_sum / self.rows
