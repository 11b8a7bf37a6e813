"""measure.timed: warm calls, then repeats until they agree, the time budget is spent or `repeats`
is reached; never fewer than MIN_REPEATS. A fake clock makes each call take a chosen time."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest

from kiln.export import measure


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(measure, "time", fake)
    return fake


def calls_taking(clock: FakeClock, seconds: Iterable[float]):
    durations = iter(seconds)
    made = []

    def call() -> None:
        made.append(1)
        clock.now += next(durations)

    return call, made


def test_runs_that_agree_stop_at_the_minimum(clock: FakeClock):
    call, made = calls_taking(clock, itertools.repeat(0.001))
    samples = measure.timed(call, repeats=30)
    assert len(samples) == measure.MIN_REPEATS and samples == pytest.approx([1000.0] * 5)
    assert len(made) == measure.WARMUP + measure.MIN_REPEATS


def test_one_slow_run_among_agreeing_ones_does_not_keep_the_measurement_going(clock: FakeClock):
    call, _ = calls_taking(
        clock, [0.001] * measure.WARMUP + [0.001, 0.004, 0.001, 0.001, 0.001] + [0.001] * 50
    )
    samples = measure.timed(call, repeats=30)
    assert len(samples) == measure.MIN_REPEATS and max(samples) == pytest.approx(4000.0)


def test_runs_that_disagree_go_on_until_the_time_budget(clock: FakeClock):
    call, _ = calls_taking(clock, itertools.cycle([0.010, 0.020]))  # 50% apart: never tight
    samples = measure.timed(call, repeats=100, budget_s=0.3)
    # warm-up ends after 0.02 s (two calls); then runs until 0.3 s have passed: 20 runs of 15 ms average
    assert 19 <= len(samples) <= 21 and sum(samples) / 1e6 == pytest.approx(0.3, abs=0.021)


def test_repeats_caps_the_runs_and_a_slow_call_is_warmed_once(clock: FakeClock):
    call, made = calls_taking(clock, itertools.cycle([0.5, 0.9]))  # slow and noisy
    samples = measure.timed(call, repeats=7, budget_s=100.0)
    assert len(samples) == 7 and len(made) == 1 + 7  # one warm-up call: it took over WARMUP_BUDGET_S


def test_fewer_repeats_than_the_minimum_are_honoured(clock: FakeClock):
    call, _ = calls_taking(clock, itertools.repeat(0.001))
    assert len(measure.timed(call, repeats=2)) == 2
