"""The stage composes the config once and hands training and export typed settings, not the
config (issue 24, item 3): what the settings hold, what they refuse, and that the components'
signatures take no config."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

from kiln.config import compose
from kiln.errors import KilnError
from kiln.export.pipeline import ExportSettings
from kiln.training.settings import CrossValidationSettings, ReportSettings, ResumeSettings, TrainSettings
from kilntest import TINY_DIGITS

COMPONENTS = ("kiln.training.run", "kiln.training.cross_validation", "kiln.export.pipeline")


def config_parameters(module_name: str) -> list[str]:
    """`module.function(parameter)` for each public function of the module that takes a config."""
    module = importlib.import_module(module_name)
    found = []
    for name, function in inspect.getmembers(module, inspect.isfunction):
        if name.startswith("_") or function.__module__ != module_name:
            continue
        for parameter in inspect.signature(function).parameters.values():
            if parameter.name == "cfg" or "DictConfig" in str(parameter.annotation):
                found.append(f"{module_name}.{name}({parameter.name})")
    return found


def test_training_and_export_functions_take_settings_not_the_config() -> None:
    assert [found for name in COMPONENTS for found in config_parameters(name)] == []
    train_once = importlib.import_module("kiln.training.run").train_once
    assert list(inspect.signature(train_once).parameters)[:2] == ["settings", "run_dir"]


def test_train_settings_read_every_value_the_run_decides_on(tmp_path: Path) -> None:
    cfg = compose(
        "train",
        [
            *TINY_DIGITS,
            f"paths.output_dir={tmp_path}",
            "seed=7",
            "monitor.metric=val/loss",
            "monitor.mode=min",
            "report.importance_repeats=3",
            "report.group_gap=0.25",
            "resume_data_changed=accept",
            "callbacks.early_stopping.patience=4",
        ],
    )
    settings = TrainSettings.from_config(cfg)
    assert (settings.seed, settings.monitor, settings.progress) == (
        7,
        {"metric": "val/loss", "mode": "min"},
        "lines",
    )
    assert settings.report == ReportSettings(
        feature_importance=True, importance_repeats=3, group_by=None, group_gap=0.25
    )
    assert settings.resume == ResumeSettings(
        checkpoint=None,
        run_dir_given=False,
        data_changed="accept",
        max_epochs=2,
        patience=4,
        data_source="the data",  # digits: no path, root or name to name it by
    )
    assert len(settings.config_hash()) == 16 and settings.hparams()["seed"] == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("report.importance_repeats=0", "report.importance_repeats=0: must be an integer >= 1, e.g. 5"),
        ("resume_data_changed=acept", "resume_data_changed=acept: must be refuse or accept"),
        ("monitor.mode=maximum", "monitor.mode=maximum: must be min or max"),
        ("report.group_gap=-1", "report.group_gap=-1: must be a number >= 0"),
    ],
)
def test_a_bad_setting_is_refused_as_it_is_read_naming_its_key(
    tmp_path: Path, override: str, message: str
) -> None:
    cfg = compose("train", [*TINY_DIGITS, f"paths.output_dir={tmp_path}", override])
    with pytest.raises(KilnError) as refused:
        TrainSettings.from_config(cfg)
    assert str(refused.value).startswith(message)


def test_fold_refit_and_continued_settings_change_a_copy(tmp_path: Path) -> None:
    cfg = compose("train", [*TINY_DIGITS, f"paths.output_dir={tmp_path}", "cv.folds=3", "cv.refit=true"])
    cv = CrossValidationSettings.from_config(cfg)
    assert (cv.folds, cv.refit) == (3, True)
    fold = cv.run.for_fold(3, 1)
    assert (fold.config.data.num_folds, fold.config.data.fold, fold.config.cv.folds) == (3, 1, None)
    refit = cv.run.for_refit(5)
    assert refit.resume.max_epochs == 5 and refit.resume.patience is None
    assert (refit.config.data.refit, refit.config.trainer.min_epochs, refit.config.cv.refit) == (
        True,
        5,
        False,
    )
    (tmp_path / "fold_1").mkdir()
    (tmp_path / "fold_1" / "run.json").write_text("{}")
    continued = fold.continuing(tmp_path / "fold_1", resuming=True)
    assert (continued.resume.checkpoint, continued.resume.run_dir_given) == ("auto", True)
    assert fold.continuing(tmp_path / "fold_2", resuming=True).resume.checkpoint is None  # never started
    assert cfg.cv.folds == 3 and cfg.data.get("fold") != 1 and cfg.trainer.max_epochs == 2  # unchanged


def test_cross_validation_settings_refuse_too_few_folds(tmp_path: Path) -> None:
    cfg = compose("train", [*TINY_DIGITS, f"paths.output_dir={tmp_path}", "cv.folds=1"])
    with pytest.raises(
        KilnError, match=r"^cv\.folds=1: cross-validation needs an integer of at least 2 folds"
    ):
        CrossValidationSettings.from_config(cfg)


def test_export_settings_come_from_the_composed_config(tmp_path: Path) -> None:
    importlib.import_module("kiln.stages.export")  # registers the resolver the export config uses
    cfg = compose("export", [f"run={tmp_path}", "export.threads=1", "export.latency_repeats=7"])
    settings = ExportSettings.from_config(cfg)
    assert (settings.threads, settings.latency_repeats, settings.opset) == (1, 7, 20)
    bad = compose("export", [f"run={tmp_path}", "export.threads=0"])
    with pytest.raises(KilnError, match=r"^export\.threads=0: must be null"):
        ExportSettings.from_config(bad)
