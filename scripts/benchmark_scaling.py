"""Data-parallel scaling on CPU: samples/s with 1 and 2 ranks, and what starting DDP costs.

    .venv/bin/python scripts/benchmark_scaling.py            # about 2 minutes on 2 CPU cores
    .venv/bin/python scripts/benchmark_scaling.py --rows 400000 --epochs 4

Each setting (`trainer=cpu`: one process; `trainer=ddp_cpu`: 2 ranks over gloo) runs the real
`kiln train` twice, for 1 and for 1 + --epochs epochs, on the same synthetic rows and MLP. From the
fit times in run.json:

    seconds per epoch  = (fit(1 + E epochs) - fit(1 epoch)) / E
    samples/s          = training rows / seconds per epoch
    start-up           = fit(1 epoch) - seconds per epoch   (launching ranks, process group, sanity check)

and the DDP start-up cost is the 2-rank start-up minus the 1-process one. Threads are left to
Lightning, which gives each of N ranks cpu_count / N (OMP_NUM_THREADS is unset for the children),
so both settings use the same cores. The last line printed is
`samples_per_s_1rank=A samples_per_s_2ranks=B speedup=B/A ddp_startup_s=C`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def train(work: Path, name: str, trainer: str, epochs: int, args: argparse.Namespace) -> tuple[float, int]:
    """Run `kiln train`; return its fit seconds and training rows (from run.json)."""
    output = work / name
    command = [
        sys.executable,
        "-m",
        "kiln",
        "train",
        f"trainer={trainer}",
        "data=synthetic",
        f"data.num_samples={args.rows}",
        f"data.num_features={args.features}",
        "model=mlp",
        f"model.net.hidden_sizes=[{args.hidden}]",
        f"data.batch_size={args.batch_size}",
        f"trainer.max_epochs={epochs}",
        "callbacks.early_stopping=null",
        "compress=none",
        "export.after_training=false",
        "progress=lines",
        f"paths.output_dir={output}",
    ]
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    (record,) = output.glob("train/*/run.json")
    throughput = json.loads(record.read_text())["throughput"]
    return float(throughput["fit_seconds"]), int(throughput["train_rows"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="extra epochs that time one epoch")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kiln-scaling-"))
    print(
        f"scaling: MLP {args.features}-{args.hidden.replace(',', '-')}, {args.rows} synthetic rows, batch {args.batch_size}"
    )
    figures: dict[str, dict[str, float]] = {}
    for label, trainer in (("1rank", "cpu"), ("2ranks", "ddp_cpu")):
        short, train_rows = train(work, f"{label}_short", trainer, 1, args)
        long, _ = train(work, f"{label}_long", trainer, 1 + args.epochs, args)
        epoch = (long - short) / args.epochs
        figures[label] = {"samples_per_s": train_rows / epoch, "startup_s": short - epoch}
        print(
            f"  {label:7s} (trainer={trainer}): {epoch:.2f} s/epoch, {train_rows / epoch:,.0f} samples/s, "
            f"start-up {short - epoch:.2f} s  (fit 1 epoch {short:.2f} s, {1 + args.epochs} epochs {long:.2f} s)",
            flush=True,
        )
    one, two = figures["1rank"], figures["2ranks"]
    print(
        f"samples_per_s_1rank={one['samples_per_s']:.0f} samples_per_s_2ranks={two['samples_per_s']:.0f} "
        f"speedup={two['samples_per_s'] / one['samples_per_s']:.2f} "
        f"ddp_startup_s={two['startup_s'] - one['startup_s']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
