"""From a tested checkpoint to a shipped model: compress, then export (kiln.compression.pipeline,
kiln.export.pipeline). `kiln train` calls `after_training` on rank 0; `kiln compress` and
`kiln export` call `compress_run` and `export_run`. Stages never import each other: what they
share lives here.

A failing gate never touches the training: run.json keeps `status: completed`, and its `delivery`
entry says what happened after it (shipped, or failed with the reason).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kiln.errors import KilnError
from kiln.interrupts import Interrupted
from kiln.runs import RunLayout

# Trainer settings of the run that a pruning fine-tune keeps (one device, no logger or checkpoints).
FINETUNE_TRAINER_KEYS = (
    "accelerator",
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "deterministic",
    "check_val_every_n_epoch",
    "limit_train_batches",
    "limit_val_batches",
)


def after_training(cfg: DictConfig, run_dir: Path | str) -> dict[str, Any] | None:
    """Compress and export a run `kiln train` just tested, with the run's `compress` and `export`
    settings. The report; None when the config has no compress/export groups or
    export.after_training is false. Raises KilnError when a gate fails."""
    from kiln.builder import plain
    from kiln.compression.recipes import read_recipe
    from kiln.export.pipeline import read_settings

    if "compress" not in cfg or "export" not in cfg or cfg.compress is None or cfg.export is None:
        return None
    settings = read_settings(plain(cfg.export))
    if not settings.after_training:
        return None
    return deliver(run_dir, read_recipe(plain(cfg.compress)), settings, key="run_dir")


def deliver(
    run_dir: Path | str,
    recipe: Any,
    settings: Any,
    *,
    key: str = "run",
    export_after: bool = True,
    again: str | None = None,
) -> dict[str, Any]:
    """Compress with `recipe`, then export (unless `export_after` is false): the report, or the
    manifest. `recipe=None` exports the variants of the run's last compression (`kiln export`),
    or the uncompressed model when there was none. `again` is the command that redoes it, said
    when a signal stops it (default: kiln compress, then kiln export, on the run)."""
    from kiln.export.from_run import open_run
    from kiln.runs import locked

    run = open_run(run_dir, key=key)
    with locked(run.directory, key):  # one writer at a time, as for training
        return _deliver(run, recipe, settings, export_after, again)


def _deliver(run: Any, recipe: Any, settings: Any, export_after: bool, again: str | None) -> dict[str, Any]:
    from kiln.compression.pipeline import read_manifest
    from kiln.compression.recipes import read_recipe
    from kiln.errors import describe_resource_fault
    from kiln.runs import Run

    quiet()
    remove_abandoned(run.directory)
    try:
        datamodule, module = load(run)
        manifest = read_manifest(run.directory) if recipe is None else None
        if manifest is not None and missing_variant_files(run.directory, manifest):
            recipe = recorded_recipe(run, manifest)
            manifest = None
        if manifest is None:
            manifest = compress_run(
                run, datamodule, module, recipe or read_recipe({"recipe": "none"}), settings
            )
        if not export_after:
            return manifest
        report = export_run(run, datamodule, module, manifest, settings)
        kept = bool(manifest.get("keep_variants")) or report["status"] != "passed"
        if not kept:
            remove_variant_files(run.directory, manifest, report)
    except KilnError as exc:
        record(run.directory, {"status": "failed", "reason": str(exc)})
        raise
    except (OSError, MemoryError) as exc:  # a full disk, a file size limit, memory: said in one line
        reason = describe_resource_fault(exc)
        if reason is None:
            raise
        Run.reopen(run.directory).update_after(exc, delivery={"status": "failed", "reason": reason})
        raise
    except Interrupted as exc:  # the training stays completed; only what follows it is to redo
        if again is None:
            again = f"kiln export run={run.directory}"
            if recipe is not None:
                again = f"kiln compress run={run.directory} compress=... (as in its config), then {again}"
        record(run.directory, {"status": "interrupted", "reason": f"interrupted by {exc.signal_name}"})
        what = "export" if recipe is None else "compression" if not export_after else "compression and export"
        raise exc.said(
            f"interrupted by {exc.signal_name} during {what}; nothing half-written was left and the "
            f"trained, tested run is kept as it was (best checkpoint, and any {RunLayout.MODEL} shipped before); "
            f"redo it with: {again}"
        ) from None
    record(
        run.directory,
        {
            "status": report["status"],
            "shipped": report["shipped"],
            "reason": report["reason"],
            "variant_files": "kept" if kept else "removed (compress.keep_variants=false)",
        },
    )
    return report


def missing_variant_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """The variants' nets and weights the manifest lists that are gone (removed after a delivery)."""
    listed = [v.get(key) for v in manifest.get("variants", []) for key in ("net_onnx", "weights")]
    return [name for name in listed if name and not (RunLayout(directory).compress / name).is_file()]


def recorded_recipe(run: Any, manifest: dict[str, Any]) -> Any:
    """The recipe of the run's last compression (recorded in its manifest; before kiln recorded it,
    the run's saved config's), to build its variants again from the best checkpoint."""
    from kiln.builder import plain
    from kiln.compression.recipes import read_recipe

    config = manifest.get("recipe_config") or plain(run.saved_config().get("compress") or {"recipe": "none"})
    print(
        f"kiln export: the variants' files were removed after the last delivery "
        f"(compress.keep_variants=false); compressing again from the best checkpoint with recipe "
        f"{config.get('recipe', 'none')}",
        flush=True,
    )
    return read_recipe(config)


def remove_variant_files(directory: Path, manifest: dict[str, Any], report: dict[str, Any]) -> None:
    """After a delivery that shipped: each variant's net and weights (compress/) and deployable file
    (export/) go; model.onnx, the reports, compress/manifest.json and the checkpoints stay. The
    report keeps every variant's numbers; `kiln export` builds the variants again when it needs them."""
    layout = RunLayout(directory)
    files = [
        layout.compress / name
        for variant in manifest.get("variants", [])
        for name in (variant.get("net_onnx"), variant.get("weights"))
        if name
    ]
    files += [directory / variant["file"] for variant in report.get("variants", []) if variant.get("file")]
    freed = 0
    for path in files:
        if path.is_file():
            freed += path.stat().st_size
            path.unlink()
    export_dir = layout.export
    if export_dir.is_dir() and not any(export_dir.iterdir()):
        export_dir.rmdir()
    print(
        f"kiln export: removed the variants' files ({freed / 2**20:.1f} MiB); the report keeps their "
        "numbers (compress.keep_variants=true keeps the files)",
        flush=True,
    )


# What a compress or export killed outright (SIGKILL, a power cut) leaves: its staging folders, the
# old folder of a swap it had begun (kiln.runs.swap_in), and temp files of writes it had begun
# (kiln.runs.replacing: `.<name>.<random>.tmp`).
ABANDONED = (".compress.tmp-*", ".export.tmp-*", ".compress.old-*", ".export.old-*", ".*.tmp")


def remove_abandoned(directory: Path) -> None:
    """Delete what an earlier compress or export of this run left when it was killed. Called with
    the run's lock held: no other process writes the run now, so none of it is in use."""
    import shutil

    for pattern in ABANDONED:
        for path in directory.glob(pattern):
            if path.name.endswith(f"-{os.getpid()}"):
                continue  # this process's own (kiln train's export after training holds the lock too)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def load(run: Any) -> tuple[Any, Any]:
    """The run's datamodule and trained module (kiln.export.from_run.load_trained); a failure that
    is not already a KilnError becomes one, naming the run, so it is recorded and said in one line."""
    from kiln.errors import one_line
    from kiln.export.from_run import load_trained

    try:
        return load_trained(run)
    except KilnError:
        raise
    except Exception as exc:
        raise KilnError(
            f"run={run.directory}: cannot rebuild the trained model from its saved config and best "
            f"checkpoint ({type(exc).__name__}: {one_line(str(exc))})"
        ) from exc


def compress_run(run: Any, datamodule: Any, module: Any, recipe: Any, settings: Any) -> dict[str, Any]:
    from kiln.compression.pipeline import compress

    return compress(
        run.directory,
        module,
        datamodule,
        recipe,
        monitor=run.monitor,
        opset=settings.opset,
        exporter=settings.exporter,
        seed=int(run.saved_config().seed),
        finetune_trainer=finetune_trainer_settings(run.saved_config()),
        say=lambda line: print(f"kiln compress: {line}", flush=True),
        warn=lambda line: print(f"kiln compress: warning: {line}", file=sys.stderr, flush=True),
    )


def export_run(
    run: Any, datamodule: Any, module: Any, manifest: dict[str, Any], settings: Any
) -> dict[str, Any]:
    from kiln.export.pipeline import export

    with kept_until_shipped(run.directory):
        return export(
            run,
            module,
            datamodule,
            manifest,
            settings,
            say=lambda line: print(f"kiln export: {line}", flush=True),
        )


@contextmanager
def kept_until_shipped(directory: Path) -> Iterator[None]:
    """The shipped model and its report as they were, put back if the block runs out of disk,
    file size or memory; kept as hard links meanwhile (no space needed, on a full disk too).
    What export ships is replaced one file at a time: a write that fails part-way (a full disk)
    would otherwise leave a new model beside an old report, or the reverse."""
    kept = {
        path: path.with_name(f".{path.name}.kept-{os.getpid()}.tmp") for path in RunLayout(directory).shipped
    }
    for shipped, copy in kept.items():
        copy.unlink(missing_ok=True)
        if shipped.exists():
            os.link(shipped, copy)
    try:
        yield
    except (OSError, MemoryError):
        for shipped, copy in kept.items():
            if copy.exists():
                os.replace(copy, shipped)
            else:
                shipped.unlink(missing_ok=True)  # new: there was none before
        raise
    finally:
        for copy in kept.values():
            copy.unlink(missing_ok=True)


def finetune_trainer_settings(cfg: DictConfig) -> dict[str, Any]:
    """The run's own Trainer settings (accelerator, precision, accumulation, clipping, ...) for a
    pruning fine-tune, on one device of the run's accelerator."""
    from kiln.hardware import with_resolved_precision

    config = OmegaConf.to_container(cfg.trainer, resolve=True) if "trainer" in cfg else {}
    config = with_resolved_precision(dict(config)) if isinstance(config, dict) else {}
    settings = {key: config[key] for key in FINETUNE_TRAINER_KEYS if config.get(key) is not None}
    settings["devices"] = 1
    return settings


def record(directory: Path, outcome: dict[str, Any]) -> None:
    """run.json's `delivery` entry; the training's own status is left as it is."""
    from kiln.runs import Run

    Run.reopen(directory).update(delivery=outcome)


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
