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

import copy
import inspect
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kiln.errors import KilnError

CV_RECORD = "cv.json"
REFIT_DIR = "refit"


def cross_validate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and test every fold, write cv.json in `run_dir`; returns the mean of every metric."""
    from lightning.pytorch.utilities import rank_zero_only

    from kiln import tracking
    from kiln.training.run import check_monitor_setting

    folds = check_folds_setting(cfg)
    monitor = check_monitor_setting(cfg)
    check_data_supports_folds(cfg, folds)
    writer = rank_zero_only.rank == 0  # type: ignore[attr-defined]
    # logger=mlflow: one parent run, the folds' and the refit's runs nested under it
    with tracking.parent_run(cfg, f"cv {run_dir.name}", "cross-validation") as parent:
        record = _cross_validate(cfg, run_dir, folds, monitor, writer)
        summary = {f"mean/{k}": v for k, v in record["mean"].items()}
        summary.update({f"std/{k}": v for k, v in record["std"].items()})
        tracking.log_summary(cfg, parent, run_dir, summary)
    return dict(record["mean"])


def _cross_validate(
    cfg: DictConfig, run_dir: Path, folds: int, monitor: dict[str, str], writer: bool
) -> dict[str, Any]:
    from kiln import tracking
    from kiln.runs import write_atomically
    from kiln.training.run import train_once

    record: dict[str, Any] = {
        "status": "running",
        "folds": folds,
        "monitor": monitor,
        "runs": [],
        "mean": {},
        "std": {},
        "std_ddof": 0,  # numpy's default: the spread of these K folds, not an estimate beyond them
        "error": None,
    }

    def save() -> None:
        if writer:
            write_atomically(run_dir / CV_RECORD, json.dumps(record, indent=2) + "\n")

    save()
    started = time.perf_counter()
    resuming = is_continued(cfg)
    try:
        for fold in range(folds):
            fold_dir = run_dir / f"fold_{fold}"
            if resuming and run_status(fold_dir) == "completed":  # resumed or requeued: kept as it is
                print(
                    f"\nkiln train: cross-validation fold {fold + 1}/{folds} completed already in {fold_dir}"
                )
                record["runs"].append(fold_result(fold, fold_dir, monitor, {}))
                save()
                continue
            fold_cfg = continuing(fold_config(cfg, folds, fold), fold_dir, resuming)
            if writer:
                save_fold_hydra_files(fold_cfg, folds, fold, fold_dir)
            print(f"\nkiln train: cross-validation fold {fold + 1}/{folds} in {fold_dir}", flush=True)
            try:
                with hydra_output_dir(fold_dir):  # ${hydra:runtime.output_dir} (checkpoints, TensorBoard)
                    test_metrics = train_once(fold_cfg, fold_dir)
            finally:
                tracking.finish_run(fold_cfg, fold_dir)  # logger=mlflow: its record, its status
            record["runs"].append(fold_result(fold, fold_dir, monitor, test_metrics))
            save()
    except BaseException as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        save()
        raise
    record.update(**summarize(record["runs"], monitor))
    if cfg.cv.get("refit"):
        record["refit"] = {"status": "running", "run_dir": REFIT_DIR}
        save()
        try:
            record["refit"] = refit(cfg, run_dir, record["runs"], writer)
        except BaseException as exc:
            record.update(status="failed", error=f"refit: {type(exc).__name__}: {exc}")
            record["refit"]["status"] = "failed"
            save()
            raise
    record["status"] = "completed"
    save()
    print_cv_summary(run_dir, record, time.perf_counter() - started)
    return record


def refit(cfg: DictConfig, run_dir: Path, runs: list[dict[str, Any]], writer: bool) -> dict[str, Any]:
    """The final model: trained on the training and validation rows together, for the folds' mean
    best epoch (there is no held-out validation left to stop it early), tested on the same test
    split. It is an ordinary run in `<run>/refit/`, and the one compress and export ship."""
    from kiln.training.run import train_once

    epochs = max(1, round(float(np.mean([r["best_epoch"] for r in runs if r["best_epoch"]]))))
    refit_dir = run_dir / REFIT_DIR
    resuming = is_continued(cfg)
    if resuming and run_status(refit_dir) == "completed":
        from kiln.runs import Run

        print(f"\nkiln train: the refit completed already in {refit_dir}", flush=True)
        tested = Run.read_record(refit_dir).get("test_metrics") or {}
        return {"status": "completed", "run_dir": REFIT_DIR, "epochs": epochs, "test_metrics": tested}
    refit_cfg = continuing(refit_config(cfg, epochs), refit_dir, resuming)
    if writer:
        overrides = [
            *_base_overrides(),
            "data.refit=true",
            f"trainer.max_epochs={epochs}",
            "~callbacks.early_stopping",
        ]
        save_hydra_files(refit_cfg, overrides, refit_dir)
    print(f"\nkiln train: refit on train + validation for {epochs} epochs in {refit_dir}", flush=True)
    with hydra_output_dir(refit_dir):
        test_metrics = train_once(refit_cfg, refit_dir)
    return {"status": "completed", "run_dir": REFIT_DIR, "epochs": epochs, "test_metrics": test_metrics}


def refit_config(cfg: DictConfig, epochs: int) -> DictConfig:
    refit_cfg = copy.deepcopy(cfg)
    with open_dict(refit_cfg):
        refit_cfg.data.refit = True
        refit_cfg.data.num_folds = None
        refit_cfg.data.fold = 0
        refit_cfg.cv.folds = None
        refit_cfg.cv.refit = False
        refit_cfg.trainer.max_epochs = epochs
        refit_cfg.trainer.min_epochs = epochs
        if refit_cfg.callbacks is not None:
            refit_cfg.callbacks.early_stopping = None
    return refit_cfg


def is_continued(cfg: DictConfig) -> bool:
    """A cross-validation continued (resume=auto) or requeued by SLURM: completed folds are kept."""
    from kiln import slurm

    return cfg.resume is not None or slurm.is_requeued()


def run_status(directory: Path) -> str | None:
    """The status in `directory`'s run.json; None without one."""
    from kiln.runs import RUN_RECORD, Run

    if not (directory / RUN_RECORD).is_file():
        return None
    status = Run.read_record(directory).get("status")
    return str(status) if status is not None else None


def continuing(run_cfg: DictConfig, directory: Path, resuming: bool) -> DictConfig:
    """A fold's (or the refit's) config, continuing its own run in `directory` from its last
    checkpoint when the cross-validation is continued and the fold had started; fresh otherwise."""
    started = resuming and (directory / "run.json").is_file()
    with open_dict(run_cfg):
        run_cfg.resume = "auto" if started else None
        run_cfg.run_dir = str(directory) if started else None
    return run_cfg


def check_folds_setting(cfg: DictConfig) -> int:
    """cv.folds must be an integer >= 2; a cross-validation continues only as a whole (resume=auto
    with run_dir=<its directory>): completed folds are kept, a started one continues."""
    folds = cfg.cv.folds
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise KilnError(
            f"cv.folds={folds}: cross-validation needs an integer of at least 2 folds, e.g. cv.folds=5 "
            "(cv.folds=null trains one run)"
        )
    if cfg.resume is not None and (str(cfg.resume) != "auto" or not cfg.run_dir):
        raise KilnError(
            f"resume={cfg.resume}: a cross-validation continues as a whole, each fold from its own last "
            "checkpoint: kiln train run_dir=<its directory> resume=auto cv.folds=... (or resume one fold "
            "on its own: kiln train run_dir=<run>/fold_<i> resume=auto)"
        )
    return folds


def check_data_supports_folds(cfg: DictConfig, folds: int) -> None:
    """The data module must take num_folds and fold, and the data must have enough rows of every class
    for `folds` folds: checked on the real data before any fold trains, so a bad cv.folds leaves no
    half-made fold directories behind."""
    from hydra.utils import get_object

    from kiln.builder import build

    target = get_object(cfg.data._target_)
    parameters = inspect.signature(target).parameters
    if "num_folds" not in parameters or "fold" not in parameters:
        raise KilnError(
            f"cv.folds={folds}: data._target_={cfg.data._target_} takes no num_folds and fold arguments; "
            "use one of kiln's data modules (data=digits, table, synthetic), or add those arguments"
        )
    try:
        build("data", fold_config(cfg, folds, 0).data).setup("fit")
    except KilnError as exc:
        # splits.py names the data module's own key; the user set cv.folds
        raise KilnError(str(exc).replace("data.num_folds", "cv.folds")) from exc


def fold_config(cfg: DictConfig, folds: int, fold: int) -> DictConfig:
    """The config of one fold: the run's own, with data.num_folds and data.fold set, cv.folds off."""
    fold_cfg = copy.deepcopy(cfg)
    with open_dict(fold_cfg):
        fold_cfg.data.num_folds = folds
        fold_cfg.data.fold = fold
        fold_cfg.cv.folds = None
    return fold_cfg


def save_fold_hydra_files(fold_cfg: DictConfig, folds: int, fold: int, fold_dir: Path) -> None:
    """`.hydra/config.yaml` and `overrides.yaml` as Hydra writes them for a run, so a fold is a run
    directory like any other (compress, export, report, api.load read these). The overrides are
    the command line that trains this fold alone."""
    save_hydra_files(fold_cfg, [*_base_overrides(), f"data.num_folds={folds}", f"data.fold={fold}"], fold_dir)


def _base_overrides() -> list[str]:
    """The run's command line without what cross-validation sets itself."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("cv.")]
    return [o for o in overrides if not o.lstrip("+~").startswith(("data.num_folds=", "data.fold="))]


def save_hydra_files(run_cfg: DictConfig, overrides: list[str], directory: Path) -> None:
    from kiln.runs import write_atomically

    hydra_dir = directory / ".hydra"
    write_atomically(hydra_dir / "config.yaml", OmegaConf.to_yaml(run_cfg))
    write_atomically(hydra_dir / "overrides.yaml", yaml.safe_dump(overrides, default_flow_style=False))


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

    record = Run.read_record(fold_dir) if (fold_dir / "run.json").exists() else {}
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
    print(
        f"\nkiln train: {record['folds']}-fold cross-validation done in {seconds:.1f} s\n"
        f"  run dir  {run_dir}  (cv.json; folds in fold_0..fold_{record['folds'] - 1})\n"
        f"  mean +- std over the folds:\n" + "\n".join(lines),
        flush=True,
    )
