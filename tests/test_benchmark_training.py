"""scripts/benchmark_training.py's memory figures: the sampler of a child's anonymous and
file-backed memory, and the data's cost over the baseline run (issue 23: peak RSS alone counts
the CUDA build's library pages as if the data cost them)."""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

from kilntest import script

MIB = 2**20


def benchmark() -> ModuleType:
    return script("benchmark_training")


def test_the_sampler_sees_a_childs_anonymous_memory_apart_from_its_file_backed_pages() -> None:
    bench = benchmark()
    # 256 MiB written (not calloc'd zero pages, which take no memory until touched), then held
    # until the parent closes the child's stdin
    holder = "import sys; b = b'x' * (256 << 20); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    sampler = bench.MemorySampler(child.pid)
    sampler.start()
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for _ in range(2):  # the second reading began after the allocation
            sampler.sampled.clear()
            assert sampler.sampled.wait(timeout=120)
    finally:
        child.communicate("")
    sampler.join(timeout=120)
    assert not sampler.is_alive(), "the sampler stops when its process has ended"
    assert 256 * MIB <= sampler.peak_anon < 320 * MIB
    assert 0 < sampler.peak_file < 64 * MIB  # the interpreter's own pages: no part of the bytes


def test_the_datas_cost_is_the_larger_difference_over_the_baseline() -> None:
    bench = benchmark()
    baseline = bench.Memory(rss=1099 * MIB, anon=552 * MIB, file=559 * MIB)
    # the 1M x 50 run measured here: the anonymous difference is the larger (539 against 407 MiB)
    assert bench.data_cost(bench.Memory(1506 * MIB, 1091 * MIB, 558 * MIB), baseline) == 539 * MIB
    # a spike the 10 ms sampling missed: the exact RSS difference counts
    assert bench.data_cost(bench.Memory(1700 * MIB, 700 * MIB, 560 * MIB), baseline) == 601 * MIB


def test_kiln_over_lightning_is_per_round_and_empty_when_lightning_was_skipped() -> None:
    """--skip-lightning, the quick paired measure against the hand loop, ended in a ValueError
    (zip of 3 kiln rounds with no Lightning rounds) after all its measurements."""
    bench = benchmark()
    assert bench.same_round_ratios([3.0, 4.0, 6.0], []) == []
    assert bench.same_round_ratios([3.0, 4.0, 6.0], [1.5, 1.0, 2.0]) == [2.0, 4.0, 3.0]
