"""`kiln export`: every variant to one verified, measured ONNX file; the chosen one ships as model.onnx.

    kiln export run=runs/train/<run>                 the variants of the last `kiln compress` (or fp32)
    kiln export run=runs/train/<run> export.threads=1

Steps: open the run -> for each variant in <run>/compress/manifest.json: add the raw-row table
preprocessing and the head, write metadata, onnx.checker, an onnxruntime session -> check it
(fp32: parity with PyTorch within export.atol; int8: its metric on the test split) -> measure it
(validation and test metrics, size, parameters, latency at batch 1 and 256) -> choose (the
recipe's rule, kiln/compression/choose.py) -> write <run>/export/, report.{json,md,png},
TensorBoard, and model.onnx. If the chosen variant fails a check or the metric budget, nothing is
written as model.onnx and the stage exits non-zero with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

import kiln
from kiln.config import stage
from kiln.errors import KilnError
from kiln.stages import compress as _compress_stage  # noqa: F401  (registers the kiln_stage_dir resolver)

EXPORT_DIR = "export"
MODEL = "model.onnx"
BATCHES = (1, 256)


@dataclass(frozen=True)
class ExportSettings:
    opset: int = 20
    atol: float = 1e-4
    latency_repeats: int = 30
    threads: int | None = None
    after_training: bool = True


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
    if not isinstance(settings.atol, int | float) or settings.atol <= 0:
        raise KilnError(f"export.atol={settings.atol}: must be > 0, e.g. 1e-4")
    if not isinstance(settings.latency_repeats, int) or settings.latency_repeats < 1:
        raise KilnError(f"export.latency_repeats={settings.latency_repeats}: must be an integer >= 1")
    if settings.threads is not None and (not isinstance(settings.threads, int) or settings.threads < 1):
        raise KilnError(
            f"export.threads={settings.threads}: must be null (library default) or an integer >= 1"
        )
    return settings


@stage("export")
def main(cfg: DictConfig) -> dict[str, Any]:
    from kiln.compression.recipes import read_recipe
    from kiln.export.from_run import load_trained, open_run
    from kiln.stages.build import plain
    from kiln.stages.compress import compress_variants, quiet, read_manifest

    settings = read_settings(plain(cfg.export))
    run = open_run(cfg.run)
    quiet()
    datamodule, module = load_trained(run)
    manifest = read_manifest(run.directory)
    if manifest is None:
        manifest = compress_variants(
            run, datamodule, module, read_recipe({"recipe": "none"}), opset=settings.opset
        )
    return export_variants(run, datamodule, module, manifest, settings)


def after_training(cfg: DictConfig, run_dir: Path | str) -> dict[str, Any] | None:
    """Compress and export a run that `kiln train` just tested, with the run's `compress` and
    `export` settings. Returns the report, None when the config has no compress/export groups or
    export.after_training is false; raises KilnError when a gate fails."""
    from kiln.compression.recipes import read_recipe
    from kiln.export.from_run import load_trained, open_run
    from kiln.stages.build import plain
    from kiln.stages.compress import compress_variants, quiet

    if "compress" not in cfg or "export" not in cfg or cfg.compress is None or cfg.export is None:
        return None
    settings = read_settings(plain(cfg.export))
    if not settings.after_training:
        return None
    recipe = read_recipe(plain(cfg.compress))
    run = open_run(run_dir, key="run_dir")
    quiet()
    datamodule, module = load_trained(run)
    manifest = compress_variants(run, datamodule, module, recipe, opset=settings.opset)
    return export_variants(run, datamodule, module, manifest, settings)


# -- the work ----------------------------------------------------------------------------------


def export_variants(
    run: Any, datamodule: Any, module: Any, manifest: dict[str, Any], settings: ExportSettings
) -> dict[str, Any]:
    import onnx
    import torch

    from kiln.compression.choose import choose, metric_drop
    from kiln.export import checks, measure
    from kiln.export.graphs import LOGITS, PREDICTION, assemble, set_metadata
    from kiln.export.report import log_tensorboard, write_report
    from kiln.stages.compress import COMPRESS_DIR

    started = time.perf_counter()
    task, class_names = datamodule.task, list(datamodule.class_names)
    monitor = manifest["monitor"]
    metric, mode = monitor["metric"], monitor["mode"]
    test_metric = "test/" + metric.split("/", 1)[-1]
    max_drop = float(manifest["max_metric_drop"])
    data = SplitInputs(datamodule)
    output_name = LOGITS if task == "classification" else PREDICTION

    with measure.Threads(settings.threads):
        # the baseline: torch eager fp32 of the best checkpoint, on preprocessed features
        val_x, val_y = datamodule.split_tensors("val")
        test_x, test_y = datamodule.split_tensors("test")
        baseline = {
            "name": "torch_fp32",
            "val_metrics": measure.scores(
                task, class_names, measure.torch_outputs(module, val_x, task), val_y.numpy(), "val"
            ),
            "test_metrics": measure.scores(
                task, class_names, measure.torch_outputs(module, test_x, task), test_y.numpy(), "test"
            ),
            "params": sum(p.numel() for p in module.net.parameters()),
            "size_bytes": run.best_checkpoint.stat().st_size,
            "latency_us": measure.torch_latency(module, test_x, BATCHES, settings.latency_repeats),
            "note": "torch eager fp32 of checkpoints/best.ckpt on preprocessed features (size: the .ckpt file, optimizer state included)",
        }
        base_val = baseline["val_metrics"][metric]
        base_test = baseline["test_metrics"][test_metric]

        staging = run.directory / f".{EXPORT_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            variants = []
            for entry in manifest["variants"]:
                name = entry["name"]
                path = staging / f"{name}.onnx"
                net_model = onnx.load(str(run.directory / COMPRESS_DIR / entry["net_onnx"]))
                model = assemble(net_model, task=task, class_names=class_names, table=data.table)
                set_metadata(model, base_metadata(run, datamodule, data, name, manifest["opset"]))
                onnx.save(model, str(path))
                checks.check_file(path)
                session = checks.open_session(path, settings.threads)
                val_out = checks.run_batched(session, data.feeds(session, "val"))[output_name]
                test_out = checks.run_batched(session, data.feeds(session, "test"))[output_name]
                val_metrics = measure.scores(task, class_names, val_out, val_y.numpy(), "val")
                test_metrics = measure.scores(task, class_names, test_out, test_y.numpy(), "test")
                variant = {
                    "name": name,
                    "steps": entry["steps"],
                    "precision": entry["precision"],
                    "file": f"{EXPORT_DIR}/{name}.onnx",
                    "size_bytes": path.stat().st_size,
                    "params": entry["params"],
                    "nonzero_params": entry.get("nonzero_params"),
                    "val_metrics": val_metrics,
                    "test_metrics": test_metrics,
                    "val_drop": metric_drop(base_val, val_metrics[metric], mode),
                    "test_drop": metric_drop(base_test, test_metrics[test_metric], mode),
                    "notes": entry.get("notes", []),
                }
                if entry["precision"] == "fp32":
                    torch_net = variant_net(run, module, entry)
                    frame_out = checks.run_batched(session, data.feeds(session, "parity"))[output_name]
                    with torch.inference_mode():
                        torch_out = measure.torch_outputs(torch_net, data.parity_features(), task)
                    result = checks.parity(frame_out, torch_out, task, settings.atol)
                    variant.update(
                        parity_max_abs=result.max_abs, passed=result.ok, check=f"parity: {result.describe()}"
                    )
                    variant["reason"] = "" if result.ok else f"parity failed: {result.describe()}"
                else:
                    ok = variant["test_drop"] <= max_drop + 1e-9
                    variant.update(
                        passed=ok,
                        check=f"int8, checked by {test_metric} on the test split: {test_metrics[test_metric]:.4f} "
                        f"against {base_test:.4f} (drop {variant['test_drop']:.2f} points, budget {max_drop:g})",
                        reason=""
                        if ok
                        else f"{test_metric} drops {variant['test_drop']:.2f} points on the test split, over {max_drop:g}",
                    )
                variant["latency_us"] = measure.ort_latency(
                    session, data.feeds(session, "test"), BATCHES, settings.latency_repeats
                )
                set_metadata(
                    model,
                    {
                        "kiln.monitor_value": f"{val_metrics[metric]:.6g}",
                        "kiln.test_metrics": {k: round(v, 6) for k, v in test_metrics.items()},
                    },
                )
                onnx.save(model, str(path))  # same graph, now with its measured metrics
                variant["size_bytes"] = path.stat().st_size
                variants.append(variant)
                print(f"kiln export: {describe(variant, test_metric)}", flush=True)

            choice = choose(
                variants, auto=manifest["recipe"] == "auto", wanted=manifest.get("wanted"), max_drop=max_drop
            )
            target = run.directory / EXPORT_DIR
            old = run.directory / f".{EXPORT_DIR}.old-{os.getpid()}"
            if target.exists():
                os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    report = {
        "run": str(run.directory),
        "recipe": manifest["recipe"],
        "monitor": monitor,
        "max_metric_drop": max_drop,
        "shipped": choice.name,
        "model": MODEL if choice.name else None,
        "status": "passed" if choice.name else "failed",
        "reason": choice.reason,
        "kiln_version": kiln.__version__,
        "config_hash": run.config_hash,
        "opset": manifest["opset"],
        "latency_repeats": settings.latency_repeats,
        "threads": settings.threads,
        "baseline": baseline,
        "variants": variants,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if choice.name:
        ship(run.directory / EXPORT_DIR / f"{choice.name}.onnx", run.directory / MODEL)
    write_report(run.directory, report)
    try:
        log_tensorboard(run.directory, report)
    except Exception as exc:  # the report files are the record; TensorBoard is a view of them
        print(f"kiln export: warning: TensorBoard not updated ({type(exc).__name__}: {exc})", file=sys.stderr)
    if not choice.name:
        raise KilnError(f"no model shipped: {choice.reason}; see {run.directory / 'report.md'}")
    shipped = next(v for v in variants if v["name"] == choice.name)
    print(
        f"kiln export: shipped {choice.name} as {run.directory / MODEL} ({choice.reason})\n"
        f"  {test_metric}={shipped['test_metrics'][test_metric]:.4f} (torch fp32 {base_test:.4f})  "
        f"size {shipped['size_bytes'] / 1024:.1f} KB  latency b256 {shipped['latency_us']['256']:.0f} us "
        f"(torch eager {baseline['latency_us']['256']:.0f} us)\n  report: {run.directory / 'report.md'}",
        flush=True,
    )
    return report


def ship(source: Path, target: Path) -> None:
    """Copy to a temp name beside the target, then rename: model.onnx is whole or absent."""
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(source, temp)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def variant_net(run: Any, module: Any, entry: dict[str, Any]) -> Any:
    """The torch net a fp32 variant was exported from: the best checkpoint's, or pruned weights."""
    import copy

    import torch

    from kiln.compression.pruning import fit_to_state_dict
    from kiln.export.onnx_export import Exported
    from kiln.stages.compress import COMPRESS_DIR

    if not entry.get("weights"):
        return Exported(module.net, module.task).eval()
    state = torch.load(run.directory / COMPRESS_DIR / entry["weights"], map_location="cpu", weights_only=True)
    return Exported(fit_to_state_dict(copy.deepcopy(module.net), state), module.task).eval()


def base_metadata(run: Any, datamodule: Any, data: SplitInputs, variant: str, opset: int) -> dict[str, Any]:
    return {
        "kiln.version": kiln.__version__,
        "kiln.config_hash": run.config_hash,
        "kiln.run": run.directory.name,
        "kiln.variant": variant,
        "kiln.task": datamodule.task,
        "kiln.class_names": list(datamodule.class_names),
        "kiln.feature_names": data.feature_names,
        "kiln.input_kind": "table" if data.table is not None else "array",
        "kiln.input_shape": list(datamodule.input_shape),
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


def describe(variant: dict[str, Any], test_metric: str) -> str:
    status = "passed" if variant["passed"] else f"FAILED ({variant['reason']})"
    return (
        f"{variant['name']:<24} {variant['precision']}  {test_metric}={variant['test_metrics'][test_metric]:.4f}  "
        f"drop(val)={variant['val_drop']:+.2f}  {variant['size_bytes'] / 1024:.1f} KB  "
        f"b1 {variant['latency_us']['1']:.0f} us  b256 {variant['latency_us']['256']:.0f} us  {status}"
    )


class SplitInputs:
    """What each split looks like to the exported model: raw rows for tables, arrays otherwise.

    The parity set is the test split, plus for tables two rows the training data never showed:
    every value missing, and categories never seen.
    """

    def __init__(self, datamodule: Any) -> None:
        from kiln.export.from_run import raw_split, table_state

        self.datamodule = datamodule
        self.table = table_state(datamodule)
        self.frames: dict[str, Any] = {}
        if self.table is not None:
            self.frames = {split: raw_split(datamodule, split) for split in ("val", "test")}
            self.frames["parity"] = with_unseen_rows(self.frames["test"], self.table)
            self.feature_names = list(self.table["numeric_columns"]) + list(self.table["categorical_columns"])
        else:
            self.feature_names = list(datamodule.feature_names)
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def feeds(self, session: Any, split: str) -> dict[str, np.ndarray]:
        from kiln.export.feeds import array_feeds, specs_of, table_feeds

        if split not in self._cache:
            specs = specs_of(session.get_inputs())
            if self.table is not None:
                self._cache[split] = table_feeds(self.frames[split], specs, source=f"{split} split")
            else:
                features, _ = self.datamodule.split_tensors("test" if split == "parity" else split)
                self._cache[split] = array_feeds(features.numpy(), specs[0])
        return self._cache[split]

    def parity_features(self) -> Any:
        """The parity rows as the torch pipeline sees them: kiln's Python preprocessing applied."""
        import torch

        if self.table is None:
            return self.datamodule.split_tensors("test")[0]
        from kiln.data.preprocessing import TablePreprocessor

        return torch.as_tensor(TablePreprocessor.from_state(self.table).transform(self.frames["parity"]))


def with_unseen_rows(frame: Any, table: dict[str, Any]) -> Any:
    import pandas as pd

    missing = {c: [np.nan] for c in frame.columns}
    unseen = {c: [frame[c].iloc[0]] for c in frame.columns}
    for column in table["categorical_columns"]:
        unseen[column] = ["kiln-never-seen"]
    return pd.concat([frame, pd.DataFrame(missing), pd.DataFrame(unseen)], ignore_index=True)


if __name__ == "__main__":
    sys.exit(main())
