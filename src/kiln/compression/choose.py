"""Which variant ships: the metric budget and the rule.

A metric *point* is a hundredth of the metric's unit: 1 point of accuracy is 0.01, 1 point of
a loss is 0.01 of that loss. A variant's drop is how much worse it is than the uncompressed model
(lower for mode=max metrics, higher for mode=min ones); a negative drop is a gain.

- A fixed recipe ships its one variant, if it passed its checks and its validation drop is within
  `max_metric_drop`; otherwise nothing ships and the stage fails with the reason.
- `auto` ships, among the variants that passed (the uncompressed fp32 model included), the
  fastest at batch 256 whose validation drop is within the budget. Latencies within `tie` (5%)
  of the fastest count as a tie, and a tie goes to the smallest file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TIE = 0.05


def metric_drop(baseline: float, value: float, mode: str) -> float:
    """Points lost against the baseline (positive: worse)."""
    return round(((baseline - value) if mode == "max" else (value - baseline)) * 100, 6)


@dataclass
class Choice:
    name: str | None
    reason: str


def within_budget(variant: dict[str, Any], max_drop: float) -> bool:
    return bool(variant["passed"]) and variant["val_drop"] <= max_drop + 1e-9


def choose(
    variants: Sequence[dict[str, Any]], *, auto: bool, wanted: str | None, max_drop: float, tie: float = TIE
) -> Choice:
    """`variants`: dicts with name, passed, reason, val_drop, latency_us['256'], size_bytes."""
    by_name = {v["name"]: v for v in variants}
    if not auto:
        variant = by_name[wanted] if wanted else None
        if variant is None:
            return Choice(None, f"variant {wanted} was not built")
        if not variant["passed"]:
            return Choice(None, f"variant {variant['name']} failed its check: {variant['reason']}")
        if not within_budget(variant, max_drop):
            return Choice(
                None,
                f"variant {variant['name']} loses {variant['val_drop']:.2f} points of the monitored metric on the "
                f"validation split, over compress.max_metric_drop={max_drop:g}",
            )
        return Choice(
            variant["name"], f"recipe's variant, within the budget ({variant['val_drop']:.2f} points)"
        )
    eligible = [v for v in variants if within_budget(v, max_drop)]
    if not eligible:
        failed = "; ".join(f"{v['name']}: {v['reason'] or 'over budget'}" for v in variants)
        return Choice(None, f"no variant passed its checks within the budget ({failed})")
    fastest = min(v["latency_us"]["256"] for v in eligible)
    tied = [v for v in eligible if v["latency_us"]["256"] <= fastest * (1 + tie)]
    best = min(tied, key=lambda v: (v["size_bytes"], v["latency_us"]["256"]))
    return Choice(
        best["name"],
        f"fastest at batch 256 within {max_drop:g} points ({best['latency_us']['256']:.0f} us, "
        f"{best['size_bytes']} bytes, drop {best['val_drop']:.2f} points)",
    )
