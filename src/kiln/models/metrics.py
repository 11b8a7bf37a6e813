"""Metric collections per task. Keys are what users write as `monitor.metric` (e.g. `val/f1`)."""

from __future__ import annotations

from torchmetrics import MetricCollection
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


def metric_collection(task: str, num_classes: int, prefix: str) -> MetricCollection:
    """Classification: accuracy, and macro precision, recall, F1 and AUROC. Regression: MSE, MAE, R2."""
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
    names = CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS
    return [f"{stage}/loss"] + [f"{stage}/{name}" for name in names]
