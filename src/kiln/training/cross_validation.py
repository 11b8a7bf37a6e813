"""`kiln train cv.folds=K`: k-fold cross-validation, one fold after another in this process.

    kiln train data=table data.name=wine cv.folds=5

Steps: check the setting and that the data can be cut into K folds -> for each fold, a full
`train_once` (fit, test the best checkpoint) with `data.num_folds=K data.fold=i` in its own run
directory `<run>/fold_i/` -> cv.json in `<run>/` with each fold's test metrics and best score, and
the mean and std of each -> print them.

The test split is held out before the folds are cut (kiln.data.splits), so every fold is scored on
the same test rows and the spread across folds is the spread of the model, not of the test set.
Each fold is a complete run directory (run.json, .hydra/, checkpoints/, tensorboard/), so
`kiln report`, `kiln tensorboard` and `kiln compress run=<run>/fold_i` work on it as on any run.
Compression and export are skipped: cross-validation estimates how well the recipe generalizes; the
model to ship is trained afterwards with the chosen settings, without cv.folds.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf, read_write

from kiln.errors import KilnError
from kiln.runs import RunLayout
from kiln.training.settings import CrossValidationSettings, TrainSettings

REFIT_DIR = "refit"  # the refit's run directory, beside the folds (cv.refit=true)


def cross_validate(settings: CrossValidationSettings, run_dir: Path) -> dict[str, Any]:
    """Train and test every fold, write cv.json in `run_dir`; returns the mean of every metric."""
    from lightning.pytorch.utilities import rank_zero_only

    from kiln import tracking

    check_data_supports_folds(settings)
    writer = rank_zero_only.rank == 0  # type: ignore[attr-defined]
    config = settings.run.config  # the trackers read their own settings from it
    # logger=mlflow: one parent run, the folds' and the refit's runs nested under it
    with tracking.parent_run(config, f"cv {run_dir.name}", "cross-validation") as parent:
        record = CrossValidationRecord(run_dir, settings.folds, settings.run.monitor, writer)
        _cross_validate(settings, record)
        summary = {f"mean/{k}": v for k, v in record.fields["mean"].items()}
        summary.update({f"std/{k}": v for k, v in record.fields["std"].items()})
        tracking.log_summary(config, parent, run_dir, summary)
    return dict(record.fields["mean"])


class CrossValidationRecord:
    """cv.json: each fold's result as it completes, then the mean and std, and the refit."""

    def __init__(self, run_dir: Path, folds: int, monitor: dict[str, str], writer: bool) -> None:
        self.run_dir, self.monitor, self.writer = run_dir, monitor, writer
        self.fields: dict[str, Any] = {
            "status": "running",
            "folds": folds,
            "monitor": monitor,
            "runs": [],
            "mean": {},
            "std": {},
            "std_ddof": 0,  # numpy's default: the spread of these K folds, not an estimate beyond them
            "error": None,
        }

    def save(self) -> None:
        from kiln.runs import write_atomically

        if self.writer:
            write_atomically(RunLayout(self.run_dir).cv_record, json.dumps(self.fields, indent=2) + "\n")

    def add_fold(self, fold: int, fold_dir: Path, test_metrics: dict[str, float]) -> None:
        self.fields["runs"].append(fold_result(fold, fold_dir, self.monitor, test_metrics))
        self.save()

    def failed(self, error: str) -> None:
        self.fields.update(status="failed", error=error)
        self.save()


def _cross_validate(settings: CrossValidationSettings, record: CrossValidationRecord) -> None:
    """Every fold, then the mean and std over them, then the refit (cv.refit=true); cv.json says
    how far it got, and why it stopped if it did."""
    record.save()
    started = time.perf_counter()
    try:
        for fold in range(settings.folds):
            train_fold(settings, fold, record)
    except BaseException as exc:
        record.failed(f"{type(exc).__name__}: {exc}")
        raise
    record.fields.update(**summarize(record.fields["runs"], settings.run.monitor))
    if settings.refit:
        record.fields["refit"] = {"status": "running", "run_dir": REFIT_DIR}
        record.save()
        try:
            record.fields["refit"] = refit(settings.run, record.run_dir, record.fields["runs"], record.writer)
        except BaseException as exc:
            record.fields["refit"]["status"] = "failed"
            record.failed(f"refit: {type(exc).__name__}: {exc}")
            raise
    record.fields["status"] = "completed"
    record.save()
    print_cv_summary(record.run_dir, record.fields, time.perf_counter() - started)


def train_fold(settings: CrossValidationSettings, fold: int, record: CrossValidationRecord) -> None:
    """One fold as a complete run in `<run>/fold_<i>/`; a completed one is kept as it is when the
    cross-validation is continued (resumed or requeued)."""
    from kiln import tracking
    from kiln.training.run import train_once

    folds, fold_dir = settings.folds, RunLayout(record.run_dir).fold(fold).root
    resuming = is_continued(settings.run)
    if resuming and run_status(fold_dir) == "completed":
        print(f"\nkiln train: cross-validation fold {fold + 1}/{folds} completed already in {fold_dir}")
        record.add_fold(fold, fold_dir, {})
        return
    fold_settings = settings.run.for_fold(folds, fold).continuing(fold_dir, resuming)
    if record.writer:
        save_fold_hydra_files(fold_settings, folds, fold, fold_dir)
    print(f"\nkiln train: cross-validation fold {fold + 1}/{folds} in {fold_dir}", flush=True)
    try:
        with hydra_output_dir(fold_dir):  # ${hydra:runtime.output_dir} (checkpoints, TensorBoard)
            test_metrics = train_once(fold_settings, fold_dir)
    finally:
        tracking.finish_run(fold_settings.config, fold_dir)  # logger=mlflow: its record, its status
    record.add_fold(fold, fold_dir, test_metrics)


def refit(settings: TrainSettings, run_dir: Path, runs: list[dict[str, Any]], writer: bool) -> dict[str, Any]:
    """The final model: trained on the training and validation rows together, for the folds' mean
    best epoch (there is no held-out validation left to stop it early), tested on the same test
    split. It is an ordinary run in `<run>/refit/`, and the one compress and export ship."""
    from kiln.training.run import train_once

    epochs = max(1, round(float(np.mean([r["best_epoch"] for r in runs if r["best_epoch"]]))))
    refit_dir = run_dir / REFIT_DIR
    resuming = is_continued(settings)
    if resuming and run_status(refit_dir) == "completed":
        from kiln.runs import Run

        print(f"\nkiln train: the refit completed already in {refit_dir}", flush=True)
        tested = Run.read_record(refit_dir).get("test_metrics") or {}
        return {"status": "completed", "run_dir": REFIT_DIR, "epochs": epochs, "test_metrics": tested}
    refit_settings = settings.for_refit(epochs).continuing(refit_dir, resuming)
    if writer:
        overrides = [
            *_base_overrides(),
            "data.refit=true",
            f"trainer.max_epochs={epochs}",
            "~callbacks.early_stopping",
        ]
        save_hydra_files(refit_settings, overrides, refit_dir)
    print(f"\nkiln train: refit on train + validation for {epochs} epochs in {refit_dir}", flush=True)
    with hydra_output_dir(refit_dir):
        test_metrics = train_once(refit_settings, refit_dir)
    return {"status": "completed", "run_dir": REFIT_DIR, "epochs": epochs, "test_metrics": test_metrics}


def is_continued(settings: TrainSettings) -> bool:
    """A cross-validation continued (resume=auto) or requeued by SLURM: completed folds are kept."""
    from kiln import slurm

    return settings.resume.checkpoint is not None or slurm.is_requeued()


def run_status(directory: Path) -> str | None:
    """The status in `directory`'s run.json; None without one."""
    from kiln.runs import Run

    if not RunLayout(directory).record.is_file():
        return None
    status = Run.read_record(directory).get("status")
    return str(status) if status is not None else None


def check_data_supports_folds(settings: CrossValidationSettings) -> None:
    """The data module must take num_folds and fold, and the data must have enough rows of every class
    for `folds` folds: checked on the real data before any fold trains, so a bad cv.folds leaves no
    half-made fold directories behind."""
    from hydra.utils import get_object

    from kiln.builder import build

    folds, data = settings.folds, settings.run.config.data
    parameters = inspect.signature(get_object(data._target_)).parameters
    if "num_folds" not in parameters or "fold" not in parameters:
        raise KilnError(
            f"cv.folds={folds}: data._target_={data._target_} takes no num_folds and fold arguments; "
            "use one of kiln's data modules (data=digits, table, synthetic), or add those arguments"
        )
    try:  # the builder instantiates the user's DataModule from its config node: that is its job
        build("data", settings.run.for_fold(folds, 0).config.data).setup("fit")
    except KilnError as exc:
        # splits.py names the data module's own key; the user set cv.folds
        raise KilnError(str(exc).replace("data.num_folds", "cv.folds")) from exc


def save_fold_hydra_files(fold: TrainSettings, folds: int, index: int, fold_dir: Path) -> None:
    """`.hydra/config.yaml` and `overrides.yaml` as Hydra writes them for a run, so a fold is a run
    directory like any other (compress, export, report, api.load read these). The overrides are
    the command line that trains this fold alone."""
    save_hydra_files(fold, [*_base_overrides(), f"data.num_folds={folds}", f"data.fold={index}"], fold_dir)


def _base_overrides() -> list[str]:
    """The run's command line without what cross-validation sets itself."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("cv.")]
    return [o for o in overrides if not o.lstrip("+~").startswith(("data.num_folds=", "data.fold="))]


def save_hydra_files(settings: TrainSettings, overrides: list[str], directory: Path) -> None:
    from kiln.runs import write_atomically

    layout = RunLayout(directory)
    write_atomically(layout.saved_config, OmegaConf.to_yaml(settings.config))
    write_atomically(layout.overrides, yaml.safe_dump(overrides, default_flow_style=False))


@contextmanager
def hydra_output_dir(directory: Path) -> Iterator[None]:
    """Point `${hydra:runtime.output_dir}` at a fold's directory while it trains.

    The checkpoint callback and the TensorBoard logger find their directories through that
    interpolation; changing it for the fold (and back after) keeps every config that uses it,
    the user's own included, writing inside the fold's directory.
    """
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    previous = hydra.runtime.output_dir
    with read_write(hydra):  # type: ignore[arg-type]  # HydraConf is a DictConfig at run time
        hydra.runtime.output_dir = str(directory)
    try:
        yield
    finally:
        with read_write(hydra):  # type: ignore[arg-type]
            hydra.runtime.output_dir = previous


def fold_result(
    fold: int, fold_dir: Path, monitor: dict[str, str], test_metrics: dict[str, float]
) -> dict[str, Any]:
    from kiln.runs import Run

    record = Run.read_record(fold_dir) if RunLayout(fold_dir).record.exists() else {}
    best = record.get("best_checkpoint") or {}
    return {
        "fold": fold,
        "run_dir": fold_dir.name,
        "status": record.get("status"),
        "best_epoch": best.get("epoch"),
        "best_score": best.get("score"),
        "test_metrics": record.get("test_metrics") or test_metrics,
    }


def summarize(runs: list[dict[str, Any]], monitor: dict[str, str]) -> dict[str, dict[str, float]]:
    """Mean and std over the folds of the best monitored score and of every test metric."""
    columns: dict[str, list[float]] = {f"best {monitor['metric']}": [r["best_score"] for r in runs]}
    for name in sorted({name for r in runs for name in r["test_metrics"]}):
        columns[name] = [r["test_metrics"].get(name, float("nan")) for r in runs]
    values = {name: np.asarray(column, dtype=float) for name, column in columns.items()}
    return {
        "mean": {name: float(np.mean(v)) for name, v in values.items()},
        "std": {name: float(np.std(v)) for name, v in values.items()},
    }


def print_cv_summary(run_dir: Path, record: dict[str, Any], seconds: float) -> None:
    width = max(len(name) for name in record["mean"])
    lines = [
        f"  {name.ljust(width)}  {record['mean'][name]:.4f} +- {record['std'][name]:.4f}"
        for name in record["mean"]
    ]
    layout = RunLayout(run_dir)
    folds = f"{layout.fold(0).root.name}..{layout.fold(record['folds'] - 1).root.name}"
    print(
        f"\nkiln train: {record['folds']}-fold cross-validation done in {seconds:.1f} s\n"
        f"  run dir  {run_dir}  ({layout.cv_record.name}; folds in {folds})\n"
        f"  mean +- std over the folds:\n" + "\n".join(lines),
        flush=True,
    )
