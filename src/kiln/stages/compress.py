"""`kiln compress`: smaller or faster variants of a run's best checkpoint, then (by default) export.

    kiln compress run=runs/train/<run> compress=prune_structured
    kiln compress run=runs/train/<run> compress=auto compress.max_metric_drop=0.5
    kiln compress run=runs/train/<run> compress=prune_structured compress.steps=[prune_structured,quantize_static]

Steps: read the recipe (every setting checked before anything loads) -> open the run (its own
saved config and best checkpoint, never today's conf/) -> the uncompressed net to ONNX -> for each
candidate: prune in torch and fine-tune, export the net, quantize it with onnxruntime -> write
<run>/compress/ (the nets and manifest.json) -> `kiln export` (check, measure, choose, ship
model.onnx), unless export_after=false.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kiln.config import stage
from kiln.errors import KilnError

COMPRESS_DIR = "compress"
MANIFEST = "manifest.json"


def _stage_dir(run: Any) -> str:
    """Where Hydra puts this stage's log: the run directory when it is one, else a temp directory
    (a mistyped run= must not leave an empty directory behind)."""
    import tempfile

    if run and (Path(str(run)) / ".hydra" / "config.yaml").is_file():
        return str(run)
    return str(Path(tempfile.gettempdir()) / "kiln-stage-logs")


if not OmegaConf.has_resolver("kiln_stage_dir"):
    OmegaConf.register_new_resolver("kiln_stage_dir", _stage_dir)


@stage("compress")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    from kiln.compression.recipes import read_recipe
    from kiln.export.from_run import load_trained, open_run
    from kiln.stages.build import plain
    from kiln.stages.export import export_variants, read_settings

    recipe = read_recipe(plain(cfg.compress))
    settings = read_settings(plain(cfg.export))
    run = open_run(cfg.run)
    quiet()
    datamodule, module = load_trained(run)
    manifest = compress_variants(run, datamodule, module, recipe, opset=settings.opset)
    if not cfg.export_after:
        print(
            f"kiln compress: variants in {run.directory / COMPRESS_DIR}; next: kiln export run={run.directory}"
        )
        return manifest
    return export_variants(run, datamodule, module, manifest, settings)


def compress_variants(run: Any, datamodule: Any, module: Any, recipe: Any, *, opset: int) -> dict[str, Any]:
    """Build every variant's net as ONNX (fp32 always, then the recipe's candidates) in
    <run>/compress/, with manifest.json describing them. Returns the manifest."""
    from kiln.compression.pruning import count_nonzero, count_parameters
    from kiln.compression.recipes import FP32
    from kiln.export.onnx_export import export_net

    started = time.perf_counter()
    task, input_shape = datamodule.task, list(datamodule.input_shape)
    staging = run.directory / f".{COMPRESS_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        say(f"exporting the uncompressed net ({count_parameters(module.net)} parameters)")
        save_onnx(export_net(module.net, task, input_shape, opset), staging / f"{FP32}.net.onnx")
        variants: list[dict[str, Any]] = [
            {
                "name": FP32,
                "steps": [],
                "precision": "fp32",
                "net_onnx": f"{FP32}.net.onnx",
                "weights": None,
                "params": count_parameters(module.net),
                "nonzero_params": count_nonzero(module.net),
                "notes": [],
            }
        ]
        pruned: dict[
            tuple[Any, ...], dict[str, Any]
        ] = {}  # candidates that share pruning steps share the work
        for candidate in recipe.candidates:
            source = variants[0]
            if candidate.prune_steps:
                key = tuple(step.identity() for step in candidate.prune_steps)
                if key not in pruned:
                    pruned[key] = prune(
                        run, datamodule, module, candidate.prune_steps, staging, f"pruned{len(pruned)}", opset
                    )
                source = pruned[key]
            variant = {
                **source,
                "name": candidate.name,
                "steps": [s.kind for s in candidate.steps],
                "notes": list(source["notes"]),
            }
            step = candidate.quantize_step
            if step is not None:
                variant.update(
                    quantize(
                        datamodule,
                        step,
                        staging / source["net_onnx"],
                        staging / f"{candidate.name}.net.onnx",
                        run.cfg.seed,
                    )
                )
                variant["notes"] = [*variant["notes"], *variant.pop("warnings")]
            variants.append(variant)
        manifest = {
            "recipe": recipe.name,
            "max_metric_drop": recipe.max_metric_drop,
            "wanted": recipe.candidates[0].name
            if not recipe.auto and recipe.candidates
            else (FP32 if not recipe.auto else None),
            "monitor": run.monitor,
            "opset": opset,
            "variants": variants,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        target = run.directory / COMPRESS_DIR
        old = run.directory / f".{COMPRESS_DIR}.old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def prune(
    run: Any, datamodule: Any, module: Any, steps: list[Any], staging: Path, name: str, opset: int
) -> dict[str, Any]:
    """Apply pruning steps to a copy of the module (fine-tuning after each), export the net, save its weights."""
    import torch

    from kiln.compression import pruning
    from kiln.export.onnx_export import export_net

    work = copy.deepcopy(module)
    notes = []
    monitor = run.monitor
    for step in steps:
        s = step.settings
        before = pruning.count_parameters(work.net)
        if step.kind == "prune_structured":
            work.net = pruning.prune_structured(work.net, list(datamodule.input_shape), s["ratio"])
        else:
            work.net = pruning.prune_unstructured(work.net, s["amount"], s["scope"])
        say(f"{step.kind}: fine-tuning up to {s['finetune_epochs']} epochs on {monitor['metric']}")
        tuned = pruning.finetune(
            work,
            datamodule,
            epochs=s["finetune_epochs"],
            patience=s["patience"],
            monitor=monitor["metric"],
            mode=monitor["mode"],
            lr_scale=s["lr_scale"],
        )
        if step.kind == "prune_structured":
            after = pruning.count_parameters(work.net)
            notes.append(
                f"prune_structured ratio {s['ratio']}: parameters {before} -> {after} "
                f"({after / before:.0%}); fine-tuned {tuned['epochs']} epochs (best {monitor['metric']}={_fmt(tuned['best_score'])})"
            )
        else:
            pruning.make_permanent(work.net)
            notes.append(
                f"prune_unstructured amount {s['amount']} ({s['scope']}): weight sparsity "
                f"{pruning.weight_sparsity(work.net):.0%}, fine-tuned {tuned['epochs']} epochs; a dense ONNX file "
                "keeps its size and speed (zeros are stored and multiplied like any weight)"
            )
    work.eval()
    save_onnx(
        export_net(work.net, datamodule.task, list(datamodule.input_shape), opset),
        staging / f"{name}.net.onnx",
    )
    torch.save(work.net.state_dict(), staging / f"{name}.pt")
    return {
        "precision": "fp32",
        "net_onnx": f"{name}.net.onnx",
        "weights": f"{name}.pt",
        "params": pruning.count_parameters(work.net),
        "nonzero_params": pruning.count_nonzero(work.net),
        "sparsity": round(pruning.weight_sparsity(work.net), 4),
        "notes": notes,
    }


def quantize(datamodule: Any, step: Any, source: Path, target: Path, seed: int) -> dict[str, Any]:
    from kiln.compression import quantization

    s = step.settings
    if step.kind == "quantize_dynamic":
        say("quantize_dynamic: onnxruntime dynamic int8")
        warnings = quantization.quantize_dynamic(source, target, per_channel=s["per_channel"])
        for warning in warnings:
            print(f"kiln compress: warning: {warning}", file=sys.stderr)
    else:
        features, _ = datamodule.split_tensors("train")
        batches = quantization.calibration_batches(
            features.numpy(), s["calibration_batches"], s["calibration_batch_size"], seed
        )
        say(f"quantize_static: QDQ int8, calibrated on {sum(len(b) for b in batches)} training rows")
        quantization.quantize_static(source, target, "input", batches, per_channel=s["per_channel"])
        warnings = []
    return {"precision": "int8", "net_onnx": target.name, "warnings": warnings}


def save_onnx(model: Any, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / COMPRESS_DIR / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KilnError(f"{path}: unreadable ({exc}); run kiln compress run={directory} again") from exc
    return manifest


def quiet() -> None:
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def say(line: str) -> None:
    print(f"kiln compress: {line}", flush=True)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run_after_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """What `kiln train` calls after testing, on rank 0: compress + export with the run's own
    `compress` and `export` settings. See kiln.stages.export.after_training."""
    from kiln.stages.export import after_training

    return after_training(cfg, run_dir)


if __name__ == "__main__":
    sys.exit(main())
