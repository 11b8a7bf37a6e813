"""Accuracy-aware static int8: choose the calibration, then return the most sensitive layers to fp32
until the validation drop fits the budget, each attempt judged as the export's gate judges a variant.

    search(settings, prepared, target, calibration, judge)  ->  the attempts, one report row each

1. Every calibration choice (method x per-channel x reduce_range, `quantize_static.calibration` ...)
   is quantized and judged: its drop on the validation split with the paired bootstrap 95% interval
   (compression/bootstrap.py), scored by the module's own validation_step, and its speed-up over
   the fp32 net in paired rounds at batch 256 (export/measure.py). The first one in the configured
   order that is within the budget and shown faster is kept.
2. Otherwise the search starts from the choice with the smallest judged drop among those not shown
   slower, ranks its quantized layers by sensitivity (below), and keeps the 1, 2, 4, ... most
   sensitive in fp32 (onnxruntime's `nodes_to_exclude`), re-using the calibrated ranges, until the
   drop fits, the graph is no longer shown faster than fp32 (more fp32 layers only slow it
   further), or `max_fallback_attempts` attempts are spent.

Sensitivity is a proxy, not the drop of each layer quantized alone (one graph and one validation
pass per layer): the error a layer adds, on a calibration batch, in the int8 graph against the fp32
one, `err(output) - err(worst input)`, err being the output's squared error relative to its fp32
energy. One pass of each graph ranks every layer.

The speed measured here is the bare net's, with inputs from the calibration set; the export then
measures the assembled graph again, and its gate decides what ships.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kiln.compression.choose import within_budget
from kiln.compression.quantization import StaticSettings, prepare, quantize_prepared
from kiln.errors import KilnError

SEARCH_ROUNDS = 12  # paired rounds per attempt at batch 256 (the export measures the winner again)
SEARCH_BATCH = 256
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the layers a fallback returns to fp32


@dataclass
class Attempt:
    """One quantized graph the search judged: a row of the report."""

    settings: StaticSettings
    path: Path
    val_drop: float
    drop_ci95: list[float] | None
    speedup: dict[str, Any] | None = None
    within_budget: bool = False
    faster: bool = False
    slower: bool = False
    verdict: str = ""

    def as_row(self) -> dict[str, Any]:
        return {
            "calibration": self.settings.label,
            "kept_fp32": list(self.settings.exclude),
            "val_drop": self.val_drop,
            "drop_ci95": self.drop_ci95,
            "speedup": {str(SEARCH_BATCH): self.speedup} if self.speedup else {},
            "verdict": self.verdict,
        }


def cpu_instruction_set() -> dict[str, Any]:
    """The CPU's int8-relevant instruction sets (Linux /proc/cpuinfo flags) and onnxruntime's
    version: int8 accuracy and speed depend on both (VNNI makes int8 dot products fast and exact)."""
    import platform

    import onnxruntime

    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name":
                model = value.strip()
    known = bool(flags)
    return {
        "model": model,
        "avx2": "avx2" in flags if known else None,
        "avx512": "avx512f" in flags if known else None,
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}) if known else None,
        "amx": bool(flags & {"amx_int8", "amx_tile"}) if known else None,
        "onnxruntime": onnxruntime.__version__,
    }


def describe_cpu(cpu: dict[str, Any]) -> str:
    """`AMD EPYC (AVX2 yes, AVX-512 yes, VNNI yes, AMX no), onnxruntime 1.32.0`."""
    names = {"avx2": "AVX2", "avx512": "AVX-512", "vnni": "VNNI", "amx": "AMX"}
    flags = ", ".join(
        f"{label} {'unknown' if cpu.get(key) is None else 'yes' if cpu[key] else 'no'}"
        for key, label in names.items()
    )
    return f"{cpu.get('model', 'unknown CPU')} ({flags}), onnxruntime {cpu.get('onnxruntime', '?')}"


class Judge:
    """Judges a quantized net as the export's gate will: the module's own validation metric with its
    drop's paired bootstrap interval against the torch fp32 model, and the speed-up over the fp32
    net in paired rounds. The fp32 model is scored once, on first use."""

    def __init__(
        self,
        recipe: Any,
        monitor: dict[str, str],
        module: Any,
        datamodule: Any,
        reference_net: Path,
        watch: Any,
    ) -> None:
        self.recipe, self.monitor, self.watch = recipe, monitor, watch
        self.module, self.datamodule, self.reference_net = module, datamodule, reference_net
        self.ready = False

    def _baseline(self) -> None:
        from kiln import contract
        from kiln.compression.choose import gate_metric, metric_unit
        from kiln.export.scoring import RowRecorder, evaluate, evaluation_trainer

        if self.ready:
            return
        self.ready = True
        self.target = contract.export_module(self.module)
        self.trainer = evaluation_trainer()
        self.rows = RowRecorder(self.target)
        with self.watch.part("int8 search: score torch fp32"):
            self.metrics = evaluate(self.module, self.datamodule, "val", self.rows, self.trainer)
        self.task = contract.task(self.datamodule, self.module)
        self.metric, self.mode = gate_metric(self.recipe.metric, self.monitor, self.task, self.metrics)
        if self.metric not in self.metrics:
            raise KilnError(
                f"monitor.metric={self.metric}: the module's validation_step does not log it; it logs: "
                f"{', '.join(self.metrics) or 'nothing'}"
            )
        self.unit = metric_unit(self.metric, self.recipe.metric_unit)

    def judge(self, settings: StaticSettings, path: Path) -> Attempt:
        """Score the graph at `path` on the validation split (its speed is timed on demand: time)."""
        from kiln.compression.choose import metric_drop
        from kiln.export import checks
        from kiln.export.scoring import RowRecorder, evaluate_graph

        self._baseline()
        with self.watch.part("int8 search: score"):
            session = checks.open_session(path, None)
            rows = RowRecorder(self.target)
            metrics = evaluate_graph(
                self.module, self.target, session, self.datamodule, "val", path.stem, rows, self.trainer
            )
            interval = self._interval(rows, metrics)
        drop = float(metric_drop(self.metrics[self.metric], metrics[self.metric], self.mode, self.unit))
        attempt = Attempt(settings, path, drop, interval)
        attempt.within_budget = within_budget(
            self._record(attempt), self.recipe.max_metric_drop, self.recipe.decision
        )
        attempt.verdict = self._verdict(attempt)
        return attempt

    def time(self, attempt: Attempt, feeds: dict[str, np.ndarray]) -> None:
        """The attempt's speed-up over the fp32 net in paired rounds at SEARCH_BATCH."""
        from kiln.compression.choose import is_faster, slower_at

        with self.watch.part("int8 search: latency"):
            attempt.speedup = self._speedup(attempt.path, feeds)
        record = self._record(attempt)
        attempt.faster, attempt.slower = is_faster(record), bool(slower_at(record))
        attempt.verdict = self._verdict(attempt)

    def _record(self, attempt: Attempt) -> dict[str, Any]:
        """The attempt as kiln.compression.choose reads a variant."""
        speedup = {str(SEARCH_BATCH): attempt.speedup} if attempt.speedup else {}
        return {
            "passed": True,
            "val_drop": attempt.val_drop,
            "drop_ci95": attempt.drop_ci95,
            "speedup": speedup,
        }

    def _interval(self, rows: Any, metrics: dict[str, float]) -> list[float] | None:
        from kiln.compression.bootstrap import Rows, drop_interval
        from kiln.compression.choose import metric_drop

        paired = self.rows.rows(), rows.rows()
        if paired[0] is None or paired[1] is None:
            return None
        return drop_interval(
            self.metric,
            self.task,
            self.mode,
            lambda base, value: metric_drop(base, value, self.mode, self.unit),
            Rows(*paired[0]),
            Rows(*paired[1]),
            (self.metrics[self.metric], metrics[self.metric]),
        ).as_list()

    def _speedup(self, path: Path, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        from kiln.export import measure
        from kiln.export.feeds import tile_rows
        from kiln.export.measure import timing_session

        batch = tile_rows(feeds, SEARCH_BATCH)
        reference, candidate = timing_session(self.reference_net, None), timing_session(path, None)
        reference_us, candidate_us, _ = measure.paired_rounds(
            functools.partial(reference.run, None, batch),
            functools.partial(candidate.run, None, batch),
            SEARCH_ROUNDS,
        )
        return measure.speedup_interval(reference_us, candidate_us).as_dict()

    def _verdict(self, attempt: Attempt) -> str:
        from kiln.compression.choose import describe_speedup, over_budget

        record = self._record(attempt)
        if not attempt.within_budget:
            why = f"over the budget: {over_budget(record, self.recipe.max_metric_drop, self.unit, self.recipe.decision)}"
        else:
            why = f"within the budget ({self.metric} drop {describe_drop_of(attempt)})"
        if attempt.speedup is None:
            return why
        speed = describe_speedup(record, str(SEARCH_BATCH))
        if attempt.slower:
            return f"{why}; measured slower than the fp32 net: {speed}"
        if not attempt.faster:
            return f"{why}; not shown faster than the fp32 net: {speed}"
        return f"{why}; faster: {speed}"


def describe_drop_of(attempt: Attempt) -> str:
    interval = attempt.drop_ci95
    measured = f"{attempt.val_drop:.2f}"
    return f"{measured}, 95% interval [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else measured


def search(
    choices: Sequence[StaticSettings],
    prepared: Path,
    target: Path,
    calibration: Sequence[np.ndarray],
    judge: Judge,
    max_attempts: int,
    workdir: Path,
) -> tuple[list[Attempt], str]:
    """The attempts (see the module's docstring) in order, and the outcome in one sentence; the
    chosen graph is written to `target`: the first attempt within the budget, else the starting
    point of the fallback (the export's gate then rejects it, and the attempts say why)."""
    attempts = [
        judge.judge(choice, _quantize(prepared, workdir, choice, calibration, index))
        for index, choice in enumerate(choices)
    ]
    chosen = next((a for a in attempts if a.within_budget), None)
    start = chosen or _fallback_start(attempts)
    outcome = (
        _search_fallback(start, prepared, calibration, judge, max_attempts, workdir, attempts)
        if not chosen
        else (f"calibration {chosen.settings.label} is within the budget with every layer quantized")
    )
    chosen = next((a for a in attempts if a.within_budget), None)
    shutil.copyfile((chosen or start).path, target)
    return attempts, outcome


def _search_fallback(
    start: Attempt,
    prepared: Path,
    calibration: Sequence[np.ndarray],
    judge: Judge,
    max_attempts: int,
    workdir: Path,
    attempts: list[Attempt],
) -> str:
    """Keep the 1, 2, 4, ... most sensitive layers in fp32 until an attempt fits, appending each
    attempt to `attempts`; returns the outcome in one sentence."""
    if max_attempts == 0:
        return "over the budget, and compress.quantize_static.fallback is off"
    feeds = {"input": np.concatenate(list(calibration))}
    judge.time(start, feeds)
    if not start.faster:
        return (
            "no attempt qualifies: with every layer quantized the graph is not shown faster than the fp32 "
            "net, and keeping layers in fp32 only slows it further"
        )
    ranked = [n for n in rank_layers(prepared, start.path, calibration[0]) if n not in start.settings.exclude]
    for number in range(max_attempts):
        keep = ranked[: 2**number]
        if not keep or (number > 0 and len(keep) <= 2 ** (number - 1)):
            return f"no attempt qualifies: every one of the {len(ranked)} quantized layers was tried in fp32"
        settings = replace(start.settings, exclude=(*start.settings.exclude, *keep))
        attempt = judge.judge(settings, _quantize(prepared, workdir, settings, calibration, len(attempts)))
        judge.time(attempt, feeds)
        attempts.append(attempt)
        if attempt.within_budget:
            return f"within the budget with {len(settings.exclude)} layer(s) kept in fp32"
        if not attempt.faster:
            return (
                f"no attempt qualifies: with {len(settings.exclude)} layer(s) in fp32 the graph is no longer "
                "shown faster than the fp32 net, and more fp32 layers only slow it further"
            )
    return f"no attempt qualifies within compress.quantize_static.max_fallback_attempts={max_attempts}"


def _fallback_start(attempts: list[Attempt]) -> Attempt:
    """The calibration the fallback starts from: the smallest judged drop among those not shown
    slower (the first attempt when every one is)."""
    usable = [a for a in attempts if not a.slower] or attempts[:1]
    return min(usable, key=lambda a: a.drop_ci95[1] if a.drop_ci95 else a.val_drop)


def _quantize(
    prepared: Path, workdir: Path, settings: StaticSettings, calibration: Sequence[np.ndarray], index: int
) -> Path:
    path = workdir / f"attempt{index}.onnx"
    cache = workdir / f"ranges-{settings.method}.json"  # one calibration per method, whatever is excluded
    quantize_prepared(prepared, path, "input", calibration, settings, cache=cache)
    return path


def rank_layers(prepared: Path, quantized: Path, batch: np.ndarray) -> list[str]:
    """The prepared graph's compute layers (COMPUTE_OPS) that the int8 graph quantized, most
    sensitive first: the relative squared error each adds (see the module's docstring). A layer
    is matched by its node name: the quantizer keeps names but renames tensors (it fuses a Relu
    into the layer before it, for one)."""
    import onnx

    fp32_nodes = {
        n.name: n for n in onnx.load(str(prepared)).graph.node if n.op_type in COMPUTE_OPS and n.name
    }
    int8_nodes = {n.name: n for n in onnx.load(str(quantized)).graph.node if n.name in fp32_nodes}
    layers = sorted(int8_nodes)
    fp32 = _intermediates(
        prepared, [t for n in layers for t in (fp32_nodes[n].input[0], fp32_nodes[n].output[0])], batch
    )
    int8 = _intermediates(
        quantized, [t for n in layers for t in (int8_nodes[n].input[0], int8_nodes[n].output[0])], batch
    )

    def error(fp32_tensor: str, int8_tensor: str) -> float:
        return _relative_error(fp32[fp32_tensor], int8[int8_tensor])

    added = {
        name: error(fp32_nodes[name].output[0], int8_nodes[name].output[0])
        - error(fp32_nodes[name].input[0], int8_nodes[name].input[0])
        for name in layers
    }
    return sorted(added, key=lambda name: (-added[name], name))


def _intermediates(path: Path, tensors: list[str], batch: np.ndarray) -> dict[str, np.ndarray]:
    """The values of `tensors` for `batch`, read as extra graph outputs (all float here)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    outputs = {o.name for o in model.graph.output}
    wanted = list(dict.fromkeys(tensors))
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
        for t in wanted
        if t not in outputs
    )
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(wanted, {session.get_inputs()[0].name: batch})
    return dict(zip(wanted, values, strict=True))


def _relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    if reference.shape != value.shape:
        return 0.0
    energy = float(np.mean(np.square(reference, dtype=np.float64)))
    return float(np.mean(np.square(value - reference, dtype=np.float64))) / max(energy, 1e-12)


def check_exclude(prepared: Path, exclude: Sequence[str]) -> None:
    """Every name in `quantize_static.exclude` must be a node of the graph the quantizer rewrites."""
    import onnx

    names = [node.name for node in onnx.load(str(prepared)).graph.node if node.name]
    missing = [name for name in exclude if name not in names]
    if missing:
        layers = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in COMPUTE_OPS]
        shown = ", ".join(layers[:8]) + (f", ... ({len(layers)} in all)" if len(layers) > 8 else "")
        raise KilnError(
            f"compress.quantize_static.exclude: the graph has no layer named {', '.join(missing)}; "
            f"its layers: {shown}; name layers from that list (the report's int8 attempts name them too), or use []"
        )


def work_directory(target: Path) -> Path:
    """A folder beside `target` for the attempts' graphs and calibrated ranges (in the staging
    directory, so a killed compression leaves nothing that looks finished)."""
    workdir = target.parent / f".{target.stem}.int8-search-{os.getpid()}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return workdir


def prepared_net(source: Path, workdir: Path) -> Path:
    return prepare(source, workdir / "prepared.onnx")


def report_lines(report: dict[str, Any]) -> list[str]:
    """report.md: the CPU the numbers were measured on, and each variant's int8 attempts, one row
    each (calibration, layers kept in fp32, drop with its interval, speed-up with its interval)."""
    from kiln.compression.choose import describe_speedup

    lines: list[str] = []
    if report.get("cpu"):
        lines += ["", f"Measured on: {describe_cpu(report['cpu'])}.", ""]
    for variant in [*report.get("variants", []), *report.get("abandoned", [])]:
        attempts = (variant.get("int8_search") or {}).get("attempts") or []
        if not attempts:
            continue
        lines += [
            "",
            f"Static int8 attempts of {variant['name']} (drop on the validation split, speed-up of the bare "
            f"net over the fp32 net at batch {SEARCH_BATCH}; {variant['int8_search']['outcome']}):",
            "",
            "| attempt | calibration | layers kept in fp32 | val drop | drop 95% CI | speed-up [95% CI] | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for index, row in enumerate(attempts, 1):
            interval = row.get("drop_ci95")
            lines.append(
                f"| {index} | {row['calibration']} | {', '.join(row['kept_fp32']) or 'none'} | "
                f"{row['val_drop']:.2f} | {f'[{interval[0]:.2f}, {interval[1]:.2f}]' if interval else 'n/a'} | "
                f"{describe_speedup({'speedup': row['speedup']}, str(SEARCH_BATCH)) if row['speedup'] else 'not timed'} | "
                f"{row['verdict']} |"
            )
    return lines


def quantize(
    quantizer: Any, source: Path, target: Path, calibration: Any, judge: Judge | None
) -> tuple[list[str], dict[str, Any]]:
    """Run a quantization step: static int8 through its accuracy-aware search (the variant's record
    then holds the attempts), any other step as it is. Returns the warnings and the record's additions."""
    search_step = getattr(quantizer, "search", None)
    if judge is None or search_step is None:
        return quantizer.quantize(source, target, calibration), {}
    return [], {"int8_search": search_step(source, target, calibration, judge)}
