"""Per-group test metrics: every test metric broken down by a categorical column of the table.

    kiln train experiment=penguins_mlp report.group_by=island

A model can be accurate overall and poor for one group (an island, a sex, a region). After the
best checkpoint is tested, its predictions on the test split are scored again for each value of
`report.group_by` (a raw column of the table, missing values as their own group), and the spread
of each metric across groups (best minus worst) is compared with `report.group_gap`: a metric
whose spread is larger is flagged, in run.json, in the summary and in TensorBoard. A group with
few test rows has noisy metrics: each group's row count is recorded beside them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.models.metrics import metric_collection
from kiln.training.importance import predict

MISSING_GROUP = "(missing)"
MAX_GROUPS = 50


def check_group_column(datamodule: Any, column: str) -> None:
    """Before training: the column must be one of the table's raw columns."""
    from kiln.data.table import TableDataModule

    if not isinstance(datamodule, TableDataModule):
        raise KilnError(
            f"report.group_by={column}: per-group metrics need a table (data=table); "
            f"{type(datamodule).__name__} has no columns to group by"
        )
    if column not in datamodule.raw_columns:
        raise KilnError(
            f"report.group_by={column}: no such column in the table; its columns: {', '.join(datamodule.raw_columns)}"
        )
    group_names(datamodule, column)  # too many groups is refused now, not after the whole fit


def group_names(datamodule: Any, column: str) -> tuple[np.ndarray, list[str]]:
    """Each test row's group (missing values as their own group) and the sorted group names."""
    from kiln.export.feeds import category_column

    assert datamodule.splits is not None
    raw = datamodule.load().features[column].to_numpy(dtype=object)[datamodule.splits.test]
    values = category_column(raw)
    values = np.where(values == "", MISSING_GROUP, values)
    names = sorted(set(values.tolist()))
    if len(names) > MAX_GROUPS:
        raise KilnError(
            f"report.group_by={column}: {len(names)} different values on the test split; group by a "
            f"column with at most {MAX_GROUPS} (a category, not a measurement)"
        )
    return values, names


def group_metrics(module: Any, datamodule: Any, column: str, gap: float) -> dict[str, Any]:
    """Test metrics per value of `column`, their spread, and the metrics whose spread exceeds `gap`."""
    values, names = group_names(datamodule, column)
    features, targets = datamodule.split_tensors("test")
    outputs = predict(module, features)
    task = datamodule.task
    scores = module._scores(outputs)  # what KilnModule's own test metrics see
    groups: dict[str, dict[str, Any]] = {}
    for name in names:
        mask = torch.from_numpy(values == name)
        metrics = metric_collection(task, len(datamodule.class_names), "test/")
        with warnings.catch_warnings():  # torchmetrics warns about a group lacking a class
            warnings.simplefilter("ignore")
            metrics.update(scores[mask], targets[mask])
            computed = {key: float(value) for key, value in metrics.compute().items()}
        if task == "classification" and len(torch.unique(targets[mask])) < len(datamodule.class_names):
            # AUROC of a class with no examples in the group is undefined (torchmetrics says 0)
            computed = {key: (math.nan if key.endswith("auroc") else v) for key, v in computed.items()}
        if hasattr(module, "loss_fn"):
            computed["test/loss"] = float(module.loss_fn(outputs[mask], targets[mask]))
        groups[name] = {
            "rows": int(mask.sum()),
            "metrics": {key: (v if math.isfinite(v) else None) for key, v in sorted(computed.items())},
        }
    spreads = {}
    for key in sorted({key for group in groups.values() for key in group["metrics"]}):
        finite = [g["metrics"][key] for g in groups.values() if g["metrics"].get(key) is not None]
        if len(finite) >= 2:
            spreads[key] = max(finite) - min(finite)
    return {
        "column": column,
        "gap_threshold": gap,
        "groups": groups,
        "spread": spreads,
        "flagged": [key for key, spread in spreads.items() if spread > gap],
    }


def log_group_metrics(writer: Any, result: dict[str, Any], step: int) -> None:
    """Scalars `test_by_<column>/<metric>/<group>` and a markdown table."""
    column = result["column"]
    metric_names = list(result["spread"])
    for name, group in result["groups"].items():
        for key, value in group["metrics"].items():
            if value is not None:
                writer.add_scalar(f"test_by_{column}/{key.split('/', 1)[-1]}/{name}", value, step)
    header = f"| {column} | rows | " + " | ".join(metric_names) + " |"
    lines = [header, "|" + "---|" * (len(metric_names) + 2)]
    for name, group in result["groups"].items():
        cells = [_cell(group["metrics"].get(key)) for key in metric_names]
        lines.append(f"| {name} | {group['rows']} | " + " | ".join(cells) + " |")
    lines.append("| spread | | " + " | ".join(f"{result['spread'][k]:.4f}" for k in metric_names) + " |")
    if result["flagged"]:
        lines.append(f"\nSpread above {result['gap_threshold']}: {', '.join(result['flagged'])}")
    writer.add_text(f"test_by_{column}", "\n".join(lines), step)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
