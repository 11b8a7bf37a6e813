"""Permutation importance of a table's RAW input columns, on the validation split.

Why raw columns: a categorical column becomes several one-hot features after preprocessing, and a
numeric one goes through imputation and scaling. Shuffling the raw column (then preprocessing it
exactly as training did) asks the question users mean: "how much does the model lean on
`island`?", with one answer per column of their table.

    importance = permutation_importance(model, to_tensor, frame, targets, score, repeats=5, seed=42)

A column's importance is how much the score drops when that column's values are shuffled across
rows (breaking its link to the target, keeping its distribution): the mean and std over `repeats`
shuffles drawn from one seeded RNG. Zero means the model ignores the column; a negative value means
shuffling happened to help, i.e. the column is noise to this model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

# A score where higher is better: (model outputs, targets) -> float.
Score = Callable[[Tensor, Tensor], float]


def permutation_importance(
    model: Callable[[Tensor], Tensor],
    to_tensor: Callable[[pd.DataFrame], Tensor],
    frame: pd.DataFrame,
    targets: Tensor,
    score: Score,
    repeats: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """[{feature, mean, std}] for every column of `frame`, sorted by mean importance, largest first."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rng = np.random.default_rng(seed)
    baseline = score(predict(model, to_tensor(frame)), targets)
    results = []
    for column in frame.columns:
        drops = []
        for _ in range(repeats):
            shuffled = frame.copy()
            # positional shuffle of the raw values (NaNs and text included); the index stays put
            shuffled[column] = frame[column].to_numpy()[rng.permutation(len(frame))]
            drops.append(baseline - score(predict(model, to_tensor(shuffled)), targets))
        results.append({"feature": str(column), "mean": float(np.mean(drops)), "std": float(np.std(drops))})
    return sorted(results, key=lambda item: item["mean"], reverse=True)


def predict(model: Callable[[Tensor], Tensor], features: Tensor, batch_size: int = 8192) -> Tensor:
    """The model's outputs for all rows, in eval mode, in batches (a large split needs no huge batch)."""
    device = _device(model)
    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.no_grad():
        parts = [
            model(features[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(features), batch_size)
        ]
    return torch.cat(parts) if parts else torch.empty(0)


def _device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def monitored_score(module: Any, metric: str, mode: str) -> tuple[str, Score]:
    """The score importance is measured in, and what an importance then means ("rise in val/loss").

    The run's monitored metric when the module can compute it (its loss, or one of its
    torchmetrics), otherwise accuracy or R2. The score is always higher-is-better, so a `min`
    metric (a loss) is negated: its importances are how much the loss rises.
    """
    from kiln.models.metrics import metric_collection

    task = getattr(module, "task", "classification")
    name = metric.split("/", 1)[-1]  # val/f1 -> f1
    metrics = metric_collection(task, len(getattr(module, "class_names", [])), "")
    if name == "loss" and hasattr(module, "loss_fn"):
        loss_fn, sign = module.loss_fn, -1.0 if mode == "min" else 1.0

        def loss(outputs: Tensor, targets: Tensor) -> float:
            return sign * float(loss_fn(outputs, targets))

        return f"{'rise' if mode == 'min' else 'drop'} in {metric}", loss
    if name not in metrics:  # e.g. a user's own module logging other names
        name, mode = ("acc" if task == "classification" else "r2"), "max"
        metric = f"val/{name}"
    chosen, sign = metrics[name], -1.0 if mode == "min" else 1.0

    def scored(outputs: Tensor, targets: Tensor) -> float:
        chosen.reset()
        # classification metrics see probabilities, as KilnModule's own do (AUROC needs them)
        chosen.update(outputs.softmax(dim=-1) if task == "classification" else outputs, targets)
        return sign * float(chosen.compute())

    return f"{'rise' if mode == 'min' else 'drop'} in {metric}", scored


def table_feature_importance(
    module: Any, datamodule: Any, metric: str, mode: str, repeats: int, seed: int
) -> tuple[str, list[dict[str, Any]]] | None:
    """Permutation importance of a TableDataModule's raw columns on its validation split.

    Returns what the numbers measure ("rise in val/loss") and the importances. The raw rows are
    read again (the datamodule keeps only the preprocessed tensors); the split indices and the
    fitted preprocessor are the run's own. None when the source changed meanwhile.
    """
    import warnings

    assert datamodule.splits is not None and datamodule.targets is not None
    loaded = datamodule.load()
    rows = datamodule.splits.val
    targets = datamodule.targets[torch.from_numpy(rows)]
    if len(loaded.targets) != len(datamodule.targets) or not np.array_equal(
        np.asarray(loaded.targets)[rows], targets.numpy()
    ):
        warnings.warn("feature importance skipped: the table changed since training started", stacklevel=2)
        return None
    frame = loaded.features.iloc[rows].reset_index(drop=True)

    def to_tensor(raw: pd.DataFrame) -> Tensor:
        return torch.as_tensor(datamodule.preprocessor.transform(raw))

    measure, score = monitored_score(module, metric, mode)
    return measure, permutation_importance(module, to_tensor, frame, targets, score, repeats, seed)
