"""Inference speed of the shipped model against torch eager and onnxruntime fp32, in one process.

    .venv/bin/python scripts/benchmark_inference.py                 train, compress=auto, measure
    .venv/bin/python scripts/benchmark_inference.py --digits-run runs/train/<run> --penguins-run runs/train/<run>

For each experiment (penguins_mlp, then digits_cnn): train it (unless a run is given), make sure it
was compressed with `compress=auto` and exported (kiln compress), then measure at batch 256, warm,
the three models in turn, in blocks of repeated calls over several passes (the median of each):

  vs_torch     torch eager fp32 of checkpoints/best.ckpt / the shipped model.onnx in onnxruntime
  vs_ort_fp32  onnxruntime fp32 of the uncompressed model (export/fp32.onnx) / the shipped model,
               the median of paired rounds (the two alternately, as the export judges them), printed
               with its 95% interval
  size         the shipped file's size / the fp32 ONNX file's size
  drop         test accuracy of torch fp32 minus the shipped model's, in points (negative: a gain)

A table model's ONNX takes raw rows and does its preprocessing inside the graph; torch eager is
timed on already preprocessed features, so its ratio understates what the ONNX file saves.
  compress_export_s  wall seconds of compression and export after testing (report.json timings_s)
  train_s            wall seconds of the training itself (run.json fit_seconds), on the same machine

The last line printed is digits_cnn's: `vs_torch=R1 vs_ort_fp32=R2 size=R3 drop=D
compress_export_s=S1 train_s=S2`. Targets on digits_cnn: vs_torch >= 5, vs_ort_fp32 >= 2,
size <= 0.3, drop <= 1, compress_export_s < train_s / 2.

    .venv/bin/python scripts/benchmark_inference.py --images-run runs/train/<run>   the ResNet-18 part

`--images-run` (a run of `kiln train experiment=images_resnet`, trained with
`compress.keep_variants=true` so that export/fp32.onnx is there) prints, from its report.json, the
shipped variant, its speed-up over onnxruntime fp32 at batch 256 with the 95% interval, the upper
end of its validation accuracy drop's 95% interval, and compress_export_s against train_s; then
times the shipped model.onnx against export/fp32.onnx side by side (paired rounds at batch 256, as
the export does) and prints `shipped=NAME speedup_b256=X [LOW, HIGH] drop_upper=D
compress_export_s=S1 train_s=S2 ratio=S1/S2`. Targets: speed-up >= 3 with drop_upper <= 1 point,
ratio <= 0.3. scripts/benchmark_images.py --compression-run RUN prints the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KILN = [sys.executable, "-m", "kiln"]
PAIRED_ROUNDS = 30  # fp32 against the shipped graph, alternately
BATCH = 256


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--digits-run", type=Path, help="an existing digits_cnn run (skips training)")
    parser.add_argument("--penguins-run", type=Path, help="an existing penguins_mlp run (skips training)")
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds per model (median)")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads for torch and onnxruntime (0: their defaults)"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where new runs go (default: a temp dir)"
    )
    parser.add_argument("--images-run", type=Path, help="an images_resnet run: its delivery, measured alone")
    args = parser.parse_args()
    if args.images_run:
        print(describe_delivery(args.images_run, args.rounds))
        return 0
    output = args.output_dir or Path(tempfile.mkdtemp(prefix="kiln-benchmark-"))
    lines = []
    for experiment, given in (("penguins_mlp", args.penguins_run), ("digits_cnn", args.digits_run)):
        run = given or train(experiment, output)
        ensure_compressed(run)
        figures = measure(run, args.rounds, args.threads)
        print(f"{experiment}: run {run}", flush=True)
        print(
            f"  shipped {figures['shipped']}; batch {BATCH} median: torch eager {figures['torch_us']:.0f} us, "
            f"onnxruntime fp32 {figures['ort_fp32_us']:.0f} us, shipped {figures['shipped_us']:.0f} us; "
            f"files: fp32 {figures['fp32_bytes'] / 1024:.1f} KB, shipped {figures['shipped_bytes'] / 1024:.1f} KB; "
            f"test acc torch {figures['torch_acc']:.4f}, shipped {figures['shipped_acc']:.4f}",
            flush=True,
        )
        low, high = figures["vs_ort_fp32_ci"]
        interval = "no interval" if low is None else f"95% interval [{low:.2f}, {high:.2f}]"
        print(
            f"  shipped over onnxruntime fp32, paired: {figures['vs_ort_fp32']:.2f}x, {interval}, "
            f"{figures['vs_ort_fp32_rounds']} alternating rounds",
            flush=True,
        )
        lines.append(
            f"vs_torch={figures['vs_torch']:.2f} vs_ort_fp32={figures['vs_ort_fp32']:.2f} "
            f"size={figures['size']:.3f} drop={figures['drop']:.2f} "
            f"compress_export_s={figures['compress_export_s']:.1f} train_s={figures['train_s']:.1f}"
        )
        print(f"{experiment}: {lines[-1]}", flush=True)
    print(lines[-1])
    return 0


def train(experiment: str, output: Path) -> Path:
    base = output / experiment
    print(f"training {experiment} (runs in {base}) ...", flush=True)
    started = time.perf_counter()
    subprocess.run(
        [
            *KILN,
            "train",
            f"experiment={experiment}",
            "progress=lines",
            f"paths.output_dir={base}",
            "compress.keep_variants=true",
        ],  # measure() reads export/fp32.onnx
        cwd=output,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (run,) = [p for p in (base / "train").iterdir() if p.is_dir()]
    print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
    return run


def ensure_compressed(run: Path) -> None:
    """kiln train compresses and exports at its end (kiln.delivery.after_training); for a run
    trained with another recipe this runs kiln compress compress=auto."""
    report = run / "report.json"
    if (
        report.is_file()
        and json.loads(report.read_text()).get("recipe") == "auto"
        and (run / "model.onnx").is_file()
    ):
        return
    print(f"compressing {run.name} with compress=auto ...", flush=True)
    started = time.perf_counter()
    subprocess.run(
        [*KILN, "compress", f"run={run}", "compress=auto", "compress.keep_variants=true"],
        cwd=run.parent,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"  compressed and exported in {time.perf_counter() - started:.0f} s", flush=True)


def measure(run: Path, rounds: int, threads: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from kiln.export.feeds import array_feeds, specs_of, table_feeds, tile_rows
    from kiln.export.from_run import load_trained, open_run, raw_split, table_state
    from kiln.export.measure import paired_rounds, scores, speedup_interval

    if threads:
        torch.set_num_threads(threads)
    report = json.loads((run / "report.json").read_text())
    datamodule, module = load_trained(open_run(run))
    features, targets = datamodule.split_tensors("test")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    sessions = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in (("fp32", run / "export" / "fp32.onnx"), ("shipped", run / "model.onnx"))
    }
    specs = specs_of(sessions["shipped"].get_inputs())
    if table_state(datamodule) is not None:
        feeds = table_feeds(raw_split(datamodule, "test"), specs)
    else:
        feeds = array_feeds(features.numpy(), specs[0])
    batch_feeds = tile_rows(feeds, BATCH)
    reps = -(-BATCH // len(features))
    torch_batch = features.repeat(reps, *([1] * (features.dim() - 1)))[:BATCH].contiguous()

    calls = {
        "torch": lambda: module(torch_batch),
        "fp32": lambda: sessions["fp32"].run(None, batch_feeds),
        "shipped": lambda: sessions["shipped"].run(None, batch_feeds),
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    passes = 5
    with torch.inference_mode():
        # blocks, not call-by-call interleaving: onnxruntime's threads spin for a while after each
        # run and would steal the cores from torch's next call. Several passes spread any drift.
        for _ in range(passes):
            for name, call in calls.items():
                for _ in range(3):
                    call()
                for _ in range(max(1, rounds // passes)):
                    start = time.perf_counter()
                    call()
                    samples[name].append(time.perf_counter() - start)
        torch_logits = module(features).numpy()
    medians = {name: float(np.median(values)) * 1e6 for name, values in samples.items()}
    # fp32 against the shipped graph as kiln's export judges it: alternately, round after round,
    # so a passing burst of load cannot land on one of them only (blocks once read a 1.10x
    # variant as 0.67x on a quiet machine).
    # The export stops once its interval is decisive; a benchmark keeps going to PAIRED_ROUNDS.
    fp32_us: list[float] = []
    shipped_us: list[float] = []
    while len(fp32_us) < PAIRED_ROUNDS:
        more = paired_rounds(
            calls["fp32"], calls["shipped"], PAIRED_ROUNDS - len(fp32_us), budget_s=float("inf")
        )
        fp32_us += more[0]
        shipped_us += more[1]
    paired = speedup_interval(fp32_us, shipped_us)

    (shipped_logits,) = sessions["shipped"].run(["logits"], feeds)
    test = "test/acc"
    torch_acc = scores(datamodule.task, datamodule.class_names, torch_logits, targets.numpy(), "test")[test]
    shipped_acc = scores(datamodule.task, datamodule.class_names, shipped_logits, targets.numpy(), "test")[
        test
    ]
    fp32_bytes = (run / "export" / "fp32.onnx").stat().st_size
    shipped_bytes = (run / "model.onnx").stat().st_size
    record = json.loads((run / "run.json").read_text())
    timings = report.get("timings_s") or {}
    return {
        "compress_export_s": float(timings.get("compress_export", "nan")),
        "train_s": float(record.get("throughput", {}).get("fit_seconds") or "nan"),
        "shipped": report["shipped"],
        "torch_us": medians["torch"],
        "ort_fp32_us": medians["fp32"],
        "shipped_us": medians["shipped"],
        "vs_torch": medians["torch"] / medians["shipped"],
        "vs_ort_fp32": paired.median,
        "vs_ort_fp32_ci": [paired.low, paired.high],
        "vs_ort_fp32_rounds": paired.rounds,
        "fp32_bytes": fp32_bytes,
        "shipped_bytes": shipped_bytes,
        "size": shipped_bytes / fp32_bytes,
        "torch_acc": torch_acc,
        "shipped_acc": shipped_acc,
        "drop": (torch_acc - shipped_acc) * 100,
    }


def describe_delivery(run: Path, rounds: int = 30) -> str:
    """What the run's delivery shipped and cost (its report.json), and the shipped model timed
    against export/fp32.onnx at batch 256 here, in paired rounds: the line the script ends with."""
    report = json.loads((run / "report.json").read_text())
    shipped = next(v for v in report["variants"] if v["name"] == report["shipped"])
    timings = report.get("timings_s") or {}
    train = timings.get("train") or json.loads((run / "run.json").read_text())["throughput"]["fit_seconds"]
    delivery = float(timings["compress_export"])
    unit = "points" if report.get("metric_unit") == "points" else "%"
    drop_upper = (shipped.get("drop_ci95") or [None, shipped["val_drop"]])[1]
    print(
        f"{run.name}: shipped {shipped['name']} ({report['reason']})\n"
        f"  report: speed-up over fp32 at batch 256 {speed(shipped.get('speedup', {}).get('256'))}; "
        f"{report['gate']['metric']} drop upper end {drop_upper:.2f} {unit} "
        f"({shipped.get('val_rows')} validation rows); per variant: {timings.get('per_variant')}",
        flush=True,
    )
    measured = side_by_side(run, rounds)
    print(f"  timed here: shipped against export/fp32.onnx at batch {BATCH}: {speed(measured)}", flush=True)
    return (
        f"shipped={shipped['name']} speedup_b256={speed(measured, short=True)} drop_upper={drop_upper:.2f} "
        f"compress_export_s={delivery:.1f} train_s={float(train):.1f} ratio={delivery / float(train):.2f}"
    )


def speed(speedup: dict[str, Any] | None, short: bool = False) -> str:
    if not speedup:
        return "none (fp32 shipped)" if not short else "1"
    low, high = speedup.get("ci95") or (float("nan"), float("nan"))
    if short:
        return f"{speedup['median']:.2f}[{low:.2f},{high:.2f}]"
    return (
        f"{speedup['median']:.2f}x [{low:.2f}, {high:.2f}] (95% interval, {speedup['rounds']} paired rounds)"
    )


def side_by_side(run: Path, rounds: int) -> dict[str, Any] | None:
    """The shipped model.onnx against export/fp32.onnx at batch BATCH, alternately, in this process
    (kiln.export.measure.paired_rounds: the export's own way); None when fp32 shipped."""
    import functools

    import onnxruntime as ort

    from kiln.export import measure
    from kiln.export.feeds import tile_rows
    from kiln.export.from_run import load_trained, open_run
    from kiln.export.measure import timing_session
    from kiln.export.pipeline import ModelInputs

    fp32_file, shipped_file = run / "export" / "fp32.onnx", run / "model.onnx"
    if not fp32_file.is_file():
        raise SystemExit(f"{fp32_file} is missing: train with compress.keep_variants=true")
    if (
        ort.InferenceSession(str(shipped_file)).get_modelmeta().custom_metadata_map.get("kiln.variant")
        == "fp32"
    ):
        return None
    datamodule, module = load_trained(open_run(run))
    inputs = ModelInputs(datamodule, module)
    sessions = [timing_session(path, None) for path in (fp32_file, shipped_file)]
    calls = [functools.partial(s.run, None, tile_rows(dict(inputs.feeds(s)), BATCH)) for s in sessions]
    reference_us, shipped_us, _ = measure.paired_rounds(calls[0], calls[1], rounds, budget_s=60.0)
    return measure.speedup_interval(reference_us, shipped_us).as_dict()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
