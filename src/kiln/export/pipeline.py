"""Export as a library: every compressed variant to one verified, measured ONNX file; the chosen
one ships as model.onnx.

    export(run, module, datamodule, manifest, settings)  ->  <run>/export/, report.*, model.onnx

For each variant of <run>/compress/manifest.json:
  assemble   the net plus the raw-row table preprocessing (kiln's tables) and a head, metadata
  score      the module's own validation_step and test_step over the datamodule's own loaders,
             with its forward served by the variant's ONNX net (export/scoring.py)
  check      fp32: parity with PyTorch within export.atol on real inputs; every variant: onnx.checker
  measure    file size, parameters
then time every candidate against the fp32 graph in paired rounds at batch 1 and 256 (its speed-up
and the speed-up's 95% interval, export/measure.py), choose on the validation split and that
evidence (compression/choose.py), swap <run>/export/ in whole, write the report, ship model.onnx. If the chosen variant fails a check or the metric budget, nothing
is written as model.onnx and a KilnError says why.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import kiln
from kiln.compression.choose import DECIDING_BATCH
from kiln.errors import KilnError
from kiln.runs import RunLayout

if TYPE_CHECKING:
    from kiln.export.scoring import RowRecorder

BATCHES = (1, 256)
PARITY_ROWS = 512  # inputs from the test loader compared with PyTorch and used for latency
EMBEDDING_IMAGES = 1000  # training images the shipped model embeds for its drift baseline


@dataclass(frozen=True)
class ExportSettings:
    opset: int = 20
    exporter: str = "auto"
    atol: float = 1e-4
    latency_repeats: int = 30
    threads: int | None = None
    after_training: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> ExportSettings:
        """The `export:` node of a composed config, checked (read_settings): what a stage hands down."""
        from kiln.builder import plain

        return read_settings(plain(cfg.get("export")))


def read_settings(config: dict[str, Any] | None) -> ExportSettings:
    config = dict(config or {})
    known = ExportSettings.__dataclass_fields__
    for key in config:
        if key not in known:
            raise KilnError(f"export.{key}: no such export setting; settings: {', '.join(known)}")
    settings = ExportSettings(**config)
    if not isinstance(settings.opset, int) or not 18 <= settings.opset <= 21:
        raise KilnError(
            f"export.opset={settings.opset}: use an opset from 18 to 21 (string one-hot needs 19+ for tables)"
        )
    from kiln.export.onnx_export import check_exporter

    check_exporter(settings.exporter)
    if not isinstance(settings.atol, int | float) or settings.atol <= 0:
        raise KilnError(f"export.atol={settings.atol}: must be > 0, e.g. 1e-4")
    if not isinstance(settings.latency_repeats, int) or settings.latency_repeats < 1:
        raise KilnError(f"export.latency_repeats={settings.latency_repeats}: must be an integer >= 1")
    if settings.threads is not None and (not isinstance(settings.threads, int) or settings.threads < 1):
        raise KilnError(
            f"export.threads={settings.threads}: must be null (library default) or an integer >= 1"
        )
    return settings


@dataclass
class Model:
    """What the exported graph is about: its task, classes, input and the graph's answer."""

    task: str | None  # classification, regression, or None: the raw output, no head
    class_names: list[str]
    input_shape: list[int] | dict[str, list[int]]  # per input name, for several inputs

    @property
    def output(self) -> str:
        from kiln.export.graphs import LOGITS, OUTPUT, PREDICTION

        return {"classification": LOGITS, "regression": PREDICTION}.get(self.task or "", OUTPUT)


def export(
    run: Any,
    module: Any,
    datamodule: Any,
    manifest: dict[str, Any],
    settings: ExportSettings,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export, check, score and measure every variant of `manifest`; ship the chosen one.
    `run` is the kiln.runs.RunDirectory of the trained run."""
    from kiln import contract
    from kiln.export import measure

    started = time.perf_counter()
    watch = measure.Stopwatch()
    target = contract.export_module(module)
    inputs = ModelInputs(datamodule, module)
    model = describe_model(module, datamodule, manifest, inputs)
    with measure.Threads(settings.threads):
        reference = score_baseline(run, module, target, datamodule, inputs, model, manifest, settings, watch)
        work = Work(run, module, target, datamodule, inputs, model, manifest, settings, watch)
        variants, choice, embedding = export_every_variant(work, reference, say)
    report = build_report(work, reference, variants, choice, embedding, time.perf_counter() - started)
    ship(run.layout, report, choice)
    compress_seconds = report["timings_s"]["compress_total"]
    say(summary(report, run.directory, compress_seconds + report["timings_s"]["export_total"]))
    return report


@dataclass(frozen=True)
class Work:
    """What every step of one export works on: the run, the module and its data, the settings."""

    run: Any  # kiln.runs.RunDirectory
    module: Any
    target: Any  # the part exported (kiln.contract.export_module)
    datamodule: Any
    inputs: ModelInputs
    model: Model
    manifest: dict[str, Any]
    settings: ExportSettings
    watch: Any  # kiln.export.measure.Stopwatch


def describe_model(module: Any, datamodule: Any, manifest: dict[str, Any], inputs: ModelInputs) -> Model:
    from kiln import contract

    model = Model(
        task=contract.task(datamodule, module),
        class_names=contract.class_names(datamodule, module) or [],
        input_shape=manifest.get("input_shape") or inputs.input_shape,
    )
    if model.task == "classification" and not model.class_names:
        model.task = None  # no names to answer with: the graph gives its raw output
    return model


def score_baseline(
    run: Any,
    module: Any,
    target: Any,
    datamodule: Any,
    inputs: ModelInputs,
    model: Model,
    manifest: dict[str, Any],
    settings: ExportSettings,
    watch: Any,
) -> Reference:
    """The torch fp32 model scored by its own steps and timed: what every variant is held to."""
    from kiln.export.scoring import RowRecorder, evaluate, evaluation_trainer

    with watch.part("baseline: score torch fp32"):
        trainer = evaluation_trainer()  # one for every scoring pass of this export
        baseline_rows = RowRecorder(target)
        val_metrics = evaluate(module, datamodule, "val", baseline_rows, trainer)
        test_metrics = dict(run.record.get("test_metrics") or {}) or evaluate(
            module, datamodule, "test", trainer=trainer
        )
    with watch.part("baseline: latency"):
        latency = torch_latency(target, inputs.torch_features(), settings.latency_repeats)
    baseline = {
        "name": "torch_fp32",
        "val_metrics": val_metrics,
        "test_metrics": test_metrics,
        "params": sum(p.numel() for p in target.parameters()),
        "size_bytes": run.require_best_checkpoint().stat().st_size,
        "latency_us": latency.median_us,
        "latency_spread_us": latency.spread_us,
        "latency_runs": latency.repeats,
        "note": f"torch eager fp32 of {run.layout.relative(run.layout.best_checkpoint)} "
        "(size: the .ckpt file, optimizer state included)",
    }
    monitor = manifest["monitor"]
    if monitor["metric"] not in val_metrics:
        raise KilnError(
            f"monitor.metric={monitor['metric']}: the module's validation_step did not log it when "
            f"scoring the variants; it logged: {', '.join(val_metrics) or 'nothing'}"
        )
    return Reference(baseline, baseline_rows, Gate.of(manifest, model.task, val_metrics), trainer)


def export_every_variant(
    work: Work, reference: Reference, say: Callable[[str], None]
) -> tuple[list[dict[str, Any]], Any, dict[str, Any] | None]:
    """Every variant written to a staging folder, measured, the choice made; the folder then
    replaces <run>/export/ in whole (a failure leaves the previous export as it was)."""
    from kiln.compression.choose import choose
    from kiln.runs import swap_in

    layout, manifest, gate = work.run.layout, work.manifest, reference.gate
    remove_abandoned_staging(layout.root)
    staging = staging_folder(layout, os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        variants = [export_variant(work, entry, reference, staging) for entry in manifest["variants"]]
        with work.watch.part("latency: candidates paired with fp32"):
            measure_speed(variants, staging, work.inputs, work.settings)
        test_metric = "test/" + gate.metric.split("/", 1)[-1]
        for variant in variants:
            say(describe(variant, gate.metric, test_metric, gate.unit))
        choice = choose(
            variants,
            auto=manifest["recipe"] == "auto",
            wanted=manifest.get("wanted"),
            max_drop=gate.max_drop,
            unit=gate.unit,
            decision=gate.decision,
            objective=gate.objective,
            metric=gate.metric,
        )
        with work.watch.part("embedding drift baseline"):
            image = work.inputs.image
            embedding = (
                add_embedding_baseline(staging / f"{choice.name}.onnx", work.datamodule, image, work.settings)
                if choice.name and image is not None
                else None
            )
        swap_in(staging, layout.export)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return variants, choice, embedding


def build_report(
    work: Work,
    reference: Reference,
    variants: list[dict[str, Any]],
    choice: Any,
    embedding: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    from kiln.compression.int8_search import cpu_instruction_set

    run, manifest, gate, settings = work.run, work.manifest, reference.gate, work.settings
    return {
        "run": str(run.directory),
        "recipe": manifest["recipe"],
        "monitor": manifest["monitor"],
        "gate": {"metric": gate.metric, "mode": gate.mode},
        "max_metric_drop": gate.max_drop,
        "metric_unit": gate.unit,
        "decision": gate.decision,
        "objective": gate.objective,
        "deciding_batch": DECIDING_BATCH,
        "shipped": choice.name,
        "model": run.layout.relative(run.layout.model) if choice.name else None,
        "status": "passed" if choice.name else "failed",
        "reason": choice.reason,
        "verdicts": choice.verdicts,
        "decided_on": "validation split (test metrics are reported, never used to choose)",
        "kiln_version": kiln.__version__,
        "config_hash": run.config_hash,
        "opset": manifest["opset"],
        "cpu": cpu_instruction_set(),  # int8 accuracy and speed depend on it (compression/int8_search.py)
        "latency_repeats": settings.latency_repeats,
        "threads": settings.threads,
        "baseline": reference.baseline,
        "variants": variants,
        "abandoned": manifest.get("abandoned", []),  # candidates given up on while compressing (no net)
        **({"drift_embedding": embedding} if embedding else {}),
        "seconds": round(seconds, 1),
        "timings_s": timings(manifest, work.watch.seconds, round(seconds, 1), run.record),
    }


def timings(
    manifest: dict[str, Any], export_parts: dict[str, float], export_seconds: float, record: Any
) -> dict[str, Any]:
    """Where compression's and export's seconds went, beside the training's fit."""
    from kiln.export import measure

    compress_seconds = float(manifest.get("seconds") or 0.0)
    return {
        "compress": manifest.get("timings_s", {}),
        "export": export_parts,
        "compress_total": compress_seconds,
        "export_total": export_seconds,
        "compress_export": round(compress_seconds + export_seconds, 1),
        # the training's fit (run.json throughput): what compression's cost is measured against
        "train": (record.get("throughput") or {}).get("fit_seconds"),
        "per_variant": measure.seconds_per_variant(manifest.get("timings_s", {}), export_parts),
    }


def ship(layout: RunLayout, report: dict[str, Any], choice: Any) -> None:
    """model.onnx and the report that describes it, replaced together; a KilnError when no
    variant passed (the report says why)."""
    from kiln.export.report import log_tensorboard, write_report
    from kiln.interrupts import held
    from kiln.runs import copy_atomically

    with held():
        if choice.name:
            copy_atomically(layout.exported(choice.name), layout.model)
        write_report(layout.root, report)
    try:
        log_tensorboard(layout.root, report)
    except Exception as exc:  # the report files are the record; TensorBoard is a view of them
        print(f"kiln export: warning: TensorBoard not updated ({type(exc).__name__}: {exc})", file=sys.stderr)
    if not choice.name:
        raise KilnError(f"no model shipped: {choice.reason}; see {layout.report_markdown}")


def summary(report: dict[str, Any], directory: Path, seconds: float) -> str:
    """What shipped and why, every number labelled (split, unit, interval, batch size, runs)."""
    metric = report["gate"]["metric"]
    test_metric = "test/" + metric.split("/", 1)[-1]
    layout = RunLayout(directory)
    shipped = next(v for v in report["variants"] if v["name"] == report["shipped"])
    fp32 = next(v for v in report["variants"] if v["name"] == "fp32")
    baseline = report["baseline"]
    batch = DECIDING_BATCH
    return (
        f"shipped {shipped['name']} as {layout.model}: {report['reason']}\n"
        f"  validation {metric}={_fmt(shipped['val_metrics'].get(metric))} "
        f"(torch fp32 {_fmt(baseline['val_metrics'].get(metric))}, {shipped.get('val_rows', '?')} rows)  "
        f"test {test_metric}={_fmt(shipped['test_metrics'].get(test_metric))}  "
        f"file {shipped['size_bytes'] / 1024:.1f} KB (fp32 graph {fp32['size_bytes'] / 1024:.1f} KB)\n"
        f"  onnxruntime latency at batch {batch}: median {shipped['latency_us'][batch]:.0f} us of "
        f"{shipped['latency_runs'][batch]} {runs(shipped, batch)} (fp32 graph {fp32['latency_us'][batch]:.0f} us; "
        f"torch eager {baseline['latency_us'][batch]:.0f} us of {baseline['latency_runs'][batch]} runs)\n"
        f"  compress + export {seconds:.1f} s{against_training(report, seconds)}; report: {layout.report_markdown}"
    )


def against_training(report: dict[str, Any], seconds: float) -> str:
    """` (0.25x the training's fit of 64.0 s)`: what the delivery cost beside the training."""
    train = (report.get("timings_s") or {}).get("train")
    return f" ({seconds / train:.2f}x the training's fit of {train:.1f} s)" if train else ""


@dataclass(frozen=True)
class Gate:
    """The budget a variant's validation drop is held to, and how (kiln.compression.choose)."""

    metric: str  # compress.metric, a classifier's val accuracy, or the monitor (choose.gate_metric)
    mode: str  # max or min
    max_drop: float
    unit: str  # points or percent
    decision: str  # auto, point or upper_bound
    objective: str  # latency or size

    @classmethod
    def of(cls, manifest: dict[str, Any], task: str | None, logged: dict[str, float]) -> Gate:
        from kiln.compression.choose import gate_metric, metric_unit

        metric, mode = gate_metric(manifest.get("metric"), manifest["monitor"], task, logged)
        return cls(
            metric,
            mode,
            float(manifest["max_metric_drop"]),
            metric_unit(metric, manifest.get("metric_unit", "auto")),
            manifest.get("decision", "auto"),
            manifest.get("objective", "latency"),
        )


@dataclass
class Reference:
    """What every variant is compared with: the torch fp32 model's metrics and validation rows,
    the gate, and the Trainer that scored the baseline (and scores each variant the same way)."""

    baseline: dict[str, Any]
    rows: RowRecorder
    gate: Gate
    trainer: Any


def staging_folder(layout: RunLayout, pid: int | str) -> Path:
    """Where an export in process `pid` writes before it replaces export/ in whole."""
    return layout.root / f".{layout.export.name}.tmp-{pid}"


def remove_abandoned_staging(directory: Path) -> None:
    """Delete the `.export.tmp-<pid>` folders of exports that were killed (their process is gone,
    so their own clean-up never ran); a live process's folder is an export in progress."""
    if os.name != "posix":  # os.kill(pid, 0) tests for a process only on POSIX (Windows ends it)
        return
    for staging in directory.glob(staging_folder(RunLayout(directory), "*").name):
        pid = staging.name.rsplit("-", 1)[1]
        if not (pid.isascii() and pid.isdigit()) or int(pid) == 0:
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except (PermissionError, OverflowError):  # another user's live process; not a pid
            continue


def export_variant(work: Work, entry: dict[str, Any], reference: Reference, staging: Path) -> dict[str, Any]:
    """One variant: the deployable file, checked, scored by the module's own steps, measured."""
    from kiln.compression.bootstrap import variant_drop_interval
    from kiln.compression.choose import metric_drop

    name, gate, baseline = entry["name"], reference.gate, reference.baseline
    test_metric = "test/" + gate.metric.split("/", 1)[-1]
    net_path = work.run.layout.compress / entry["net_onnx"]
    val_metrics, test_metrics, rows = score_variant(work, name, net_path, reference.trainer)
    with work.watch.part(f"{name}: bootstrap"):
        interval = variant_drop_interval(
            gate.metric, work.model.task, gate.mode, gate.unit, reference.rows, rows, baseline, val_metrics
        )
    with work.watch.part(f"{name}: assemble and check"):
        path, session = assemble_variant(work, name, net_path, val_metrics, test_metrics, staging)
    val_drop = metric_drop(
        baseline["val_metrics"][gate.metric], val_metrics[gate.metric], gate.mode, gate.unit
    )
    variant: dict[str, Any] = {
        "name": name,
        "steps": entry["steps"],
        "precision": entry["precision"],
        "file": work.run.layout.relative(work.run.layout.exported(name)),
        "size_bytes": path.stat().st_size,
        "params": entry["params"],
        "nonzero_params": entry.get("nonzero_params"),
        **{key: entry[key] for key in ("exporter", "exporter_fallback", "int8_search") if key in entry},
        "val_metrics": val_metrics,
        "test_metrics": test_metrics,
        "val_drop": val_drop,
        "drop_ci95": interval.as_list(),
        **({"drop_ci95_reason": interval.reason} if interval.reason else {}),
        "drop_unit": gate.unit,
        "val_rows": validation_rows(rows),
        "test_drop": _drop(
            baseline["test_metrics"].get(test_metric), test_metrics.get(test_metric), gate.mode, gate.unit
        ),
        "notes": entry.get("notes", []),
    }
    variant.update(check_variant(work, entry, session, gate, val_drop))
    return variant


def score_variant(
    work: Work, name: str, net_path: Path, trainer: Any
) -> tuple[dict[str, float], dict[str, float], RowRecorder]:
    """The module's own validation_step and test_step, its net served by onnxruntime."""
    from kiln.export import checks
    from kiln.export.scoring import RowRecorder, evaluate_graph

    module, target, datamodule = work.module, work.target, work.datamodule
    with work.watch.part(f"{name}: score"):
        net_session = checks.open_session(net_path, work.settings.threads)
        rows = RowRecorder(target)
        val_metrics = evaluate_graph(module, target, net_session, datamodule, "val", name, rows, trainer)
        test_metrics = evaluate_graph(module, target, net_session, datamodule, "test", name, trainer=trainer)
    return val_metrics, test_metrics, rows


def assemble_variant(
    work: Work,
    name: str,
    net_path: Path,
    val_metrics: dict[str, float],
    test_metrics: dict[str, float],
    staging: Path,
) -> tuple[Path, Any]:
    """The deployable file (net, preprocessing, head, metadata) in `staging`, checked and opened."""
    import onnx

    from kiln.export import checks
    from kiln.export.graphs import assemble, set_metadata

    inputs, model, manifest = work.inputs, work.model, work.manifest
    path = staging / f"{name}.onnx"
    graph = assemble(
        onnx.load(str(net_path)),
        task=model.task,
        class_names=model.class_names,
        table=inputs.table,
        image=inputs.image,
    )
    set_metadata(
        graph,
        {
            **base_metadata(work.run, work.datamodule, inputs, model, name, manifest["opset"]),
            "kiln.monitor_value": f"{val_metrics[manifest['monitor']['metric']]:.6g}",
            "kiln.test_metrics": {k: round(v, 6) for k, v in test_metrics.items()},
        },
    )
    onnx.save(graph, str(path))
    checks.check_file(path)
    return path, checks.open_session(path, work.settings.threads)


def check_variant(
    work: Work, entry: dict[str, Any], session: Any, gate: Gate, val_drop: float
) -> dict[str, Any]:
    """fp32 and fp16: parity with torch on real inputs (fp16 within its rounding); int8 is judged
    by the gate's metric on the validation split instead."""
    from kiln.compression.choose import describe_drop
    from kiln.compression.fp16 import PARITY_ATOL as FP16_PARITY_ATOL
    from kiln.export import checks

    if entry["precision"] not in ("fp32", "fp16"):
        drop = describe_drop(val_drop, gate.unit)
        return {
            "passed": True,
            "check": f"int8, judged by {gate.metric} on the validation split (drop {drop})",
            "reason": "",
        }
    settings, inputs, task = work.settings, work.inputs, work.model.task
    atol = settings.atol if entry["precision"] == "fp32" else max(settings.atol, FP16_PARITY_ATOL)
    with work.watch.part(f"{entry['name']}: parity with torch"):
        graph_out = checks.run_batched(session, inputs.feeds(session))[work.model.output]
        torch_out = torch_outputs(
            variant_module(work.run, work.target, entry), inputs.torch_features(), task or ""
        )
        result = checks.parity(graph_out, torch_out, task or "regression", atol)
    return {
        "parity_max_abs": result.max_abs,
        "passed": result.ok,
        "check": f"parity: {result.describe()}",
        "reason": "" if result.ok else f"parity failed: {result.describe()}",
    }


def validation_rows(rows: Any) -> int | None:
    paired = rows.rows()
    return None if paired is None else len(paired[1])


def measure_speed(
    variants: list[dict[str, Any]], staging: Path, inputs: ModelInputs, settings: ExportSettings
) -> None:
    """Latency of every variant and each candidate's speed-up over the fp32 graph: the candidate
    and fp32 timed alternately in paired rounds (export/measure.py) at each batch size. fp32's
    latency pools its rounds from every pairing; alone (no candidate), it is timed by itself.
    A candidate's latency_runs counts rounds, each the quickest of latency_calls_per_round calls."""
    from kiln.export import measure
    from kiln.export.feeds import tile_rows

    def runner(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
        session = measure.timing_session(path, settings.threads)
        return session, dict(inputs.feeds(session))

    fp32 = next(v for v in variants if v["name"] == "fp32")
    reference, reference_feeds = runner(staging / f"{fp32['name']}.onnx")
    pooled: dict[int, list[float]] = {batch: [] for batch in BATCHES}
    for variant in variants:
        if variant is fp32:
            continue
        session, feeds = runner(staging / f"{variant['name']}.onnx")
        latency, speedup, calls = measure.Latency(), {}, {}
        for batch in BATCHES:
            reference_us, candidate_us, calls[str(batch)] = measure.paired_rounds(
                functools.partial(reference.run, None, tile_rows(reference_feeds, batch)),
                functools.partial(session.run, None, tile_rows(feeds, batch)),
                settings.latency_repeats,
            )
            pooled[batch] += reference_us
            latency.add(batch, candidate_us)
            speedup[str(batch)] = measure.speedup_interval(reference_us, candidate_us).as_dict()
        set_latency(variant, latency)
        variant["speedup"] = speedup
        variant["latency_calls_per_round"] = calls  # a round's time: the quickest of these calls
    if not pooled[BATCHES[0]]:
        set_latency(fp32, measure.ort_latency(reference, reference_feeds, BATCHES, settings.latency_repeats))
        return
    latency = measure.Latency()
    for batch, samples in pooled.items():
        latency.add(batch, samples)
    set_latency(fp32, latency)


def runs(variant: dict[str, Any], batch: str) -> str:
    """What a latency median is over: timed runs, or paired rounds (each the quickest of N calls)."""
    calls = (variant.get("latency_calls_per_round") or {}).get(batch)
    if calls is None:
        return "runs"
    return "paired rounds" + (f" (each the quickest of {calls} calls)" if calls > 1 else "")


def set_latency(variant: dict[str, Any], latency: Any) -> None:
    variant["latency_us"] = latency.median_us
    variant["latency_spread_us"] = latency.spread_us
    variant["latency_runs"] = latency.repeats  # timed runs behind each median


def variant_module(run: Any, target: Any, entry: dict[str, Any]) -> Any:
    """The torch module a fp32 variant was exported from: the best checkpoint's, or pruned weights."""
    import torch

    from kiln.compression.pruning import fit_to_state_dict

    if not entry.get("weights"):
        return target.eval()
    state = torch.load(run.layout.compress / entry["weights"], map_location="cpu", weights_only=True)
    return fit_to_state_dict(copy.deepcopy(target).cpu(), state).eval()


def base_metadata(
    run: Any, datamodule: Any, inputs: ModelInputs, model: Model, variant: str, opset: int
) -> dict[str, Any]:
    return {
        "kiln.version": kiln.__version__,
        "kiln.config_hash": run.config_hash,
        "kiln.run": run.directory.name,
        "kiln.variant": variant,
        "kiln.task": model.task or "raw",
        "kiln.class_names": model.class_names,
        "kiln.feature_names": inputs.feature_names,
        "kiln.input_kind": inputs.kind,
        "kiln.input_shape": model.input_shape,
        **({"kiln.image_input": inputs.image} if inputs.image is not None else {}),
        "kiln.target": getattr(datamodule, "target_column", "") or "",
        "kiln.monitor": run.monitor["metric"],
        "kiln.monitor_mode": run.monitor["mode"],
        "kiln.opset": str(opset),
        **drift_metadata(run.directory),
    }


def drift_metadata(directory: Path) -> dict[str, str]:
    """The training data's per-feature baseline (kiln.drift), for `kiln predict` to compare against."""
    from kiln.drift import BASELINE_FILE, METADATA_KEY, to_metadata

    path = directory / BASELINE_FILE
    return {METADATA_KEY: to_metadata(json.loads(path.read_text()))} if path.is_file() else {}


def add_embedding_baseline(
    path: Path, datamodule: Any, image: dict[str, Any], settings: ExportSettings
) -> dict[str, Any] | None:
    """Put an embedding-level drift summary (kiln.drift.embedding_baseline) of the training images,
    as this very model embeds them, into the model's drift baseline; what was done, for the
    report. None when the model has no baseline or no fully connected head to read."""
    import onnx

    from kiln.data.images import training_images
    from kiln.drift import (
        METADATA_KEY,
        embedding_baseline,
        embedding_columns,
        feature_baseline,
        from_metadata,
        to_metadata,
    )
    from kiln.export import checks
    from kiln.export.graphs import embedding_tensor, metadata, set_metadata, with_output
    from kiln.export.images import framed_for_graph, predict_images

    model = onnx.load(str(path))
    tensor = embedding_tensor(model)
    meta = metadata(model)
    if tensor is None or METADATA_KEY not in meta:
        return None
    # framed so the net sees them as training did (a torchvision graph would resize them again)
    images = [
        framed_for_graph(p[None], image)[0] for p in training_images(datamodule, image, EMBEDDING_IMAGES)
    ]
    if not images:
        return None
    session = checks.open_session(path, settings.threads, model=with_output(model, tensor))
    embeddings = predict_images(session, images, batch_size=64)[tensor]
    baseline = from_metadata(meta[METADATA_KEY])
    baseline["embedding"] = embedding_baseline(embeddings, tensor)
    baseline["features"].update(
        {
            name: feature_baseline({name: values})["features"][name]
            for name, values in embedding_columns(embeddings, baseline["embedding"]).items()
        }
    )
    set_metadata(model, {METADATA_KEY: to_metadata(baseline)})
    onnx.save(model, str(path))
    return {"tensor": tensor, "size": int(embeddings[0].size), "images": len(images)}


def describe(variant: dict[str, Any], metric: str, test_metric: str, unit: str) -> str:
    from kiln.compression.choose import describe_speedup

    status = "passed" if variant["passed"] else f"FAILED ({variant['reason']})"
    speed = f"  speed-up {describe_speedup(variant)}" if variant.get("speedup") else ""
    interval = variant.get("drop_ci95")
    spread = f" [{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else ""
    return (
        f"{variant['name']:<24} {variant['precision']}  {metric}={_fmt(variant['val_metrics'].get(metric))}  "
        f"drop={variant['val_drop']:+.2f}{'%' if unit == 'percent' else ''}{spread}  {test_metric}={_fmt(variant['test_metrics'].get(test_metric))}  "
        f"{variant['size_bytes'] / 1024:.1f} KB  b1 {variant['latency_us']['1']:.0f} us  "
        f"b256 {variant['latency_us']['256']:.0f} us{speed}  {status}"
    )


class ModelInputs:
    """Real inputs for parity and latency, as the exported graph and the torch module take them.

    kiln's tables: the graph takes raw rows (the test split plus two rows the training data never
    showed: every value missing, and categories never seen), torch the preprocessed features.
    Images (a datamodule with `image_input`): torch takes up to PARITY_ROWS inputs `x` from the
    test loader, the graph the same images as uint8 (x un-normalized, rounded: exact for images
    that were resized as uint8 and then scaled, as kiln's are).
    Several inputs (kiln.export.onnx_export.NamedInputs): up to PARITY_ROWS rows of each, by name,
    from the test loader's batches (those shaped as the first batch), for both.
    Anything else: up to PARITY_ROWS inputs `x` from the datamodule's own test loader, for both.
    """

    def __init__(self, datamodule: Any, module: Any) -> None:
        from kiln.export.from_run import raw_split, table_state
        from kiln.export.images import export_image_input

        self.table = table_state(datamodule)
        self.image = export_image_input(datamodule) if self.table is None else None
        self.named = named_test_inputs(datamodule, module, PARITY_ROWS) if self.table is None else None
        self.kind = (
            "table"
            if self.table is not None
            else "named"
            if self.named is not None
            else "image"
            if self.image is not None
            else "array"
        )
        self.frame = None
        self._x: np.ndarray | None = None
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        if self.table is not None:
            self.frame = with_unseen_rows(raw_split(datamodule, "test"), self.table)
            self.feature_names = list(self.table["numeric_columns"]) + list(self.table["categorical_columns"])
        elif self.named is not None:
            self.feature_names = self.named.names
        else:
            self._x = test_inputs(datamodule, PARITY_ROWS)
            self.feature_names = list(getattr(datamodule, "feature_names", None) or [])

    @property
    def input_shape(self) -> list[int] | dict[str, list[int]]:
        if self.named is not None:
            return self.named.shapes()
        return list(self.torch_features().shape[1:])

    def torch_features(self) -> Any:
        import torch

        if self.named is not None:
            return self.named
        if self.table is None:
            assert self._x is not None
            return torch.from_numpy(self._x)
        from kiln.data.preprocessing import TablePreprocessor

        return torch.as_tensor(TablePreprocessor.from_state(self.table).transform(self.frame))

    def feeds(self, session: Any) -> dict[str, np.ndarray]:
        from kiln.export.feeds import array_feeds, specs_of, table_feeds

        key = id(session)
        if key not in self._cache:
            self._cache.clear()
            specs = specs_of(session.get_inputs())
            if self.table is not None:
                assert self.frame is not None
                self._cache[key] = table_feeds(self.frame, specs, source="test split")
            elif self.named is not None:
                self._cache[key] = named_feeds(self.named, session)
            elif self.image is not None and specs[0].type == "tensor(uint8)":
                from kiln.export.images import framed_for_graph

                assert self._x is not None
                pixels = framed_for_graph(as_uint8_images(self._x, self.image), self.image)
                self._cache[key] = {specs[0].name: pixels}
            else:
                assert self._x is not None
                self._cache[key] = array_feeds(self._x, specs[0])
        return self._cache[key]


def named_test_inputs(datamodule: Any, module: Any, limit: int) -> Any:
    """Up to `limit` rows of each of a several-input model's inputs (NamedInputs) from the test
    loader, or None for a model of one input. Batches shaped unlike the first (another padded
    length) are left out: rows of one array share one shape."""
    import torch

    from kiln.contract import export_module
    from kiln.export.onnx_export import NamedInputs, example_input, inputs_of_batch

    example = example_input(module, datamodule)
    if not isinstance(example, NamedInputs):
        return None
    datamodule.setup("test")
    forward = getattr(export_module(module), "forward", None)
    parts: dict[str, list[Any]] = {name: [] for name in example.names}
    rows = 0
    for batch in datamodule.test_dataloader():
        tensors = (
            batch
            if isinstance(batch, dict) and all(n in batch for n in parts)
            else inputs_of_batch(batch, forward)
        )
        if tensors is None or any(name not in tensors for name in parts):
            break
        if any(tensors[n].shape[1:] != parts[n][0].shape[1:] for n in parts if parts[n]):
            continue
        for name in parts:
            parts[name].append(tensors[name].detach().cpu())
        rows += len(tensors[example.names[0]])
        if rows >= limit:
            break
    if not rows:
        raise KilnError(
            "data: the test loader gave no batches with the model's inputs; kiln checks the exported model on them"
        )
    joined = {name: torch.cat(values)[:limit].contiguous() for name, values in parts.items()}
    return NamedInputs(joined, example.axes, example.as_dict)


def named_feeds(named: Any, session: Any) -> dict[str, np.ndarray]:
    """The graph's inputs by name, each as the graph's element type."""
    from kiln.export.scoring import numpy_type

    return {
        node.name: np.ascontiguousarray(named.tensors[node.name].numpy().astype(numpy_type(node.type)))
        for node in session.get_inputs()
    }


def torch_latency(target: Any, features: Any, repeats: int) -> Any:
    """torch eager latency at each of BATCHES rows; several inputs are tiled together."""
    import torch

    from kiln.export import measure
    from kiln.export.onnx_export import NamedInputs

    if not isinstance(features, NamedInputs):
        return measure.torch_latency(target, features, BATCHES, repeats)
    target.eval()
    latency = measure.Latency()
    with torch.inference_mode():
        for batch in BATCHES:
            tiled = {name: tile(tensor, batch) for name, tensor in features.tensors.items()}
            latency.add(batch, measure.timed(functools.partial(features.call, target, tiled), repeats))
    return latency


def tile(tensor: Any, rows: int) -> Any:
    """Exactly `rows` rows, repeating the tensor's own."""
    reps = -(-rows // len(tensor))
    return tensor.repeat(reps, *([1] * (tensor.dim() - 1)))[:rows].contiguous()


def torch_outputs(net: Any, features: Any, task: str, batch_size: int = 1024) -> np.ndarray:
    """The torch module's answers to the parity inputs (several inputs: called as forward takes them)."""
    import torch

    from kiln.export import measure
    from kiln.export.onnx_export import NamedInputs

    if not isinstance(features, NamedInputs):
        return measure.torch_outputs(net, features, task, batch_size)
    net.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(features.tensors[features.names[0]]), batch_size):
            out = features.call(net, {n: t[start : start + batch_size] for n, t in features.tensors.items()})
            parts.append((out.squeeze(-1) if task == "regression" else out).float().numpy())
    return np.concatenate(parts, axis=0)


def test_inputs(datamodule: Any, limit: int) -> np.ndarray:
    """Up to `limit` model inputs from the datamodule's test loader, as float32."""
    from kiln.contract import batch_input

    datamodule.setup("test")
    parts, rows = [], 0
    for batch in datamodule.test_dataloader():
        x = batch_input(batch).detach().float().cpu().numpy()
        parts.append(x)
        rows += len(x)
        if rows >= limit:
            break
    if not parts:
        raise KilnError("data: the test loader gave no batches; kiln checks the exported model on them")
    return np.ascontiguousarray(np.concatenate(parts)[:limit])


def as_uint8_images(x: np.ndarray, image: dict[str, Any]) -> np.ndarray:
    """Normalized float (batch, channels, height, width) -> the uint8 (batch, height, width,
    channels) images they were made from."""
    mean = np.asarray(image["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(image["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    pixels = np.clip(np.rint((x * std + mean) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


def with_unseen_rows(frame: Any, table: dict[str, Any]) -> Any:
    import pandas as pd

    missing = {c: [np.nan] for c in frame.columns}
    unseen = {c: [frame[c].iloc[0]] for c in frame.columns}
    for column in table["categorical_columns"]:
        unseen[column] = ["kiln-never-seen"]
    return pd.concat([frame, pd.DataFrame(missing), pd.DataFrame(unseen)], ignore_index=True)


def _drop(baseline: float | None, value: float | None, mode: str, unit: str) -> float | None:
    from kiln.compression.choose import metric_drop

    return None if baseline is None or value is None else metric_drop(baseline, value, mode, unit)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
