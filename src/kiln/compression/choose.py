"""Which variant ships: the metric budget, its unit, and the rule.

A variant's *drop* is how much worse its validation metric is than the uncompressed model's
(lower for mode=max metrics, higher for mode=min ones); a negative drop is a gain. Its unit
follows the metric (`metric_unit: auto`):

- points for bounded scores (accuracy, precision, recall, F1, AUROC, R2, IoU, ...): a point is a
  hundredth, so accuracy 0.970 -> 0.962 is a drop of 0.8 points;
- percent for unbounded ones (losses, MSE, MAE, ...): a relative change, so a loss going from
  0.0651 to 0.0708 is a drop of 8.8%. Points of a loss would depend on the loss's scale.

`decision: point` ships on the measured drop; `decision: upper_bound` only when the upper end of
the drop's paired bootstrap 95% interval (compression/bootstrap.py) is within the budget, so a
variant ships when it is very likely no worse than the budget allows, not merely measured so on
this validation split. Only the validation split decides: the test split is reported, never used.

- A fixed recipe ships its one variant, if it passed its checks and is within the budget;
  otherwise nothing ships and the stage fails with the reason.
- `auto` ships, among the variants that passed and are within the budget (the uncompressed fp32
  model included), the fastest at batch 256. A variant ties with the fastest when its median is
  within the fastest variant's own run-to-run spread (that variant's median minus its quickest
  run: large on a busy machine, small on a quiet one) or within 5%, whichever is more: the repeats
  cannot tell them apart. A tie goes to the smallest file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TIE = 0.05
UNITS = ("auto", "points", "percent")
DECISIONS = ("point", "upper_bound")
# A metric is a bounded score when one word of its name (val/top1_acc, val/mean_iou) is one of these.
BOUNDED_WORDS = frozenset(
    {"acc", "accuracy", "precision", "recall", "f1", "fbeta", "auroc", "auc", "roc", "ap", "map", "r2"}
    | {"iou", "jaccard", "dice", "specificity", "sensitivity", "mcc", "kappa"}
)


def metric_unit(metric: str, unit: str = "auto") -> str:
    """`points` or `percent`: the unit of `metric`'s drop (`unit` other than auto: as given)."""
    if unit != "auto":
        return unit
    words = re.split(r"[^a-z0-9]+", metric.rsplit("/", 1)[-1].lower())
    return "points" if BOUNDED_WORDS.intersection(words) else "percent"


def metric_drop(baseline: Any, value: Any, mode: str, unit: str = "points") -> Any:
    """How much worse `value` is than `baseline` (positive: worse), in `unit`. Works on numbers
    and on numpy arrays of resampled values alike."""
    worse = np.subtract(baseline, value) if mode == "max" else np.subtract(value, baseline)
    # percent of a zero loss: any rise is enormous
    drop = worse / np.maximum(np.abs(baseline), 1e-12) * 100 if unit == "percent" else worse * 100
    return round(float(drop), 6) if np.ndim(drop) == 0 else drop


def describe_drop(drop: float, unit: str) -> str:
    return f"{drop:.2f} points" if unit == "points" else f"{drop:.2f}%"


@dataclass
class Choice:
    name: str | None
    reason: str


def judged_drop(variant: dict[str, Any], decision: str) -> float | None:
    """The drop the rule compares with the budget: the measured one, or the interval's upper end
    (None when there is no interval)."""
    if decision == "upper_bound":
        interval = variant.get("drop_ci95")
        return None if not interval else float(interval[1])
    return float(variant["val_drop"])


def within_budget(variant: dict[str, Any], max_drop: float, decision: str = "point") -> bool:
    drop = judged_drop(variant, decision)
    return bool(variant["passed"]) and drop is not None and drop <= max_drop + 1e-9


def over_budget(variant: dict[str, Any], max_drop: float, unit: str, decision: str) -> str:
    """Why a variant that passed its checks is not within the budget."""
    budget = f"compress.max_metric_drop={max_drop:g}"
    if decision == "upper_bound":
        interval = variant.get("drop_ci95")
        if not interval:
            why = variant.get("drop_ci95_reason") or "no interval"
            return f"decision=upper_bound needs a bootstrap interval, and there is none ({why})"
        return (
            f"the 95% interval of its drop reaches {describe_drop(interval[1], unit)} "
            f"(measured {describe_drop(variant['val_drop'], unit)}), over {budget}"
        )
    return f"it loses {describe_drop(variant['val_drop'], unit)} on the validation split, over {budget}"


def choose(
    variants: Sequence[dict[str, Any]],
    *,
    auto: bool,
    wanted: str | None,
    max_drop: float,
    unit: str = "points",
    decision: str = "point",
    tie: float = TIE,
) -> Choice:
    """`variants`: dicts with name, passed, reason, val_drop, drop_ci95, latency_us['256'],
    latency_spread_us['256'] ([min, median, max]) and size_bytes."""
    by_name = {v["name"]: v for v in variants}
    rule = "the upper end of its 95% interval" if decision == "upper_bound" else "its measured drop"
    if not auto:
        variant = by_name[wanted] if wanted else None
        if variant is None:
            return Choice(None, f"variant {wanted} was not built")
        if not variant["passed"]:
            return Choice(None, f"variant {variant['name']} failed its check: {variant['reason']}")
        if not within_budget(variant, max_drop, decision):
            return Choice(
                None, f"variant {variant['name']}: {over_budget(variant, max_drop, unit, decision)}"
            )
        return Choice(
            variant["name"],
            f"recipe's variant, {rule} within the budget ({describe_drop(judged_drop(variant, decision) or 0.0, unit)})",
        )
    eligible = [v for v in variants if within_budget(v, max_drop, decision)]
    if not eligible:
        failed = "; ".join(
            f"{v['name']}: {v['reason'] if not v['passed'] else over_budget(v, max_drop, unit, decision)}"
            for v in variants
        )
        return Choice(None, f"no variant passed its checks within the budget ({failed})")
    fastest = min(eligible, key=lambda v: v["latency_us"]["256"])
    tied = [v for v in eligible if ties(v, fastest, tie)]
    best = min(tied, key=lambda v: (v["size_bytes"], v["latency_us"]["256"]))
    return Choice(
        best["name"],
        f"fastest at batch 256 with {rule} within {describe_drop(max_drop, unit)} "
        f"({best['latency_us']['256']:.0f} us, {best['size_bytes']} bytes, "
        f"drop {describe_drop(best['val_drop'], unit)})",
    )


def ties(variant: dict[str, Any], fastest: dict[str, Any], tie: float = TIE) -> bool:
    """True when the latency repeats cannot tell `variant` from the fastest one: its median is
    within the fastest's run-to-run spread (median minus quickest run) or within `tie`."""
    best = fastest["latency_us"]["256"]
    spread = fastest.get("latency_spread_us", {}).get("256")
    noise = best - spread[0] if spread else 0.0
    return bool(variant["latency_us"]["256"] <= best + max(best * tie, noise))
