"""Measuring a variant: metrics (the same definitions training logs), latency, size, parameters.

Latency is warm: untimed runs first (WARMUP, or fewer once WARMUP_BUDGET_S has passed: one run of
a slow call warms it), then up to `repeats` timed runs, in microseconds per call at each batch
size: the median, and the spread [min, median, max] that tells whether two variants differ at all.
A measurement stops early, after MIN_REPEATS runs, once the runs agree (their middle half, the
interquartile range, within TIGHT of the median: the median is known; one slow outlier does not
keep it going) or it has taken TIME_BUDGET_S (a noisy machine: more runs would not settle it).
Repeats were most of an export's time. onnxruntime and torch use their default thread pools
unless `threads` is given (one value for both, for a fair comparison).

A candidate's speed is measured against the fp32 graph, not alone (paired_rounds): the two run
alternately, round after round (fp32 first in odd rounds, the candidate first in even ones), so
both see the same machine state. A round of quick calls (under QUICK_CALL_S) alternates them
CALLS_PER_ROUND times and keeps each one's quickest call: a call of a millisecond that the
scheduler interrupts takes several, and on a busy machine that noise, not the graphs, would
otherwise decide. Each round's ratio is one paired observation of the speed-up,
and speedup_interval gives their median and its 95% interval (a sign-test interval: order
statistics of the ratios, exact for any distribution, and the same rounds give the same interval).
The rounds stop as soon as the interval is decisive (above 1: faster; below 1: slower), once the
minimum is in: MIN_ROUNDS of quick calls, MIN_SLOW_ROUNDS (the fewest that give a 95% interval)
of slow ones, where each round costs a ResNet's batch of 256 twice. More rounds would only narrow
an interval that already decides; they were most of an export's time.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.export.feeds import tile_rows

WARMUP = 3
WARMUP_BUDGET_S = 0.02
MIN_REPEATS = 5
MIN_SLOW_REPEATS = 3  # of calls over QUICK_CALL_S once the time budget is spent: a ResNet's batch
# of 256 in torch eager took 8 s a call on a busy machine, and that baseline is reported, not decided on
TIGHT = 0.1  # runs whose middle half lies within 10% of their median agree
TIME_BUDGET_S = 0.3  # per batch size and variant, once MIN_REPEATS runs are in
MIN_ROUNDS = 8  # paired rounds of quick calls at least (a round of them costs little)
MIN_SLOW_ROUNDS = 6  # of slow calls: fewer than 6 rounds give no 95% interval of the speed-up
PAIRED_BUDGET_S = 1.0  # per candidate and batch size, once MIN_ROUNDS rounds are in
CALLS_PER_ROUND = 3  # alternations per round for quick calls; each keeps its quickest
QUICK_CALL_S = 0.02  # slower calls are timed once a round (an interruption is a small part of them)


def scores(
    task: str, class_names: Sequence[str], outputs: np.ndarray, targets: np.ndarray, split: str
) -> dict[str, float]:
    """`split/loss`, `split/acc`, ... from logits (classification) or predicted values (regression)."""
    from kiln.models.metrics import metric_collection

    out = torch.as_tensor(np.asarray(outputs, dtype=np.float32))
    if task == "classification":
        target = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        loss = torch.nn.functional.cross_entropy(out, target)
        collection = metric_collection(task, len(class_names), f"{split}/")
        collection.update(out.softmax(dim=-1), target)
    else:
        target = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
        loss = torch.nn.functional.mse_loss(out, target)
        collection = metric_collection(task, 0, f"{split}/")
        collection.update(out, target)
    metrics = {name: float(value) for name, value in collection.compute().items()}
    metrics[f"{split}/loss"] = float(loss)
    return dict(sorted(metrics.items()))


def timed(call: Callable[[], Any], repeats: int, budget_s: float = TIME_BUDGET_S) -> list[float]:
    """Microseconds of up to `repeats` warm calls (at least MIN_REPEATS unless `repeats` is
    smaller; no more once they agree within TIGHT or `budget_s` has passed, and then
    MIN_SLOW_REPEATS are enough for calls slower than QUICK_CALL_S)."""
    started = time.perf_counter()
    for _ in range(WARMUP):
        call()
        if time.perf_counter() - started > WARMUP_BUDGET_S:
            break
    samples: list[float] = []
    started = time.perf_counter()
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e6)
        over_budget = time.perf_counter() - started > budget_s
        if len(samples) >= MIN_REPEATS and (agree(samples) or over_budget):
            break
        if len(samples) >= MIN_SLOW_REPEATS and over_budget and min(samples) > QUICK_CALL_S * 1e6:
            break
    return samples


def agree(samples: list[float]) -> bool:
    low, median, high = np.percentile(samples, [25, 50, 75])
    return bool(high - low <= TIGHT * median)


def paired_rounds(
    reference: Callable[[], Any],
    candidate: Callable[[], Any],
    rounds: int,
    budget_s: float = PAIRED_BUDGET_S,
) -> tuple[list[float], list[float], int]:
    """Microseconds of `reference` and `candidate` timed alternately: up to max(rounds, the
    minimum) rounds, fewer once the minimum is in and the speed-up's interval is decisive (shown
    faster or slower) or `budget_s` has passed; per round, each one's quickest of CALLS_PER_ROUND
    alternating calls (one call each, and a minimum of MIN_SLOW_ROUNDS, when either is slower
    than QUICK_CALL_S). Each is warmed first. The order flips every round, so neither always runs
    on a cache the other left. Returns both lists and the calls per round."""
    warm = max(timed_call(reference), timed_call(candidate))
    slow = warm > QUICK_CALL_S * 1e6
    calls, least = (1, MIN_SLOW_ROUNDS) if slow else (CALLS_PER_ROUND, MIN_ROUNDS)
    times: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    for index in range(max(rounds, least)):
        order = (0, 1) if index % 2 == 0 else (1, 0)
        quickest = [float("inf"), float("inf")]
        for _ in range(calls):
            for which in order:
                quickest[which] = min(quickest[which], timed_call((reference, candidate)[which]))
        times[0].append(quickest[0])
        times[1].append(quickest[1])
        if index + 1 >= least and (time.perf_counter() - started > budget_s or decisive(times[0], times[1])):
            break
    return times[0], times[1], calls


def decisive(reference_us: Sequence[float], candidate_us: Sequence[float]) -> bool:
    """The speed-up's 95% interval lies wholly above 1 or wholly below it."""
    speedup = speedup_interval(reference_us, candidate_us)
    return speedup.low is not None and speedup.high is not None and (speedup.low > 1 or speedup.high < 1)


def timed_call(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e6


@dataclass(frozen=True)
class Speedup:
    """The candidate's speed-up over the reference (reference time / candidate time, per round):
    the median of the rounds and its 95% interval (None when there are too few rounds)."""

    median: float
    low: float | None
    high: float | None
    rounds: int

    def as_dict(self) -> dict[str, Any]:
        interval = None if self.low is None or self.high is None else [self.low, self.high]
        return {"median": self.median, "ci95": interval, "rounds": self.rounds}


def speedup_interval(reference_us: Sequence[float], candidate_us: Sequence[float]) -> Speedup:
    """The median of the paired ratios and its distribution-free 95% interval: the k-th smallest
    and k-th largest ratio, k the largest with P(Binomial(n, 1/2) < k) <= 2.5%."""
    ratios = sorted(r / c for r, c in zip(reference_us, candidate_us, strict=True))
    n = len(ratios)
    median = round(float(np.median(ratios)), 3)
    k = sign_test_rank(n)
    if k == 0:
        return Speedup(median, None, None, n)
    return Speedup(median, round(float(ratios[k - 1]), 3), round(float(ratios[n - k]), 3), n)


def sign_test_rank(n: int, tail: float = 0.025) -> int:
    """The rank k of the order statistics that bound a median's 95% interval over n rounds; 0
    when n is too small for one (n < 6)."""
    k, below = 0, 0.0
    while k < n:
        below += math.comb(n, k) / 2**n  # P(X <= k)
        if below > tail:
            break
        k += 1
    return k


@dataclass
class Latency:
    """Per batch size (as a string key, for JSON): the median, and [min, median, max]."""

    median_us: dict[str, float] = field(default_factory=dict)
    spread_us: dict[str, list[float]] = field(default_factory=dict)
    repeats: dict[str, int] = field(default_factory=dict)

    def add(self, batch: int, samples: list[float]) -> None:
        median = round(float(np.median(samples)), 1)
        self.median_us[str(batch)] = median
        self.spread_us[str(batch)] = [round(min(samples), 1), median, round(max(samples), 1)]
        self.repeats[str(batch)] = len(samples)


def ort_latency(session: Any, feeds: dict[str, np.ndarray], batches: Sequence[int], repeats: int) -> Latency:
    latency = Latency()
    for batch in batches:
        batch_feeds = tile_rows(feeds, batch)
        latency.add(batch, timed(functools.partial(session.run, None, batch_feeds), repeats))
    return latency


def torch_latency(
    net: torch.nn.Module, features: torch.Tensor, batches: Sequence[int], repeats: int
) -> Latency:
    net.eval()
    latency = Latency()
    with torch.inference_mode():
        for batch in batches:
            reps = -(-batch // len(features))
            x = features.repeat(reps, *([1] * (features.dim() - 1)))[:batch].contiguous()
            latency.add(batch, timed(functools.partial(net, x), repeats))
    return latency


def torch_outputs(
    net: torch.nn.Module, features: torch.Tensor, task: str, batch_size: int = 1024
) -> np.ndarray:
    net.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            out = net(features[start : start + batch_size])
            parts.append((out.squeeze(-1) if task == "regression" else out).float().numpy())
    return np.concatenate(parts, axis=0) if parts else np.zeros((0,), dtype=np.float32)


class Threads:
    """Run with torch limited to `threads` (None: leave as is), and restore after."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.previous = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads:
            torch.set_num_threads(int(self.threads))

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)


class Stopwatch:
    """Wall seconds of the named parts of a stage, in the order they ran (report.json's timings_s):
    where compression and export spend their time, so it can be made shorter."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def seconds_per_variant(*parts: dict[str, float]) -> dict[str, float]:
    """Wall seconds spent on each variant, compression and export together: the sum of the
    Stopwatch parts named `<variant>: <what>` (`pruned0: fine-tune` is a pruning that candidates
    share). The parts of no one variant are left out: `baseline: ...`, and `latency: ...`, the
    paired rounds of every candidate together."""
    totals: dict[str, float] = {}
    for seconds in parts:
        for name, spent in seconds.items():
            variant, separator, _ = name.partition(": ")
            if separator and variant not in ("baseline", "latency"):
                totals[variant] = round(totals.get(variant, 0.0) + spent, 3)
    return totals


def timing_session(path: Path, threads: int | None) -> Any:
    """A session for paired timing: its idle threads do not spin. onnxruntime's workers spin for a
    while after each run by default; with two sessions alternating, the one that just ran would
    take CPU from the one being timed, and on a busy machine from the candidate more than fp32 or
    the other way round, depending on which ran last."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
