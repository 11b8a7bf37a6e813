"""The typed settings of a training run, read once from the composed config by the stage.

    settings = TrainSettings.from_config(cfg)          kiln.stages.train, kiln.stages.search
    train_once(settings, run_dir)                      kiln.training.run
    cross_validate(CrossValidationSettings.from_config(cfg), run_dir)

Every value the training loop decides on is a typed field, checked as it is read (one line that
names the key). The config nodes of the user's DataModule, LightningModule, Trainer, callbacks and
loggers stay config inside `config`: instantiating them is the builder's job (kiln.builder), and
they are resolved only when built, because `${hydra:runtime.output_dir}` in them moves to each
fold's and trial's own directory while it trains.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from kiln.errors import KilnError


@dataclass(frozen=True)
class ReportSettings:
    """What the run measures after its test (`report.*`)."""

    feature_importance: bool = True  # permutation importance of a table's columns
    importance_repeats: int = 5
    group_by: str | None = None  # a table column: test metrics per value of it
    group_gap: float = 0.1  # a spread across groups above this is flagged

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ReportSettings:
        """Checked at start-up: a bad setting must not surface only after the whole fit."""
        repeats = OmegaConf.select(cfg, "report.importance_repeats", default=5)
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise KilnError(f"report.importance_repeats={repeats}: must be an integer >= 1, e.g. 5")
        gap = OmegaConf.select(cfg, "report.group_gap", default=0.1)
        if not isinstance(gap, int | float) or isinstance(gap, bool) or gap < 0:
            raise KilnError(
                f"report.group_gap={gap}: must be a number >= 0 (a difference in metric units), e.g. 0.1"
            )
        group_by = OmegaConf.select(cfg, "report.group_by")
        return cls(
            feature_importance=bool(OmegaConf.select(cfg, "report.feature_importance", default=True)),
            importance_repeats=repeats,
            group_by=str(group_by) if group_by else None,
            group_gap=float(gap),
        )


@dataclass(frozen=True)
class ResumeSettings:
    """How a run continues from a checkpoint, and what that checkpoint must allow."""

    checkpoint: str | None = None  # resume: auto, a .ckpt file, or None to start fresh
    run_dir_given: bool = False  # run_dir=...: an existing run is continued
    data_changed: str = "refuse"  # resume_data_changed: refuse or accept
    max_epochs: Any = None  # trainer.max_epochs, as composed (an int, or -1/None for no limit)
    patience: Any = None  # callbacks.early_stopping.patience, as composed
    data_source: str = "the data"  # `data.path=...`: how a refusal names the data

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ResumeSettings:
        resume = OmegaConf.select(cfg, "resume")
        return cls(
            checkpoint=None if resume is None else str(resume),
            run_dir_given=bool(OmegaConf.select(cfg, "run_dir")),
            data_changed=resume_data_changed(cfg),
            max_epochs=OmegaConf.select(cfg, "trainer.max_epochs"),
            patience=OmegaConf.select(cfg, "callbacks.early_stopping.patience"),
            data_source=_data_source(cfg),
        )


def resume_data_changed(cfg: DictConfig) -> str:
    """`resume_data_changed`: refuse (the default) or accept a resume on changed data; a misspelt
    choice is refused at start-up, not at the resume it is for."""
    choice = OmegaConf.select(cfg, "resume_data_changed", default="refuse")
    if choice not in ("refuse", "accept"):
        raise KilnError(
            f"resume_data_changed={choice}: must be refuse or accept, e.g. resume_data_changed=accept"
        )
    return str(choice)


def _data_source(cfg: DictConfig) -> str:
    for key in ("path", "root", "name"):
        value = OmegaConf.select(cfg, f"data.{key}")
        if value:
            return f"data.{key}={value}"
    return "the data"


def monitor_setting(cfg: DictConfig) -> dict[str, str]:
    """`monitor.metric` and `monitor.mode`: the one declaration of the metric to watch."""
    metric, mode = cfg.monitor.metric, cfg.monitor.mode
    if mode not in ("min", "max"):
        raise KilnError(f"monitor.mode={mode}: must be min or max")
    if not isinstance(metric, str) or not metric:
        raise KilnError("monitor.metric: name the metric to watch, e.g. monitor.metric=val/acc")
    return {"metric": metric, "mode": mode}


@dataclass(frozen=True)
class TrainSettings:
    """One training run's settings (kiln.training.run.train_once)."""

    seed: int
    monitor: dict[str, str]  # {"metric": ..., "mode": "min" | "max"}
    progress: str  # auto, bar or lines
    resume: ResumeSettings
    report: ReportSettings
    # The composed config, for the builders of the user's objects and for the run's records
    # (.hydra/config.yaml, the trackers' params); resolved when used, in the run's directory.
    config: DictConfig = field(repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrainSettings:
        return cls(
            seed=cfg.seed,
            monitor=monitor_setting(cfg),
            progress=str(OmegaConf.select(cfg, "progress", default="auto")),
            report=ReportSettings.from_config(cfg),
            resume=ResumeSettings.from_config(cfg),
            config=cfg,
        )

    def config_hash(self) -> str:
        """The resolved config's hash, as run.json records it (resolved in the run's directory)."""
        text = OmegaConf.to_yaml(self.config, resolve=True, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def hparams(self) -> dict[str, Any]:
        """The data, model and trainer settings, flat, with the seed: TensorBoard's hparams."""
        from kiln.builder import plain
        from kiln.training.tensorboard import flat_params

        cfg = self.config
        params = flat_params({key: plain(cfg[key]) for key in ("data", "model", "trainer") if key in cfg})
        params["seed"] = self.seed
        return params

    def with_changes(self, **values: Any) -> TrainSettings:
        """These settings with config keys changed (`data.fold=1`; None removes a callback)."""
        cfg = copy.deepcopy(self.config)
        with open_dict(cfg):
            for key, value in values.items():
                OmegaConf.update(cfg, key, value, force_add=True)
        return TrainSettings.from_config(cfg)

    def for_fold(self, folds: int, fold: int) -> TrainSettings:
        """One fold of a cross-validation: data.num_folds and data.fold set, cv.folds off."""
        return self.with_changes(**{"data.num_folds": folds, "data.fold": fold, "cv.folds": None})

    def for_refit(self, epochs: int) -> TrainSettings:
        """The refit after a cross-validation: train and validation rows together, for `epochs`
        epochs (no validation rows are left to stop it early)."""
        changes: dict[str, Any] = {
            "data.refit": True,
            "data.num_folds": None,
            "data.fold": 0,
            "cv.folds": None,
            "cv.refit": False,
            "trainer.max_epochs": epochs,
            "trainer.min_epochs": epochs,
        }
        if self.config.get("callbacks") is not None:
            changes["callbacks.early_stopping"] = None
        return self.with_changes(**changes)

    def continuing(self, directory: Path, resuming: bool) -> TrainSettings:
        """A fold's (or the refit's) settings, continuing its own run in `directory` from its last
        checkpoint when the cross-validation is continued and the fold had started; fresh otherwise."""
        from kiln.runs import RunLayout

        started = resuming and RunLayout(directory).record.is_file()
        return self.with_changes(
            resume="auto" if started else None, run_dir=str(directory) if started else None
        )


@dataclass(frozen=True)
class CrossValidationSettings:
    """`cv.*`: k-fold cross-validation of one run's settings (kiln.training.cross_validation)."""

    folds: int
    refit: bool
    run: TrainSettings  # the run each fold trains, before its fold is set

    @classmethod
    def from_config(cls, cfg: DictConfig) -> CrossValidationSettings:
        """cv.folds must be an integer >= 2; a cross-validation continues only as a whole (resume=auto
        with run_dir=<its directory>): completed folds are kept, a started one continues."""
        folds = cfg.cv.folds
        if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
            raise KilnError(
                f"cv.folds={folds}: cross-validation needs an integer of at least 2 folds, e.g. cv.folds=5 "
                "(cv.folds=null trains one run)"
            )
        if cfg.resume is not None and (str(cfg.resume) != "auto" or not cfg.run_dir):
            from kiln.runs import RunLayout

            fold = Path("<run>", RunLayout.FOLD.format("<i>"))  # <run>/fold_<i>, as the user fills it in
            raise KilnError(
                f"resume={cfg.resume}: a cross-validation continues as a whole, each fold from its own last "
                "checkpoint: kiln train run_dir=<its directory> resume=auto cv.folds=... (or resume one fold "
                f"on its own: kiln train run_dir={fold} resume=auto)"
            )
        return cls(folds=folds, refit=bool(cfg.cv.get("refit")), run=TrainSettings.from_config(cfg))
