"""Which variant ships: the metric budget, its unit, the speed evidence, and the rule.

A variant's *drop* is how much worse its validation metric is than the uncompressed model's
(lower for mode=max metrics, higher for mode=min ones); a negative drop is a gain. The metric is
`compress.metric` when named; otherwise, for a classifier, its validation accuracy (or macro F1
when it logs no accuracy): a bounded score whose interval is informative, unlike a heavy-tailed
loss; otherwise `monitor.metric` (see gate_metric). Its unit follows the metric (`metric_unit: auto`):

- points for bounded scores (accuracy, precision, recall, F1, AUROC, R2, IoU, ...): a point is a
  hundredth, so accuracy 0.970 -> 0.962 is a drop of 0.8 points;
- percent for unbounded ones (losses, MSE, MAE, ...): a relative change, so a loss going from
  0.0651 to 0.0708 is a drop of 8.8%. Points of a loss would depend on the loss's scale.

`decision: upper_bound` ships a variant only when the upper end of its drop's paired bootstrap 95%
interval (compression/bootstrap.py) is within the budget: very likely no worse than the budget
allows, not merely measured so on this validation split. `decision: point` ships on the measured
drop. `decision: auto` (the default) is upper_bound for every variant that has an interval and
point for one that has none (a metric kiln cannot recompute per row). Only the validation split
decides: the test split is reported, never used. The bootstrap's seed is fixed, so the accuracy
side of the decision is the same on every export of the same run, whatever the machine's load.

Speed is evidence too (export/measure.py, paired_rounds): each candidate and the fp32 graph run
alternately, round after round, at each batch size; a round's ratio (fp32's time / the
candidate's) is its speed-up, and its 95% interval is the sign-test interval of the median ratio
(order statistics of the rounds: no resampling, the same rounds give the same interval).

- A fixed recipe ships its one variant (the user asked for it) if it passed its checks and is
  within the budget; otherwise nothing ships and the stage fails with the reason and the fix. Its
  speed-up is reported, whatever it is.
- `auto` with `objective: size` ships the smallest file among the variants that passed and are
  within the budget (the uncompressed fp32 one included).
- `auto` with `objective: latency` (the default) ships fp32 unless a candidate within the budget
  is *faster*: the lower end of its speed-up's interval at batch DECIDING_BATCH lies above 1, and
  at no batch size does the upper end lie below 1 (measured slower there). Among the faster ones,
  those whose median speed-up is within TIE of the highest median tie, and a tie goes to the
  smallest file (then the higher lower end, then the name). The interval keeps a busy machine
  from flipping the choice between fp32 and a candidate barely faster (the interval widens and
  fp32 ships). Between faster candidates the medians decide, not the intervals' ends: measured
  on the demo beside two busy loops, a median moved by a few percent from export to export while
  whether two intervals overlapped changed (a tie by overlap flipped 1 export in 5).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import KilnError

TIE = 0.10  # median speed-ups within 10% of the fastest's cannot be told apart in practice
DECIDING_BATCH = "256"
REFERENCE = "fp32"  # the uncompressed graph every candidate's speed is measured against
UNITS = ("auto", "points", "percent")
DECISIONS = ("auto", "point", "upper_bound")
OBJECTIVES = ("latency", "size")
# A metric is a bounded score when one word of its name (val/top1_acc, val/mean_iou) is one of these.
BOUNDED_WORDS = frozenset(
    {"acc", "accuracy", "precision", "recall", "f1", "fbeta", "auroc", "auc", "roc", "ap", "map", "r2"}
    | {"iou", "jaccard", "dice", "specificity", "sensitivity", "mcc", "kappa"}
)
CLASSIFIER_SCORES = ("acc", "accuracy", "f1")  # a classifier's gate when compress.metric is not named


def metric_unit(metric: str, unit: str = "auto") -> str:
    """`points` or `percent`: the unit of `metric`'s drop (`unit` other than auto: as given)."""
    if unit != "auto":
        return unit
    return "points" if is_bounded(metric) else "percent"


def is_bounded(metric: str) -> bool:
    words = re.split(r"[^a-z0-9]+", metric.rsplit("/", 1)[-1].lower())
    return bool(BOUNDED_WORDS.intersection(words))


def gate_metric(
    named: str | None, monitor: dict[str, str], task: str | None, logged: Collection[str]
) -> tuple[str, str]:
    """(metric, mode) the compression budget is held to: `compress.metric` when named (it must be
    logged on validation), a classifier's validation accuracy or F1, else the monitor."""
    if named:
        if named not in logged:
            raise KilnError(
                f"compress.metric={named}: the module's validation_step does not log it; it logs: "
                f"{', '.join(sorted(logged)) or 'nothing'}; name one of them, or compress.metric=null"
            )
        if named == monitor["metric"]:
            return named, monitor["mode"]
        return named, "max" if is_bounded(named) else "min"
    if is_bounded(monitor["metric"]) or task != "classification":
        return monitor["metric"], monitor["mode"]
    prefix = monitor["metric"].rsplit("/", 1)[0] + "/" if "/" in monitor["metric"] else ""
    for score in CLASSIFIER_SCORES:
        if prefix + score in logged:
            return prefix + score, "max"
    return monitor["metric"], monitor["mode"]


def metric_drop(baseline: Any, value: Any, mode: str, unit: str = "points") -> Any:
    """How much worse `value` is than `baseline` (positive: worse), in `unit`. Works on numbers
    and on numpy arrays of resampled values alike."""
    worse = np.subtract(baseline, value) if mode == "max" else np.subtract(value, baseline)
    # percent of a zero loss: any rise is enormous
    drop = worse / np.maximum(np.abs(baseline), 1e-12) * 100 if unit == "percent" else worse * 100
    return round(float(drop), 6) if np.ndim(drop) == 0 else drop


def describe_drop(drop: float, unit: str) -> str:
    return f"{drop:.2f} points" if unit == "points" else f"{drop:.2f}%"


def describe_speedup(variant: dict[str, Any], batch: str = DECIDING_BATCH) -> str:
    """`2.41x [2.30, 2.55] (95% interval, batch 256, 30 paired rounds)`, or why there is none."""
    speedup = (variant.get("speedup") or {}).get(batch)
    if not speedup:
        return f"no speed-up measured at batch {batch}"
    interval = speedup.get("ci95")
    rounds = f"batch {batch}, {speedup['rounds']} paired rounds"
    if not interval:
        return f"{speedup['median']:.2f}x (no interval: {rounds} are too few)"
    return f"{speedup['median']:.2f}x [{interval[0]:.2f}, {interval[1]:.2f}] (95% interval, {rounds})"


def describe_evidence(variant: dict[str, Any], metric: str, unit: str, decision: str) -> str:
    """The drop as judged: `val/acc drop 0.37 points, 95% interval [-0.74, 1.48]`."""
    interval = variant.get("drop_ci95")
    measured = f"{metric} drop {describe_drop(variant['val_drop'], unit)}"
    if interval and decision != "point":
        return f"{measured}, 95% interval [{interval[0]:.2f}, {interval[1]:.2f}]"
    return f"{measured} (measured; no interval)" if not interval else measured


@dataclass
class Choice:
    name: str | None
    reason: str
    verdicts: dict[str, str] = field(default_factory=dict)  # per variant: why it did or did not ship


def judged_drop(variant: dict[str, Any], decision: str) -> float | None:
    """The drop the rule compares with the budget: the interval's upper end (upper_bound, or auto
    where there is an interval), else the measured one; None for upper_bound without an interval."""
    interval = variant.get("drop_ci95")
    if decision == "upper_bound" or (decision == "auto" and interval):
        return None if not interval else float(interval[1])
    return float(variant["val_drop"])


def within_budget(variant: dict[str, Any], max_drop: float, decision: str = "auto") -> bool:
    drop = judged_drop(variant, decision)
    return bool(variant["passed"]) and drop is not None and drop <= max_drop + 1e-9


def over_budget(variant: dict[str, Any], max_drop: float, unit: str, decision: str) -> str:
    """Why a variant that passed its checks is not within the budget."""
    budget = f"compress.max_metric_drop={max_drop:g}"
    interval = variant.get("drop_ci95")
    if decision == "upper_bound" and not interval:
        why = variant.get("drop_ci95_reason") or "no interval"
        return f"decision=upper_bound needs a bootstrap interval, and there is none ({why})"
    if interval and decision != "point":
        return (
            f"the 95% interval of its drop reaches {describe_drop(interval[1], unit)} "
            f"(measured {describe_drop(variant['val_drop'], unit)}), over {budget}"
        )
    return f"it loses {describe_drop(variant['val_drop'], unit)} on the validation split, over {budget}"


def slower_at(variant: dict[str, Any]) -> list[str]:
    """Batch sizes where the candidate measured slower than the fp32 graph (its interval below 1)."""
    return [
        batch
        for batch, speedup in (variant.get("speedup") or {}).items()
        if speedup.get("ci95") and speedup["ci95"][1] < 1
    ]


def is_faster(variant: dict[str, Any]) -> bool:
    """Shown faster than the fp32 graph: the interval at DECIDING_BATCH above 1, slower nowhere."""
    speedup = (variant.get("speedup") or {}).get(DECIDING_BATCH) or {}
    interval = speedup.get("ci95")
    return bool(interval and interval[0] > 1) and not slower_at(variant)


def choose(
    variants: Sequence[dict[str, Any]],
    *,
    auto: bool,
    wanted: str | None,
    max_drop: float,
    unit: str = "points",
    decision: str = "auto",
    objective: str = "latency",
    metric: str = "the metric",
) -> Choice:
    """`variants`: dicts with name, passed, reason, val_drop, drop_ci95, size_bytes and (but the
    reference fp32) speedup[batch] = {median, ci95, rounds}. See the module's docstring."""
    if not auto:
        return choose_fixed(variants, wanted, max_drop, unit, decision, metric)
    eligible = [v for v in variants if within_budget(v, max_drop, decision)]
    if objective == "size":
        best = min(eligible, key=lambda v: (v["size_bytes"], v["name"]), default=None)
        reason = "the smallest file within the budget (compress.objective=size)"
    else:
        best, reason = fastest(eligible)
    verdicts = {v["name"]: verdict(v, best, max_drop, unit, decision, objective, metric) for v in variants}
    if best is None:
        return Choice(
            None, "no variant passed its checks within the budget: " + " ".join(verdicts.values()), verdicts
        )
    evidence = describe_evidence(best, metric, unit, decision)
    if best["name"] != REFERENCE:
        evidence = f"speed-up over the fp32 graph {describe_speedup(best)}; {evidence}"
    return Choice(best["name"], f"{reason}: {evidence}", verdicts)


def fastest(eligible: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """objective=latency: the candidate shown faster than fp32 (ties within TIE of the highest
    median speed-up go to the smallest file), else fp32 itself."""
    faster = [v for v in eligible if v["name"] != REFERENCE and is_faster(v)]
    if not faster:
        reference = next((v for v in eligible if v["name"] == REFERENCE), None)
        return reference, "no candidate within the budget was shown faster than the fp32 graph"
    top = max(median_speedup(v) for v in faster)
    tied = [v for v in faster if median_speedup(v) * (1 + TIE) >= top]
    best = min(tied, key=lambda v: (v["size_bytes"], -lower_speedup(v), v["name"]))
    if len(faster) == 1:
        return best, "the one candidate within the budget shown faster than the fp32 graph"
    if len(tied) == 1:  # a claim about medians: each one's interval is in the report
        return best, (
            f"the highest median speed-up, by over {TIE:.0%}, of {len(faster)} candidates within the "
            "budget shown faster than the fp32 graph"
        )
    return best, (
        f"the smallest file of {len(tied)} candidates whose median speed-ups lie within {TIE:.0%} "
        f"of the highest ({', '.join(v['name'] for v in tied)})"
    )


def median_speedup(variant: dict[str, Any]) -> float:
    return float(variant["speedup"][DECIDING_BATCH]["median"])


def lower_speedup(variant: dict[str, Any]) -> float:
    return float(variant["speedup"][DECIDING_BATCH]["ci95"][0])


def verdict(
    variant: dict[str, Any],
    best: dict[str, Any] | None,
    max_drop: float,
    unit: str,
    decision: str,
    objective: str,
    metric: str,
) -> str:
    """One sentence: why `variant` shipped or did not."""
    name = variant["name"]
    if not variant["passed"]:
        return f"{name} failed its check: {variant['reason']}."
    if not within_budget(variant, max_drop, decision):
        return f"{name} is over the budget: {over_budget(variant, max_drop, unit, decision)}."
    if best is not None and name == best["name"]:
        return f"{name} shipped."
    if objective == "size":
        return f"{name} is within the budget, but {best['name'] if best else 'another'} is a smaller file."
    if name == REFERENCE:
        return f"{name} is within the budget, and a candidate was shown faster."
    slower = sorted(slower_at(variant), key=lambda batch: batch != DECIDING_BATCH)  # the deciding one first
    if slower:
        return f"{name} measured slower than the fp32 graph: {describe_speedup(variant, slower[0])}."
    if not is_faster(variant):
        return (
            f"{name} was not shown faster than the fp32 graph: {describe_speedup(variant)}, "
            "an interval that does not lie above 1."
        )
    return f"{name} is faster ({describe_speedup(variant)}), but {best['name'] if best else 'another'} was chosen."


def choose_fixed(
    variants: Sequence[dict[str, Any]],
    wanted: str | None,
    max_drop: float,
    unit: str,
    decision: str,
    metric: str,
) -> Choice:
    """A fixed recipe: its one variant ships if it passed and is within the budget."""
    variant = next((v for v in variants if v["name"] == wanted), None)
    if variant is None:
        return Choice(None, f"variant {wanted} was not built")
    if not variant["passed"]:
        return Choice(None, f"variant {variant['name']} failed its check: {variant['reason']}")
    if not within_budget(variant, max_drop, decision):
        needed = judged_drop(variant, decision)
        fix = (
            f"raise compress.max_metric_drop to at least {needed:.2f}, or use compress=auto (it ships fp32 then)"
            if needed is not None
            else "set compress.decision=point, or use compress=auto"
        )
        return Choice(
            None, f"variant {variant['name']}: {over_budget(variant, max_drop, unit, decision)}; {fix}"
        )
    speed = (
        f"speed-up over the fp32 graph {describe_speedup(variant)}; " if variant["name"] != REFERENCE else ""
    )
    return Choice(
        variant["name"],
        f"the recipe's variant, within the budget: {speed}{describe_evidence(variant, metric, unit, decision)}",
    )
