"""Does one run, exported again and again on a busy machine, ship the same variant every time?

    .venv/bin/python scripts/decision_stability.py                        train the demo, then export it 5 times
    .venv/bin/python scripts/decision_stability.py --run runs/train/<run>  an existing run (compress=auto)

Trains `experiment=digits_cnn` with `compress.keep_variants=true` (unless --run is given), so every
export judges the very same compressed nets. Then exports it --exports times (5) in this process
(kiln.delivery.deliver: what `kiln export run=<run>` does), each time with --busy (2) CPU-heavy
processes beside it: busy loops this script starts before the export and stops after it (each
also ends by itself after --busy-max-s, so none outlives the script). One line per export: what
shipped and every candidate's speed-up over the fp32 graph at batch 256 with its 95% interval.
The last line: `same_choice=K/N shipped=<the most frequent choice> ...` (K: exports that shipped it).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BUSY_LOOP = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="a run compressed with compress=auto (skips training)")
    parser.add_argument("--exports", type=int, default=5, help="how many times to export it")
    parser.add_argument("--busy", type=int, default=2, help="CPU-heavy processes beside each export")
    parser.add_argument(
        "--busy-max-s", type=float, default=300.0, help="a busy process ends by itself after this"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where a new run goes (default: a temp dir)"
    )
    parser.add_argument("overrides", nargs="*", help="extra overrides for the training run")
    args = parser.parse_args()
    run = args.run or train(
        args.output_dir or Path(tempfile.mkdtemp(prefix="kiln-stability-")), args.overrides
    )
    choices = []
    for index in range(1, args.exports + 1):
        with busy_processes(args.busy, args.busy_max_s):
            report = export(run)
        choices.append(report["shipped"])
        seconds = report["timings_s"]["export_total"]
        print(
            f"export {index}/{args.exports}: shipped={report['shipped']} in {seconds:.1f} s; {speedups(report)}",
            flush=True,
        )
    shipped, count = collections.Counter(choices).most_common(1)[0]
    print(f"same_choice={count}/{args.exports} shipped={shipped} choices={','.join(map(str, choices))}")
    return 0


def train(output: Path, overrides: list[str]) -> Path:
    """The demo, trained with its variants kept (a re-export then judges the same nets)."""
    command = [
        sys.executable, "-m", "kiln", "train", "experiment=digits_cnn", "compress.keep_variants=true",
        "progress=lines", f"paths.output_dir={output}", *overrides,
    ]  # fmt: skip
    print("training:", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    (run,) = [path for path in (output / "train").iterdir() if path.is_dir()]
    return run


def export(run: Path) -> dict[str, Any]:
    """`kiln export run=<run>` in this process, with the run's own export settings."""
    from omegaconf import OmegaConf

    from kiln.delivery import deliver
    from kiln.export.pipeline import read_settings

    saved = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml").export, resolve=True)
    report: dict[str, Any] = deliver(run, None, read_settings(saved))  # type: ignore[arg-type]
    return report


@contextmanager
def busy_processes(count: int, max_seconds: float) -> Iterator[None]:
    """`count` busy loops beside the block, stopped (by their own pids) when it ends."""
    loops = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=max_seconds)]) for _ in range(count)
    ]
    try:
        yield
    finally:
        for loop in loops:
            loop.terminate()
        for loop in loops:
            loop.wait()


def speedups(report: dict[str, Any]) -> str:
    """`int8_static=0.81x[0.77,0.86] pruned=2.30x[2.10,2.52] ...` at the deciding batch size."""
    batch = report.get("deciding_batch", "256")
    parts = []
    for variant in report["variants"]:
        speedup = (variant.get("speedup") or {}).get(batch)
        if speedup:
            low, high = speedup["ci95"] or (float("nan"), float("nan"))
            parts.append(f"{variant['name']}={speedup['median']:.2f}x[{low:.2f},{high:.2f}]")
    return f"speed-ups at batch {batch}: " + " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
