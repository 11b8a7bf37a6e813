"""One training run in one directory: the work of `kiln train`, of each cross-validation fold and
of each search trial.

    train_once(TrainSettings.from_config(cfg), run_dir)

Steps: set up (start the run record, build data, model, trainer) -> fit (or resume) -> test the
best checkpoint -> deliver (TensorBoard extras, feature importance for tables, the drift baseline;
record and print the result). Only rank 0 writes files. The stage reads the settings
(kiln.training.settings); nothing here reads the config but the builders of the user's objects.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.builder import build, build_module, plain
from kiln.errors import KilnError
from kiln.training.settings import ReportSettings, ResumeSettings, TrainSettings


def train_once(
    settings: TrainSettings,
    run_dir: Path,
    extra_callbacks: list[Any] | None = None,
    save_config: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One run in `run_dir`: fit, test the best checkpoint, record it in run.json; its test metrics.

    `extra_callbacks` join the trainer's (kiln search adds its trial pruning). `save_config` writes
    the run's `.hydra/` when its record starts: at once for a new run, and for a run that exists
    already only once its resume is accepted, so that a refused resume changes nothing on disk."""
    from lightning.pytorch.utilities import rank_zero_only

    from kiln import tracking
    from kiln.runs import Run
    from kiln.training.distributed import one_distributed_job, relaunch_ranks_as_this_job

    started = time.perf_counter()
    quiet_lightning()
    relaunch_ranks_as_this_job()
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        tracking.check_server(
            settings.config
        )  # logger=mlflow: a server that does not answer stops the run here
    record = RecordStart.of(Run(run_dir, writer=rank_zero_only.rank == 0), settings, save_config)  # type: ignore[attr-defined]
    if not record.after_resume_check:
        record.start()
    with one_distributed_job(), record.run.recording():
        training = set_up(settings, record, extra_callbacks or [])
        fit(training)
        best, test_metrics = run_test(training)
        if training.trainer.is_global_zero:
            deliver(training, best, test_metrics, time.perf_counter() - started)
    return test_metrics


@dataclass(frozen=True)
class RecordStart:
    """When a run's record starts. A run that exists, or a new one that resumes a checkpoint,
    starts it only once the resume is accepted: a refused one leaves nothing behind
    (kiln.runs.undo_refused_start)."""

    run: Any  # kiln.runs.Run
    settings: TrainSettings
    save_config: Callable[[], None] | None
    previous: dict[str, Any]  # the existing run's record: a resumed run continues its MLflow run
    after_resume_check: bool

    @classmethod
    def of(cls, run: Any, settings: TrainSettings, save_config: Callable[[], None] | None) -> RecordStart:
        existing = run.has_record()
        previous = run.read_record(run.directory) if existing else {}
        return cls(run, settings, save_config, previous, existing or settings.resume.checkpoint is not None)

    def start(self) -> None:
        settings = self.settings
        self.run.start(
            stage="train", seed=settings.seed, monitor=settings.monitor, config_hash=settings.config_hash()
        )
        if self.save_config is not None and self.run.writer:
            self.save_config()


@dataclass(frozen=True)
class Training:
    """What one run trains with, once set up."""

    settings: TrainSettings
    run: Any  # kiln.runs.Run
    datamodule: Any
    module: Any
    trainer: Any
    checkpoint: Path | None  # the checkpoint the fit resumes from; None starts fresh


def set_up(settings: TrainSettings, record: RecordStart, extra_callbacks: list[Any]) -> Training:
    """Seed, data, model (checked against kiln's needs), the checkpoint to resume (checked before
    the record starts), the trackers and the trainer."""
    import lightning as L

    from kiln import tracking

    run = record.run
    L.seed_everything(settings.seed, workers=True, verbose=False)
    # The builder instantiates the user's DataModule from its config node: that is its job.
    datamodule = build("data", settings.config.data, seed=settings.seed)  # the run's seed, if it takes one
    datamodule.setup("fit")
    fingerprint = getattr(datamodule, "fingerprint", None)
    run.update(data_fingerprint=fingerprint)
    if settings.report.group_by:
        from kiln.training.groups import check_group_column

        check_group_column(datamodule, settings.report.group_by)
    module = build_module(settings.config, datamodule)
    check_trainable(module, datamodule)
    check_monitor_logged(settings.monitor["metric"], module)
    checkpoint = checkpoint_to_resume(settings, record, module, fingerprint)
    if record.after_resume_check:  # the resume is accepted (or nothing to resume): record it now
        record.start()
    if checkpoint is not None:
        run.update(resumed_from=str(checkpoint))
    trackers = tracking.build_trackers(settings.config, run.directory, record.previous)  # conf/logger/
    trainer = build_trainer(settings, run, extra_callbacks, datamodule, module, trackers.loggers)
    tracking.start(trackers, settings.config, run)  # each tracker: the run's record and config
    return Training(settings, run, datamodule, module, trainer, checkpoint)


def checkpoint_to_resume(
    settings: TrainSettings, record: RecordStart, module: Any, fingerprint: str | None
) -> Path | None:
    """resume=...'s checkpoint, checked to fit the model and the data; a requeued SLURM job
    continues its own run (same directory, named by the job) from its newest checkpoint."""
    from kiln import slurm
    from kiln.training.checkpoints import resume_checkpoint

    resume = settings.resume
    requeued = resume.checkpoint is None and slurm.is_requeued()
    return resume_checkpoint(
        "auto" if requeued else resume.checkpoint,
        resume.run_dir_given or requeued,
        record.run,
        check=lambda path, saved: check_resumable(
            path, saved, module, resume, fingerprint, record.previous or record_beside(path)
        ),
    )


def fit(training: Training) -> None:
    """trainer.fit, from the checkpoint to resume; its throughput recorded."""
    trainer, run = training.trainer, training.run
    fit_started, first_epoch = time.perf_counter(), trainer.current_epoch
    trainer.fit(
        training.module, datamodule=training.datamodule, ckpt_path=training.checkpoint, weights_only=True
    )
    seconds = time.perf_counter() - fit_started
    run.update(throughput=throughput(trainer, training.datamodule, first_epoch, seconds))
    if trainer.interrupted:
        raise KilnError(
            f"training was interrupted; continue it with: kiln train run_dir={run.directory} resume=auto"
        )


def run_test(training: Training) -> tuple[dict[str, Any], dict[str, float]]:
    """The best checkpoint by the monitor, and its metrics on the test split."""
    best = best_checkpoint(training.trainer, training.settings.monitor)
    tested = training.trainer.test(
        training.module,
        datamodule=training.datamodule,
        ckpt_path=best["path"],
        weights_only=True,
        verbose=False,
    )
    return best, {name: float(value) for name, value in sorted(tested[0].items())}


def deliver(training: Training, best: dict[str, Any], test_metrics: dict[str, float], seconds: float) -> None:
    """On rank 0: TensorBoard's extras, feature importance (tables), the drift baseline, metrics by
    group; the completed record, and the summary printed."""
    trainer, module, datamodule = training.trainer, training.module, training.datamodule
    settings, run = training.settings, training.run
    log_final_tensorboard(
        trainer, module, datamodule, settings.hparams(), {**test_metrics, "best/score": best["score"]}
    )
    importance = feature_importance(trainer, module, datamodule, settings)  # {} unless a table
    baseline = save_drift_baseline(datamodule, run.directory)
    groups = metrics_by_group(trainer, module, datamodule, settings.report)  # {} without report.group_by
    run.update(
        drift_baseline=baseline,
        status="completed",
        finished=_now(),
        epochs=trainer.current_epoch,
        best_checkpoint=best,
        test_metrics=test_metrics,
        **importance,
        **groups,
    )
    print_summary(run.directory, best, settings.monitor, test_metrics, seconds)


# -- steps -------------------------------------------------------------------------------------


def check_resumable(
    path: Path,
    checkpoint: dict[str, Any],
    module: Any,
    resume: ResumeSettings,
    fingerprint: str | None = None,
    record: dict[str, Any] | None = None,
) -> None:
    """The checkpoint fits the model (kiln.training.checkpoints.check_fits), was trained on the
    data there is now (`fingerprint` against the `record` of the run that wrote it), and has
    something left to do: epochs to train (Lightning refuses a checkpoint past max_epochs with a
    traceback, and would retest a finished one), or, for a run stopped after its last epoch but
    before its best checkpoint was tested and recorded (a signal during the test), the test."""
    from kiln.training.checkpoints import check_fits, epochs_trained, stopped_early

    check_fits(path, checkpoint, module)
    check_same_data(path, fingerprint, record or {}, resume)
    untested = (record or {}).get("status") not in ("completed", None)
    max_epochs = resume.max_epochs
    done = epochs_trained(checkpoint)
    finished = isinstance(max_epochs, int) and max_epochs >= 0 and done >= max_epochs
    if finished and not (untested and done == max_epochs):
        raise KilnError(
            f"trainer.max_epochs={max_epochs}: {path} has trained {done} epochs already, nothing is left to "
            f"train; to continue it, give a larger trainer.max_epochs, e.g. "
            f"trainer.max_epochs={done + max(max_epochs, 10)}"
        )
    patience = resume.patience
    waited = stopped_early(checkpoint)
    if waited is not None and isinstance(patience, int) and waited >= patience and not untested:
        raise KilnError(
            f"callbacks.early_stopping.patience={patience}: {path} was stopped early after {done} epochs "
            f"({waited} without improvement), nothing is left to train; to continue it, give a larger "
            f"patience, e.g. callbacks.early_stopping.patience={waited + max(patience, 5)}"
        )


def check_same_data(
    path: Path, fingerprint: str | None, record: dict[str, Any], resume: ResumeSettings
) -> None:
    """A checkpoint continues on the data it was trained on: its best epoch was scored on that
    validation split. Changed data is refused unless `resume_data_changed=accept`."""
    before = record.get("data_fingerprint")
    if not before or not fingerprint or before == fingerprint or resume.data_changed == "accept":
        return
    raise KilnError(
        f"data: {resume.data_source} has changed since {path} was trained (data fingerprint "
        f"{before} then, {fingerprint} now): its best epoch was scored on the old validation split; "
        "continue on the new data anyway with resume_data_changed=accept, or start a new run"
    )


def record_beside(checkpoint: Path) -> dict[str, Any]:
    """The record of the run a checkpoint file lies in (<run>/checkpoints/x.ckpt), or {}."""
    from kiln.runs import RunLayout, read_json

    path = RunLayout(checkpoint.resolve().parent.parent).record
    try:
        return read_json(path) if path.is_file() else {}
    except KilnError:
        return {}


def quiet_lightning() -> None:
    """Lightning's start-up chatter (GPU available..., tips) and warnings that do not apply to
    kiln's setup (epoch-level logging, in-memory batches). Its real warnings still show."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # logger=mlflow: "Experiment with name ... not found. Creating it." (kiln names the experiment)
    logging.getLogger("lightning.pytorch.loggers.mlflow").setLevel(logging.ERROR)

    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Lightning's hint to prepend `srun` wherever srun is installed; a SLURM job is detected itself.
    warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system.*")
    # kiln logs torchmetrics results, which each metric has already reduced over all ranks itself.
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
    # kiln's loaders resume inside an epoch themselves (the position is in the checkpoint: ExactResume)
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def check_monitor_logged(metric: str, module: Any) -> None:
    """The monitored key must be one the module logs at epoch level (checked again after epoch 1)."""
    logged = getattr(module, "logged_metric_names", None)
    if logged is None:
        return  # a user's own LightningModule: MonitorCheck verifies after the first validation
    candidates = [name for name in logged() if not name.startswith("test/")]
    if metric not in candidates:
        raise KilnError(
            f"monitor.metric={metric}: the model never logs it at epoch level; it logs: {', '.join(candidates)}"
        )


def check_trainable(module: Any, datamodule: Any) -> None:
    """What kiln's run needs of any LightningModule and DataModule (kiln.contract), checked before
    training: a missing piece is one line now, not a traceback after the fit."""
    import lightning as L
    from lightning.pytorch.utilities.model_helpers import is_overridden

    needs = [
        (
            module,
            L.LightningModule,
            "validation_step",
            "model",
            "it must log monitor.metric for early stopping and the best checkpoint",
        ),
        (module, L.LightningModule, "test_step", "model", "kiln tests the best checkpoint with it"),
        (datamodule, L.LightningDataModule, "val_dataloader", "data", "validation picks the best checkpoint"),
        (
            datamodule,
            L.LightningDataModule,
            "test_dataloader",
            "data",
            "kiln tests the best checkpoint on it",
        ),
    ]
    for owner, base, hook, key, why in needs:
        if not is_overridden(hook, owner, base):
            raise KilnError(
                f"{key}: {type(owner).__name__} has no {hook} ({why}); add one, as the Lightning docs show"
            )
    warn_if_not_exportable(module)


def warn_if_not_exportable(module: Any) -> None:
    """A forward of more than one input cannot become kiln's one-input ONNX graph: said before
    training (the training and its test still run; export then fails with the reason)."""
    import inspect

    from kiln.contract import export_module

    if callable(getattr(module, "kiln_export_module", None)):
        return
    try:
        parameters = inspect.signature(export_module(module).forward).parameters.values()
    except (TypeError, ValueError):
        return
    inputs = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(inputs) > 1:
        print(
            f"kiln train: warning: {type(module).__name__}.forward takes {len(inputs)} inputs "
            f"({', '.join(p.name for p in inputs)}); kiln exports one-tensor forwards, so this run will train "
            "and test but not export: define kiln_export_module() returning the part to deploy",
            file=sys.stderr,
            flush=True,
        )


def build_trainer(
    settings: TrainSettings,
    run: Any,
    extra_callbacks: list[Any],
    datamodule: Any,
    module: Any = None,
    loggers: list[Any] | bool = False,
) -> Any:
    """The Trainer of `trainer:`, with kiln's callbacks and the configured ones (the builder
    instantiates them from their config nodes: that is its job)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from kiln import slurm
    from kiln.contract import shards_by_rank
    from kiln.hardware import with_resolved_precision
    from kiln.training.callbacks import EpochLines, MonitorCheck
    from kiln.training.checkpoints import AtomicCheckpointIO
    from kiln.training.preemption import Preemption, StopOnSignal

    in_job = slurm.in_slurm_job()
    callbacks: list[Any] = [
        MonitorCheck(settings.monitor["metric"]),
        Preemption(run.checkpoints) if in_job else StopOnSignal(run.checkpoints),
    ]
    for name, node in (settings.config.callbacks or {}).items():
        if node is not None:
            callbacks.append(build(f"callbacks.{name}", node))
    show_bar = settings.progress == "bar" or (settings.progress == "auto" and sys.stderr.isatty())
    callbacks.append(TQDMProgressBar(refresh_rate=10) if show_bar else EpochLines())
    callbacks += extra_callbacks
    trainer_config = hand_accumulation_to_module(
        with_resolved_precision(plain(settings.config.trainer)), module
    )
    plugins: list[Any] = [AtomicCheckpointIO()]
    if in_job:  # ranks from SLURM's tasks; requeue is kiln's (Preemption), not Lightning's
        import torch

        if threads := slurm.job_threads():
            torch.set_num_threads(threads)
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        trainer_config["devices"] = slurm.job_devices(trainer_config.get("devices", "auto"))
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return build(
        "trainer",
        trainer_config,
        callbacks=callbacks,
        logger=loggers,
        plugins=plugins,
        enable_progress_bar=show_bar,
        # kiln's loaders shard by rank themselves, without padding; any other DataModule gets
        # Lightning's DistributedSampler, so that DDP ranks never train on the same rows
        use_distributed_sampler=not shards_by_rank(datamodule),
    )


def hand_accumulation_to_module(trainer_config: dict[str, Any], module: Any) -> dict[str, Any]:
    """Trainer settings for `module`: Lightning refuses accumulate_grad_batches > 1 under manual
    optimization, so a module that trains on kiln's chunks (KilnModule, which optimizes manually)
    accumulates itself and the Trainer gets 1. A user's own module (automatic optimization) keeps
    Lightning's accumulation."""
    k = trainer_config.get("accumulate_grad_batches", 1)
    if not getattr(module, "trains_on_chunks", False) or not isinstance(k, int) or k <= 1:
        return trainer_config
    own = getattr(module, "accumulate_grad_batches", 1)
    if own not in (1, k):
        raise KilnError(
            f"trainer.accumulate_grad_batches={k} and model.accumulate_grad_batches={own}: "
            "set only one of them"
        )
    module.accumulate_grad_batches = k
    return {**trainer_config, "accumulate_grad_batches": 1}


def throughput(trainer: Any, datamodule: Any, first_epoch: int, seconds: float) -> dict[str, Any]:
    """Training rows per second of trainer.fit as a whole (validation and checkpointing included)."""
    epochs = trainer.current_epoch - first_epoch
    rows = training_rows(trainer, datamodule)
    return {
        "fit_seconds": round(seconds, 3),
        "epochs": epochs,
        "train_rows": rows,
        "train_samples_per_second": round(rows * epochs / seconds, 1) if rows and seconds > 0 else None,
    }


def training_rows(trainer: Any, datamodule: Any) -> int | None:
    """Rows in the training split: kiln's splits, or the size of any loader's dataset (None when
    the dataset has no length, e.g. an IterableDataset)."""
    if getattr(datamodule, "splits", None) is not None:
        return len(datamodule.splits.train)
    loader = trainer.train_dataloader
    try:
        return len(loader.dataset) if loader is not None else None
    except TypeError:
        return None


def best_checkpoint(trainer: Any, monitor: dict[str, str]) -> dict[str, Any]:
    """The best checkpoint by the monitor, or an error: testing the last weights instead would lie."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    if not path or not Path(path).exists():
        raise KilnError(
            f"no best checkpoint was saved for {monitor['metric']}: keep callbacks.model_checkpoint enabled "
            "with monitor=${monitor.metric}, and let at least one validation epoch finish"
        )
    score = callback.best_model_score
    return {
        "path": str(path),
        "score": float(score) if score is not None else None,
        "epoch": _checkpoint_epoch(Path(path)),
    }


def _checkpoint_epoch(path: Path) -> int | None:
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    epoch = checkpoint.get("epoch")
    return int(epoch) + 1 if epoch is not None else None  # 1-based, as the progress lines count


def log_final_tensorboard(
    trainer: Any, module: Any, datamodule: Any, hparams: dict[str, Any], metrics: dict[str, float]
) -> None:
    """The model graph, hparams with the real final metrics; on the test split, for classification
    a confusion matrix, PR curves and ROC curves, for regression a residual plot."""
    import torch

    from kiln.training.tensorboard import (
        log_classification_curves,
        log_confusion_matrix,
        log_hparams,
        log_residuals,
    )

    writer = _tensorboard_writer(trainer)
    if writer is None:
        return
    example = getattr(module, "example_input_array", None)
    if isinstance(example, torch.Tensor):  # traced here, not at fit start: tracing is not training time
        import warnings

        with warnings.catch_warnings():
            # TensorBoard's graph is traced with torch.jit.trace, which torch 2.14 calls deprecated:
            # advice for the writer's authors, not for the user who trains
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning
            )
            writer.add_graph(getattr(module, "net", module), example.to(module.device))
    log_hparams(writer, hparams, metrics)
    if not hasattr(datamodule, "split_tensors"):
        return  # a user's own DataModule: kiln does not know how to get its test rows
    features, targets = datamodule.split_tensors("test")
    module.eval()
    with torch.no_grad():
        outputs = module(features.to(module.device)).float().cpu()
    step = trainer.global_step
    if datamodule.task == "classification":
        predictions = outputs.argmax(dim=-1)
        log_confusion_matrix(writer, targets.numpy(), predictions.numpy(), datamodule.class_names, step)
        probabilities = outputs.softmax(dim=-1).numpy()
        log_classification_curves(writer, targets.numpy(), probabilities, datamodule.class_names, step)
    else:
        log_residuals(writer, targets.numpy(), outputs.numpy(), step)


def _tensorboard_writer(trainer: Any) -> Any:
    """TensorBoard's writer, or None when no tracker of the run is TensorBoard (logger=[jsonl])."""
    from lightning.pytorch.loggers import TensorBoardLogger

    found = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    return found.experiment if found is not None else None


def feature_importance(trainer: Any, module: Any, datamodule: Any, settings: TrainSettings) -> dict[str, Any]:
    """Permutation importance of each raw column on the validation split, for tables only (digits'
    pixels or synthetic features are no columns a user would ask about): fields for run.json,
    and a text table and a bar chart in TensorBoard."""
    from kiln.data.table import TableDataModule
    from kiln.training.importance import table_feature_importance
    from kiln.training.tensorboard import log_feature_importance

    if not settings.report.feature_importance or not isinstance(datamodule, TableDataModule):
        return {}
    monitor = settings.monitor
    result = table_feature_importance(
        module,
        datamodule,
        monitor["metric"],
        monitor["mode"],
        settings.report.importance_repeats,
        settings.seed,
    )
    if result is None:
        return {}
    measure, importance = result
    writer = _tensorboard_writer(trainer)
    if writer is not None:
        log_feature_importance(writer, importance, measure, trainer.global_step)
    return {"feature_importance": importance, "feature_importance_measure": measure}


def metrics_by_group(trainer: Any, module: Any, datamodule: Any, report: ReportSettings) -> dict[str, Any]:
    """report.group_by=<column>: test metrics per value of a table column, flagged when they differ
    by more than report.group_gap (training/groups.py); for run.json, TensorBoard and the summary."""
    from kiln.training.groups import group_metrics, log_group_metrics

    column = report.group_by
    if not column:
        return {}
    result = group_metrics(module, datamodule, column, report.group_gap)
    writer = _tensorboard_writer(trainer)
    if writer is not None:
        log_group_metrics(writer, result, trainer.global_step)
    for key in result["flagged"]:
        by_group = {name: g["metrics"].get(key) for name, g in result["groups"].items()}
        shown = ", ".join(f"{name} {value:.4f}" for name, value in by_group.items() if value is not None)
        print(
            f"kiln train: warning: {key} differs by {result['spread'][key]:.4f} across {column} "
            f"(more than report.group_gap={result['gap_threshold']}): {shown}",
            file=sys.stderr,
        )
    return {"group_metrics": result}


def save_drift_baseline(datamodule: Any, directory: Path) -> str | None:
    """Per-feature summaries of the training split, as `kiln predict` will see the features: a
    table's raw columns, an array model's flattened inputs, or per-image statistics for a
    datamodule with `image_input` (kiln.drift). None for any other datamodule."""
    import json

    import numpy as np

    from kiln.data.base import InMemoryDataModule
    from kiln.data.table import TableDataModule
    from kiln.data.transforms import image_input
    from kiln.drift import BASELINE_FILE, feature_baseline
    from kiln.export.feeds import category_column, numeric_column
    from kiln.runs import write_atomically

    try:  # its own image_input, or its torchvision eval transform read as one (said at export)
        image = image_input(datamodule).image_input
    except ValueError as exc:  # the datamodule's own attribute, malformed: its author's fix
        raise KilnError(f"data: {exc}") from exc
    if image is not None:  # images: colour, contrast and sharpness per image, not pixels
        from kiln.data.images import drift_columns

        statistics = drift_columns(datamodule, image)
        if not statistics:
            return None
        write_atomically(directory / BASELINE_FILE, json.dumps(feature_baseline(statistics)) + "\n")
        return BASELINE_FILE
    if not isinstance(datamodule, InMemoryDataModule) or datamodule.splits is None:
        return None
    rows = datamodule.splits.train
    columns: dict[str, np.ndarray] = {}
    if isinstance(datamodule, TableDataModule):
        frame = datamodule.load().features.iloc[rows]
        preprocessor = datamodule.preprocessor
        for name in preprocessor.numeric_columns:
            columns[name] = numeric_column(frame[name].to_numpy(dtype=object), name, "training data")
        for name in preprocessor.categorical_columns:
            columns[name] = category_column(frame[name].to_numpy(dtype=object))
    else:
        assert datamodule.features is not None
        flat = datamodule.features[rows].reshape(len(rows), -1).numpy()
        names = list(datamodule.feature_names)
        if len(names) != flat.shape[1]:
            names = [f"x{i}" for i in range(flat.shape[1])]
        columns = {name: flat[:, i] for i, name in enumerate(names)}
    write_atomically(directory / BASELINE_FILE, json.dumps(feature_baseline(columns)) + "\n")
    return BASELINE_FILE


def print_summary(
    directory: Path, best: dict[str, Any], monitor: dict[str, str], metrics: dict[str, float], seconds: float
) -> None:
    tested = "  ".join(f"{name.removeprefix('test/')}={value:.4f}" for name, value in metrics.items())
    print(
        f"\nkiln train: done in {seconds:.1f} s\n"
        f"  run dir      {directory}\n"
        f"  best epoch   {best['epoch']}  {monitor['metric']}={best['score']:.4f}\n"
        f"  test         {tested}",
        flush=True,
    )


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
