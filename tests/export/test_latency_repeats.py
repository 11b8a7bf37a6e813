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


def test_slow_calls_stop_at_three_runs_once_the_budget_is_spent(clock: FakeClock):
    call, made = calls_taking(clock, itertools.cycle([0.1, 0.2]))  # 100 ms apart: never tight
    samples = measure.timed(call, repeats=30, budget_s=0.3)
    assert len(samples) == measure.MIN_SLOW_REPEATS == 3 and len(made) == 1 + 3
    quick, _ = calls_taking(clock, itertools.cycle([0.010, 0.020]))  # under QUICK_CALL_S: the usual minimum
    assert len(measure.timed(quick, repeats=30, budget_s=0.01)) == measure.MIN_REPEATS


def test_fewer_repeats_than_the_minimum_are_honoured(clock: FakeClock):
    call, _ = calls_taking(clock, itertools.repeat(0.001))
    assert len(measure.timed(call, repeats=2)) == 2


def test_paired_rounds_alternate_the_two_calls_and_flip_the_order_every_round(clock: FakeClock):
    order: list[str] = []

    def taking(name: str, seconds: float):
        def call() -> None:
            order.append(name)
            clock.now += seconds

        return call

    reference, candidate, calls = measure.paired_rounds(
        taking("fp32", 0.002), taking("int8", 0.001), rounds=10
    )  # 2x faster every round: decisive, so it stops at the minimum
    assert calls == measure.CALLS_PER_ROUND
    assert order[:2] == ["fp32", "int8"]  # one warm-up call each
    # quick calls: three alternations a round, the order flipped every round
    rounds = [tuple(order[i : i + 6]) for i in range(2, len(order), 6)]
    assert rounds == [("fp32", "int8") * 3, ("int8", "fp32") * 3] * 4
    assert reference == pytest.approx([2000.0] * 8) and candidate == pytest.approx([1000.0] * 8)


def test_a_round_keeps_each_call_s_quickest_so_an_interrupted_call_does_not_count(clock: FakeClock):
    # fp32 takes 2 ms, int8 1 ms; the scheduler interrupts one call in three for 5 ms
    interrupted = itertools.cycle([0.0, 0.0, 0.005])

    def taking(seconds: float):
        def call() -> None:
            clock.now += seconds + next(interrupted)

        return call

    reference, candidate, _ = measure.paired_rounds(taking(0.002), taking(0.001), rounds=10)
    assert reference == pytest.approx([2000.0] * 8) and candidate == pytest.approx([1000.0] * 8)
    speedup = measure.speedup_interval(reference, candidate)
    assert speedup.as_dict() == {"median": 2.0, "ci95": [2.0, 2.0], "rounds": 8}


def test_paired_rounds_take_at_least_the_minimum_and_stop_at_the_time_budget(clock: FakeClock):
    def call() -> None:
        clock.now += 0.1  # slower than QUICK_CALL_S: one call each a round

    few, _, calls = measure.paired_rounds(call, call, rounds=3, budget_s=100.0)
    assert calls == 1
    assert len(few) == measure.MIN_SLOW_ROUNDS == 6  # an interval needs them, whatever latency_repeats says
    slow, _, _ = measure.paired_rounds(call, call, rounds=100, budget_s=1.0)
    assert len(slow) == measure.MIN_SLOW_ROUNDS  # 6 rounds of 0.2 s: past the budget at the minimum
    quick, _, _ = measure.paired_rounds(call, call, rounds=100, budget_s=2.5)
    assert len(quick) == 13  # the first round that ends past 2.5 s


def test_paired_rounds_stop_at_the_minimum_once_the_interval_is_decisive(clock: FakeClock):
    def taking(seconds: float):
        def call() -> None:
            clock.now += seconds

        return call

    _, candidate, _ = measure.paired_rounds(taking(0.001), taking(0.003), rounds=30, budget_s=100.0)
    assert len(candidate) == measure.MIN_ROUNDS  # 3x slower in every round: the interval is below 1
    reference, candidate, _ = measure.paired_rounds(taking(0.003), taking(0.001), rounds=30, budget_s=100.0)
    assert len(candidate) == measure.MIN_ROUNDS  # 3x faster in every round: above 1 already
    assert measure.speedup_interval(reference, candidate).as_dict()["ci95"] == [3.0, 3.0]
    # twice as fast in one round, half as fast in the next: no decision, so the rounds go on to the cap
    alternating = itertools.cycle([0.025, 0.1])
    _, candidate, _ = measure.paired_rounds(
        taking(0.05), lambda: setattr(clock, "now", clock.now + next(alternating)), rounds=30, budget_s=100.0
    )
    assert len(candidate) == 30


def test_the_speedup_interval_is_the_sign_test_interval_of_the_median_ratio():
    # ratios 1.0, 1.1, ..., 2.9 (20 rounds): the 95% interval is the 6th to the 15th smallest
    reference = [1000.0 + 100.0 * i for i in range(20)]
    candidate = [1000.0] * 20
    speedup = measure.speedup_interval(reference[::-1], candidate)
    assert speedup.as_dict() == {"median": 1.95, "ci95": [1.5, 2.4], "rounds": 20}
    assert [measure.sign_test_rank(n) for n in (5, 6, 8, 20, 30)] == [0, 1, 1, 6, 10]
    assert measure.speedup_interval([2.0] * 5, [1.0] * 5).as_dict() == {
        "median": 2.0,
        "ci95": None,
        "rounds": 5,
    }
