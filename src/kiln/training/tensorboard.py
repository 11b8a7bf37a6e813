"""What kiln adds to TensorBoard once a run is tested: real final metrics in the hparams table
(no placeholder `hp_metric`); for classification a confusion matrix image, per-class PR curves
(TensorBoard's PR-curve plugin) and a ROC figure; for regression a residual plot; for tables the
permutation importance of each raw column (a text table and a bar chart)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys with values TensorBoard's hparams table can show."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_params(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:  # lists and nulls: shown as text
            flat[name] = str(value)
    return flat


def log_hparams(writer: Any, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """One hparams session whose metric columns are the run's real final metrics.

    The metrics must also exist as scalar tags of the run (they do: the test stage logged them).
    URL passwords in the values are masked.
    """
    from torch.utils.tensorboard.summary import hparams
    from torch.utils.tensorboard.writer import FileWriter

    from kiln.runs import mask_secrets

    experiment, session_start, session_end = hparams(mask_secrets(dict(params)), dict(metrics))
    # An event file of its own in the run's log directory (TensorBoard reads them all): the
    # writer's add_hparams would put the session in a subdirectory, away from the run's scalars.
    file_writer = FileWriter(writer.get_logdir())
    try:
        for summary in (experiment, session_start, session_end):
            file_writer.add_summary(summary)
    finally:
        file_writer.close()
    writer.flush()


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str]) -> Any:
    plt = _pyplot()
    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(
            column, row, str(count), ha="center", va="center", color="white" if count > threshold else "black"
        )
    axes.set_title("test split: confusion matrix")
    figure.tight_layout()
    return figure


def log_confusion_matrix(
    writer: Any, targets: np.ndarray, predictions: np.ndarray, class_names: Sequence[str], step: int
) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(targets, predictions, labels=list(range(len(class_names))))
    writer.add_figure("test/confusion_matrix", confusion_matrix_figure(matrix, class_names), global_step=step)
    writer.flush()
    return matrix


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def log_classification_curves(
    writer: Any, targets: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], step: int
) -> None:
    """One-vs-rest curves on the test split: a PR curve per class (`test/pr_curve/<class>`, in
    TensorBoard's PR-curves tab, which shows thresholds interactively) and all ROC curves in one
    image (`test/roc_curve`: TensorBoard has no ROC plugin)."""
    if not np.isfinite(probabilities).all():
        return  # NaN weights: the run is reported as diverged next, no curve would mean anything
    for index, name in enumerate(class_names):
        writer.add_pr_curve(
            f"test/pr_curve/{name}", targets == index, probabilities[:, index], global_step=step
        )
    writer.add_figure("test/roc_curve", roc_figure(targets, probabilities, class_names), global_step=step)
    writer.flush()


def roc_figure(targets: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> Any:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 5))
    for index, name in enumerate(class_names):
        positives = targets == index
        if positives.all() or not positives.any():  # ROC is undefined without both kinds of rows
            continue
        false_positive, true_positive, _ = roc_curve(positives, probabilities[:, index])
        auc = roc_auc_score(positives, probabilities[:, index])
        axes.plot(false_positive, true_positive, label=f"{name} (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)  # chance
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("test split: ROC, one class vs rest")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


def log_residuals(writer: Any, targets: np.ndarray, predictions: np.ndarray, step: int) -> None:
    """Predicted value against residual (target - predicted) on the test split: a good regressor
    leaves a structureless band around zero; a slope or a funnel shows bias or unequal errors."""
    plt = _pyplot()
    residuals = targets - predictions
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.scatter(predictions, residuals, s=10, alpha=0.6)
    axes.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("predicted")
    axes.set_ylabel("residual (target - predicted)")
    rmse = float(np.sqrt(np.mean(residuals**2))) if residuals.size else float("nan")
    axes.set_title(f"test split: residuals ({residuals.size} rows, RMSE {rmse:.4g})")
    figure.tight_layout()
    writer.add_figure("test/residuals", figure, global_step=step)
    writer.flush()


def log_feature_importance(
    writer: Any, importance: Sequence[Mapping[str, Any]], measure: str, step: int, top: int = 30
) -> None:
    """Every column in a text table (`val/feature_importance_table`), the `top` largest in a bar
    chart with one-std error bars (`val/feature_importance`). `measure` says what the numbers are,
    e.g. "rise in val/loss"."""
    rows = "\n".join(f"| {item['feature']} | {item['mean']:.4g} | {item['std']:.4g} |" for item in importance)
    writer.add_text(
        "val/feature_importance_table",
        f"Permutation importance on the validation split: the {measure} when a raw column is "
        f"shuffled\n\n| feature | mean | std |\n|---|---|---|\n{rows}",
        global_step=step,
    )
    shown = list(importance)[:top][::-1]  # barh draws bottom-up: the largest ends on top
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.5, max(2.5, 0.35 * len(shown) + 1.2)))
    axes.barh(
        [item["feature"] for item in shown],
        [item["mean"] for item in shown],
        xerr=[item["std"] for item in shown],
        color="tab:blue",
        capsize=3,
    )
    axes.axvline(0.0, color="grey", linewidth=1)
    axes.set_xlabel(f"{measure} when shuffled (mean, std)")
    more = f", top {top} of {len(importance)}" if len(importance) > top else ""
    axes.set_title(f"validation split: permutation importance{more}")
    figure.tight_layout()
    writer.add_figure("val/feature_importance", figure, global_step=step)
    writer.flush()
