"""Compression as a library: every variant of a trained module, written as ONNX nets.

    compress(directory, module, datamodule, recipe, ...)  ->  <directory>/compress/ + manifest.json

It works on any LightningModule and LightningDataModule (kiln.contract): the part that ships is
`kiln.contract.export_module(module)` (the module's forward unless it says otherwise), structured
pruning fine-tunes through the module's own training_step with the run's trainer settings, and
static int8 is calibrated on inputs from the datamodule's own training loader. The variants are
judged later, by the export pipeline, with the module's own validation_step.

The directory is swapped in whole: a killed compression leaves the previous compress/ (or none).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.compression.recipes import FP32, Recipe
from kiln.compression.steps import Pruning
from kiln.runs import RunLayout, swap_in


def compress(
    directory: Path,
    module: Any,
    datamodule: Any,
    recipe: Recipe,
    *,
    monitor: dict[str, str],
    opset: int,
    seed: int,
    finetune_trainer: dict[str, Any],
    exporter: str = "auto",
    say: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build every variant's net as ONNX (fp32 always, then the recipe's candidates) in
    <directory>/compress/, with manifest.json describing them. Returns the manifest. `say`
    tells progress, `warn` what the user should know (e.g. int8 that will be slow)."""
    from kiln.compression import recovery
    from kiln.export.measure import Stopwatch
    from kiln.export.onnx_export import example_input

    started = time.perf_counter()
    example = example_input(module, datamodule)
    recovery.check_distillation_asked(recipe, module, datamodule, example)  # a user error before any work
    layout = RunLayout(directory)
    staging = directory / f".{RunLayout.COMPRESS}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        job = Job(module, datamodule, recipe, monitor, opset, seed, finetune_trainer, exporter, say, warn)
        job.start(staging, example, Stopwatch())
        abandoned: list[dict[str, Any]] = []
        variants = [export_fp32(job)]
        variants += build_candidates(job, variants[0], abandoned)
        variants += recover(job, variants, abandoned)
        manifest = describe(job, variants, abandoned, time.perf_counter() - started)
        (staging / RunLayout.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        swap_in(staging, layout.compress)  # kiln.runs: whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


@dataclass
class Job:
    """One compression in progress: what it was given, and what its steps share (the staging
    directory, the example input, the stopwatch, the budget and calibration measured once)."""

    module: Any
    datamodule: Any
    recipe: Recipe
    monitor: dict[str, str]
    opset: int
    seed: int
    finetune_trainer: dict[str, Any]
    exporter: str
    say: Callable[[str], None]
    warn: Callable[[str], None]
    staging: Path = field(init=False)
    example: Any = field(init=False)
    watch: Any = field(init=False)
    budget: BudgetOnce = field(init=False)
    calibration: Calibration = field(init=False)
    judge: Any = field(init=False)

    def start(self, staging: Path, example: Any, watch: Any) -> None:
        from kiln.compression import int8_search

        self.staging, self.example, self.watch = staging, example, watch
        fp32_net = staging / f"{FP32}.net.onnx"
        self.judge = int8_search.Judge(
            self.recipe, self.monitor, self.module, self.datamodule, fp32_net, watch
        )
        self.budget = BudgetOnce(
            self.recipe,
            self.monitor,
            self.module,
            self.datamodule,
            self.finetune_trainer,
            watch,
            scored=self.fp32_scored,
        )
        self.calibration = Calibration(self.datamodule, self.seed)

    def fp32_scored(self) -> dict[str, float] | None:
        """The torch fp32 model's validation metrics when the int8 search has measured them."""
        judge = self.judge
        return dict(judge.metrics) if getattr(judge, "ready", False) and hasattr(judge, "metrics") else None

    def prune_budget(self) -> Any:
        """auto holds a pruned candidate's fine-tune to the budget; a fixed recipe asked for it."""
        return self.budget.get() if self.recipe.auto else None


def export_fp32(job: Job) -> dict[str, Any]:
    """The uncompressed model's variant: the reference every candidate is judged against."""
    from kiln.compression.pruning import count_nonzero, count_parameters
    from kiln.contract import export_module
    from kiln.export.onnx_export import export_graph, exported_by

    target = export_module(job.module)
    job.say(f"exporting the uncompressed model ({count_parameters(target)} parameters)")
    with job.watch.part(f"{FP32}: export"):
        exported = export_graph(target, job.example, job.opset, job.exporter)
        save_onnx(exported.model, job.staging / f"{FP32}.net.onnx")
    return {
        "name": FP32,
        "steps": [],
        "precision": "fp32",
        "net_onnx": f"{FP32}.net.onnx",
        "weights": None,
        "params": count_parameters(target),
        "nonzero_params": count_nonzero(target),
        **exported_by(exported),
        "notes": [],
    }


def build_candidates(job: Job, fp32: dict[str, Any], abandoned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recipe's candidates that were built and could still ship; the others go to `abandoned`."""
    from kiln.compression import fp16
    from kiln.export.onnx_export import skip_reason

    built = []
    pruned: dict[tuple[Any, ...], dict[str, Any]] = {}  # candidates sharing pruning steps share the work
    for candidate in fp16.candidates(job.recipe, abandoned):  # auto gains fp16 where a GPU can time it
        skipped = skip_reason(candidate, job.example)  # steps that need one input tensor
        if skipped:
            job.say(f"{candidate.name}: skipped ({skipped})")
            abandoned.append({"name": candidate.name, "steps": candidate.step_names, "abandoned": skipped})
            continue
        source = fp32
        if candidate.prune_steps:
            key = tuple(candidate.prune_steps)  # frozen dataclasses: equal settings, equal key
            if key not in pruned:
                pruned[key] = prune_for(job, candidate, f"pruned{len(pruned)}")
            source = pruned[key]
            if source.get("abandoned"):
                job.say(f"{candidate.name}: abandoned ({source['abandoned']})")
                abandoned.append(abandoned_record(candidate, source))
                continue
        variant = quantized(job, candidate, source)
        args = job.recipe, job.staging, variant, job.example, job.watch, job.say, abandoned
        if not slower_than_fp32(*args):
            built.append(variant)
    return built


def prune_for(job: Job, candidate: Any, name: str) -> dict[str, Any]:
    return prune(
        job.watch,
        job.module,
        job.datamodule,
        candidate.prune_steps,
        job.staging,
        name,
        monitor=job.monitor,
        example=job.example,
        opset=job.opset,
        exporter=job.exporter,
        finetune_trainer=job.finetune_trainer,
        say=job.say,
        budget=job.prune_budget(),
    )


def quantized(job: Job, candidate: Any, source: dict[str, Any]) -> dict[str, Any]:
    """`candidate`'s variant from its source net (fp32 or pruned): quantized when it has a
    quantization step, else the source's net under the candidate's name."""
    from kiln.compression import int8_search

    variant = {
        **source,
        "name": candidate.name,
        "steps": candidate.step_names,
        "notes": list(source["notes"]),
    }
    quantizer = candidate.quantize_step
    if quantizer is None:
        return variant
    target_file = job.staging / f"{candidate.name}.net.onnx"
    job.say(f"{candidate.step_names[-1]}: {type(quantizer).__name__} with onnxruntime")
    with job.watch.part(f"{candidate.name}: quantize"):
        warnings, searched = int8_search.quantize(
            quantizer, job.staging / source["net_onnx"], target_file, job.calibration, job.judge
        )
    for warning in warnings:
        job.warn(warning)
    variant.update(precision=getattr(quantizer, "precision", "int8"), net_onnx=target_file.name)
    variant["notes"] = [*variant["notes"], *warnings]
    variant.update(searched)  # static int8's attempts (compression/int8_search.py)
    return variant


def recover(
    job: Job, variants: list[dict[str, Any]], abandoned: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Recovery by training of the candidates that missed (kiln.compression.recovery)."""
    from kiln.compression import recovery
    from kiln.export.onnx_export import NamedInputs

    if isinstance(job.example, NamedInputs):  # recovery retrains through one input tensor
        return []
    work = recovery.Work(
        job.module,
        job.datamodule,
        job.staging,
        job.monitor,
        job.example,
        job.opset,
        job.exporter,
        job.finetune_trainer,
        job.calibration,
        job.watch,
        job.say,
    )
    return recovery.recover(job.recipe, variants, abandoned, job.budget.get, work)  # only after a miss


def describe(
    job: Job, variants: list[dict[str, Any]], abandoned: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """manifest.json: the recipe, every variant built and every candidate abandoned, the timings."""
    from kiln.export.onnx_export import input_shape

    recipe = job.recipe
    return {
        "recipe": recipe.name,
        "max_metric_drop": recipe.max_metric_drop,
        "metric_unit": recipe.metric_unit,
        "decision": recipe.decision,
        "objective": recipe.objective,
        "metric": recipe.metric,
        "wanted": (recipe.candidates[0].name if recipe.candidates else FP32) if not recipe.auto else None,
        "monitor": job.monitor,
        "opset": job.opset,
        "input_shape": input_shape(job.example),
        "variants": variants,
        "abandoned": abandoned,  # candidates that could not make the budget: numbers, no net
        "keep_variants": recipe.keep_variants,
        "recipe_config": recipe.config,  # what `kiln export` compresses again with once the nets are removed
        "seconds": round(seconds, 1),
        "timings_s": job.watch.seconds,
    }


def prune(
    watch: Any,
    module: Any,
    datamodule: Any,
    steps: list[tuple[str, Pruning]],
    staging: Path,
    name: str,
    *,
    monitor: dict[str, str],
    example: Any,
    opset: int,
    exporter: str,
    finetune_trainer: dict[str, Any],
    say: Callable[[str], None],
    budget: Any = None,
) -> dict[str, Any]:
    """Prune a copy of the module's exported part (fine-tuning the whole module through its own
    training_step after each step), export it, save its weights. With a `budget`
    (kiln.compression.pruning.Budget), a fine-tune that cannot make it gives up: the record then
    says why (`abandoned`), and nothing is exported."""
    from kiln.compression import pruning
    from kiln.contract import export_module

    work = copy.deepcopy(module)
    notes = []
    for step_name, step in steps:
        before = pruning.count_parameters(export_module(work))
        with watch.part(f"{name}: {step_name}"):
            step.prune(export_module(work), example)
        say(f"{step_name}: fine-tuning up to {step.finetune_epochs} epochs on {monitor['metric']}")
        with watch.part(f"{name}: fine-tune"):
            tuned = pruning.finetune(
                work,
                datamodule,
                epochs=step.finetune_epochs,
                patience=step.patience,
                monitor=monitor["metric"],
                mode=monitor["mode"],
                lr_scale=step.lr_scale,
                trainer_settings=finetune_trainer,
                budget=budget,
            )
        notes.append(step.note(before, export_module(work), tuned, monitor["metric"]))
        if tuned.get("abandoned"):
            return gave_up(export_module(work), notes, tuned)
    with watch.part(f"{name}: export"):
        return export_pruned(export_module(work).eval(), staging, name, example, opset, exporter, notes)


def gave_up(net: Any, notes: list[str], tuned: dict[str, Any]) -> dict[str, Any]:
    """A pruning whose fine-tune could not make the budget: why, and the drops that showed it."""
    from kiln.compression import pruning

    return {
        "params": pruning.count_parameters(net),
        "notes": notes,
        "abandoned": tuned["abandoned"],
        "budget_drops": tuned["budget_drops"],
    }


def export_pruned(
    net: Any, staging: Path, name: str, example: Any, opset: int, exporter: str, notes: list[str]
) -> dict[str, Any]:
    """The pruned net as ONNX, and its weights (recovery starts a distillation from them)."""
    import torch

    from kiln.compression import pruning
    from kiln.export.onnx_export import export_graph, exported_by

    exported = export_graph(net, example, opset, exporter)
    save_onnx(exported.model, staging / f"{name}.net.onnx")
    torch.save(net.state_dict(), staging / f"{name}.pt")
    return {
        "precision": "fp32",
        "net_onnx": f"{name}.net.onnx",
        "weights": f"{name}.pt",
        "params": pruning.count_parameters(net),
        "nonzero_params": pruning.count_nonzero(net),
        "sparsity": round(pruning.weight_sparsity(net), 4),
        **exported_by(exported),
        "notes": notes,
    }


def slower_than_fp32(
    recipe: Recipe,
    staging: Path,
    variant: dict[str, Any],
    example: Any,
    watch: Any,
    say: Callable[[str], None],
    abandoned: list[dict[str, Any]],
) -> bool:
    """auto, objective=latency: a candidate whose net is shown slower than the fp32 net at batch 1
    could never ship (kiln.compression.speed_check), so it is abandoned, its net deleted, the
    evidence recorded."""
    from kiln.compression import speed_check

    if not recipe.auto or recipe.objective != "latency":
        return False
    with watch.part(f"{variant['name']}: speed pre-check"):
        nets = staging / f"{FP32}.net.onnx", staging / variant["net_onnx"]
        speedup = speed_check.slower_than_fp32(*nets, example, rounds=30)
    if speedup is None:
        return False
    reason = speed_check.describe(speedup)
    say(f"{variant['name']}: abandoned ({reason})")
    abandoned.append(
        {
            "name": variant["name"],
            "steps": variant["steps"],
            "params": variant["params"],
            "abandoned": reason,
            "speedup": {str(speed_check.BATCH): speedup},
            "notes": variant["notes"],
            **{key: variant[key] for key in ("int8_search",) if key in variant},  # static int8's attempts
        }
    )
    if variant.get("precision") != "fp32":  # its own quantized net; a pruned fp32 one may serve others
        (staging / variant["net_onnx"]).unlink(missing_ok=True)
    return True


def abandoned_record(candidate: Any, source: dict[str, Any]) -> dict[str, Any]:
    """A candidate given up on during its pruning fine-tune, for the report."""
    return {
        "name": candidate.name,
        "steps": candidate.step_names,
        "params": source["params"],
        "abandoned": source["abandoned"],
        "budget_drops": source["budget_drops"],  # before the fine-tune, then after each epoch
        "notes": source["notes"],
    }


class BudgetOnce:
    """The budget a pruned auto candidate's fine-tune is held to, as the export's gate will hold
    it (kiln.compression.choose: gate_metric, metric_unit): the uncompressed model's own
    validation metric is measured once, when the first pruning needs it, unless `scored()` already
    has it (the int8 search's score of the same torch model: no second validation pass). None when
    the module does not log the metric."""

    def __init__(
        self,
        recipe: Recipe,
        monitor: dict[str, str],
        module: Any,
        datamodule: Any,
        trainer_settings: dict[str, Any],
        watch: Any,
        scored: Callable[[], dict[str, float] | None] = lambda: None,
    ) -> None:
        self.recipe, self.monitor, self.watch = recipe, monitor, watch
        self.module, self.datamodule, self.trainer_settings = module, datamodule, trainer_settings
        self.scored = scored
        self.budget: Any = None
        self.measured = False

    def get(self) -> Any:
        from kiln import contract
        from kiln.compression.choose import gate_metric, metric_unit
        from kiln.compression.pruning import Budget

        if not self.measured:
            self.measured = True
            logged = self.scored() or self.validate()
            task = contract.task(self.datamodule, self.module)
            metric, mode = gate_metric(getattr(self.recipe, "metric", None), self.monitor, task, logged)
            if metric in logged:
                unit = metric_unit(metric, self.recipe.metric_unit)
                self.budget = Budget(metric, mode, unit, self.recipe.max_metric_drop, logged[metric])
        return self.budget

    def validate(self) -> dict[str, float]:
        from kiln.compression import pruning

        with self.watch.part("baseline: validate for the pruning budget"):
            settings = pruning.one_device_settings(self.trainer_settings, self.module)
            return pruning.validate(self.module, self.datamodule, settings)


class Calibration:
    """Calibration inputs for static int8, drawn from the datamodule's training loader once per
    (batches, batch size): loading images costs more than quantizing."""

    def __init__(self, datamodule: Any, seed: int) -> None:
        self.datamodule = datamodule
        self.seed = seed
        self.drawn: dict[tuple[int, int], list[np.ndarray]] = {}

    def __call__(self, batches: int, batch_size: int) -> list[np.ndarray]:
        from kiln.compression.quantization import calibration_from_loader

        if (batches, batch_size) not in self.drawn:
            self.drawn[batches, batch_size] = calibration_from_loader(
                self.datamodule, batches, batch_size, seed=self.seed
            )
        return self.drawn[batches, batch_size]


def save_onnx(model: Any, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    from kiln.errors import KilnError
    from kiln.runs import read_json

    path = RunLayout(directory).manifest
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except KilnError as exc:
        raise KilnError(f"{exc}; run kiln compress run={directory} again") from exc
