"""How sure a variant's metric drop is: a paired bootstrap 95% interval on the validation rows.

The uncompressed model and each variant answer the same validation rows. One resample draws the
rows with replacement (a multinomial count per row), and the *same* counts weigh both models'
answers (paired: the rows' own difficulty cancels out); the drop is recomputed on each of
RESAMPLES resamples, and the interval is the 2.5th to 97.5th percentile of those drops.

kiln recomputes only metrics it can define from one row's output and target, under the names
kiln's own modules log (kiln.models.metrics): loss (cross-entropy of logits; squared error for
regression), acc, precision, recall, f1 and auroc (macro, one-vs-rest), mse, mae and r2. The
value recomputed on all rows must equal the one the module logged (to TOLERANCE) for both
models, or there is no interval and the reason says why: kiln never puts an interval around a
number it cannot reproduce (a user's own metric, a loss with label smoothing, a shuffled loader).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

RESAMPLES = 1000
TOLERANCE = 1e-3  # logged metrics are float32 means over batches; 6 decimals is too strict
MAX_CELLS = 20_000_000  # resamples x rows held at once (80 MB of float32); larger splits draw fewer
MAX_PAIRS = 4_000_000  # positive x negative rows per class for AUROC's pairwise form

Metric = Callable[[np.ndarray], np.ndarray]  # (resamples, rows) weights -> (resamples,) values


@dataclass
class Rows:
    """One model's answers on the validation split, in loader order: `outputs` (rows, classes)
    logits or (rows,) predictions, and the targets they were scored against."""

    outputs: np.ndarray
    targets: np.ndarray


@dataclass
class Interval:
    low: float | None
    high: float | None
    resamples: int
    reason: str = ""  # why there is no interval

    @property
    def known(self) -> bool:
        return self.low is not None and self.high is not None

    def as_list(self) -> list[float] | None:
        return [self.low, self.high] if self.known else None  # type: ignore[list-item]


def drop_interval(
    metric: str,
    task: str | None,
    mode: str,
    drop: Callable[[np.ndarray, np.ndarray], np.ndarray],
    baseline: Rows,
    variant: Rows,
    logged: tuple[float, float],
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> Interval:
    """The 95% interval of `drop(baseline_values, variant_values)` over paired resamples of the
    rows. `logged`: the values the module logged for (baseline, variant), to check against."""
    name = metric.rsplit("/", 1)[-1]
    if len(baseline.targets) == 0:
        return Interval(None, None, 0, "no validation rows were recorded")
    if baseline.outputs.shape != variant.outputs.shape or not np.array_equal(
        baseline.targets, variant.targets
    ):
        return Interval(
            None, None, 0, "the validation loader gave other rows or another order on the second pass"
        )
    baseline_metric = row_metric(name, task, baseline)
    variant_metric = row_metric(name, task, variant)
    if baseline_metric is None or variant_metric is None:
        return Interval(None, None, 0, f"kiln cannot recompute {metric} from a row's output and target")
    rows = len(baseline.targets)
    everything = np.ones((1, rows), dtype=np.float32)
    for values, which, model in (
        (baseline_metric, 0, "the uncompressed model"),
        (variant_metric, 1, "the variant"),
    ):
        recomputed = float(values(everything)[0])
        if not np.isfinite(recomputed) or abs(recomputed - logged[which]) > TOLERANCE * max(
            1.0, abs(logged[which])
        ):
            return Interval(
                None,
                None,
                0,
                f"{metric} recomputed from {model}'s rows is {recomputed:.6g}, the module logged "
                f"{logged[which]:.6g}: it is not kiln's definition",
            )
    draws = max(100, min(resamples, MAX_CELLS // rows))
    weights = np.random.default_rng(seed).multinomial(rows, np.full(rows, 1.0 / rows), size=draws)
    weights = weights.astype(np.float32)
    drops = drop(baseline_metric(weights), variant_metric(weights))
    drops = drops[np.isfinite(drops)]
    if len(drops) < draws // 2:
        return Interval(
            None, None, draws, f"{metric} is undefined on most resamples (too few rows of a class?)"
        )
    low, high = np.percentile(drops, [2.5, 97.5])
    return Interval(round(float(low), 4), round(float(high), 4), draws)


def row_metric(name: str, task: str | None, rows: Rows) -> Metric | None:
    """The metric `name` as a function of per-row weights (a resample), or None if kiln has no
    per-row definition of it for this task."""
    outputs, targets = rows.outputs.astype(np.float64), rows.targets
    if task == "classification" and outputs.ndim == 2 and outputs.shape[1] >= 2:
        return _classification(name, outputs, targets.astype(np.int64))
    if task == "regression":
        return _regression(name, outputs.reshape(len(outputs), -1)[:, 0], targets.astype(np.float64).ravel())
    return None


def _mean(per_row: np.ndarray) -> Metric:
    per_row = per_row.astype(np.float32)
    return lambda w: (w @ per_row) / w.sum(axis=1)


def _classification(name: str, logits: np.ndarray, targets: np.ndarray) -> Metric | None:
    classes = logits.shape[1]
    if targets.ndim != 1 or targets.min(initial=0) < 0 or targets.max(initial=0) >= classes:
        return None
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    predicted = logits.argmax(axis=1)
    if name == "loss":
        return _mean(-log_probs[np.arange(len(targets)), targets])
    if name in ("acc", "accuracy"):
        return _mean(predicted == targets)
    if name in ("precision", "recall", "f1"):
        truth = np.eye(classes, dtype=np.float32)[targets]
        guess = np.eye(classes, dtype=np.float32)[predicted]
        tp_rows, fp_rows, fn_rows = truth * guess, guess * (1 - truth), truth * (1 - guess)

        def macro(w: np.ndarray) -> np.ndarray:
            tp, fp, fn = w @ tp_rows, w @ fp_rows, w @ fn_rows
            top = {"precision": tp, "recall": tp, "f1": 2 * tp}[name]
            bottom = {"precision": tp + fp, "recall": tp + fn, "f1": 2 * tp + fp + fn}[name]
            with np.errstate(divide="ignore", invalid="ignore"):
                score = np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), 0.0)
            return score.mean(axis=1)  # torchmetrics' macro: every class counts, an absent one as 0

        return macro
    if name in ("auroc", "auc"):
        probabilities = np.exp(log_probs)
        return _macro_auroc(probabilities, targets, classes)
    return None


def _macro_auroc(probabilities: np.ndarray, targets: np.ndarray, classes: int) -> Metric | None:
    """One-vs-rest AUROC per class as a weighted pair count (a positive row scored above a
    negative one counts 1, a tie 1/2), averaged over the classes."""
    pairs = []
    for c in range(classes):
        positive, negative = targets == c, targets != c
        if positive.sum() * negative.sum() > MAX_PAIRS:
            return None
        if not positive.any() or not negative.any():
            return None  # torchmetrics gives such a class no defined AUROC either
        score_pos, score_neg = probabilities[positive, c], probabilities[negative, c]
        wins = (score_pos[:, None] > score_neg[None, :]) + 0.5 * (score_pos[:, None] == score_neg[None, :])
        pairs.append((positive, negative, wins.astype(np.float32)))

    def macro(w: np.ndarray) -> np.ndarray:
        per_class = []
        for positive, negative, wins in pairs:
            wp, wn = w[:, positive], w[:, negative]
            with np.errstate(divide="ignore", invalid="ignore"):
                per_class.append(np.einsum("bp,pn,bn->b", wp, wins, wn) / (wp.sum(axis=1) * wn.sum(axis=1)))
        return np.mean(per_class, axis=0)

    return macro


def _regression(name: str, predicted: np.ndarray, targets: np.ndarray) -> Metric | None:
    if len(predicted) != len(targets):
        return None
    error = predicted - targets
    if name in ("loss", "mse"):
        return _mean(error**2)
    if name == "mae":
        return _mean(np.abs(error))
    if name == "r2":
        squared, y, y2 = (error**2).astype(np.float64), targets, targets**2

        def r2(w: np.ndarray) -> np.ndarray:
            n = w.sum(axis=1)
            total = w @ y2 - (w @ y) ** 2 / n
            with np.errstate(divide="ignore", invalid="ignore"):
                return 1 - (w @ squared) / total

        return r2
    return None


def variant_drop_interval(
    metric: str,
    task: str | None,
    mode: str,
    unit: str,
    baseline_rows: Any,
    rows: Any,
    baseline: dict[str, Any],
    val_metrics: dict[str, float],
) -> Any:
    """The paired bootstrap 95% interval of a variant's validation drop from the rows two scorings
    recorded (kiln.export.scoring.RowRecorder), in the budget's unit."""
    from kiln.compression.choose import metric_drop

    paired = baseline_rows.rows(), rows.rows()
    if paired[0] is None or paired[1] is None:
        return Interval(
            None, None, 0, "the validation batches gave no target kiln could pair with each output"
        )
    return drop_interval(
        metric,
        task,
        mode,
        lambda base, value: metric_drop(base, value, mode, unit),
        Rows(*paired[0]),
        Rows(*paired[1]),
        (baseline["val_metrics"][metric], val_metrics[metric]),
    )
