"""Continuing what was stopped: a resumed (or requeued) cross-validation keeps its completed folds,
and a search trial stopped by a signal is FAIL in the study, never RUNNING for good."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from kilntest import read_run

TINY = [
    "data=digits",
    "model=mlp",
    "model.net.hidden_sizes=[16]",
    "trainer.max_epochs=1",
    "progress=lines",
    "compress=none",
    "export.after_training=false",
]


def train_in_process(*overrides: str) -> Any:
    from kiln.config import compose
    from kiln.stages import train as train_stage

    return train_stage.main.call(compose("train", list(overrides)))


@pytest.mark.slow
def test_a_resumed_cross_validation_keeps_its_completed_folds(tmp_path: Path) -> None:
    run_dir = tmp_path / "cv"
    train_in_process(*TINY, "cv.folds=2", f"run_dir={run_dir}")
    kept = (run_dir / "fold_0" / "run.json").read_bytes()
    # fold 1 as a requeue or a Ctrl-C leaves it: interrupted, before its first checkpoint
    record = read_run(run_dir / "fold_1")
    record.update(status="interrupted", test_metrics={}, best_checkpoint=None)
    (run_dir / "fold_1" / "run.json").write_text(json.dumps(record))
    shutil.rmtree(run_dir / "fold_1" / "checkpoints")

    train_in_process(*TINY, "cv.folds=2", f"run_dir={run_dir}", "resume=auto")

    assert (run_dir / "fold_0" / "run.json").read_bytes() == kept  # not trained again
    fold_1 = read_run(run_dir / "fold_1")
    assert fold_1["status"] == "completed"
    assert [a["status"] for a in fold_1["attempts"]] == ["interrupted"]
    cv = json.loads((run_dir / "cv.json").read_text())
    assert cv["status"] == "completed"
    assert [r["status"] for r in cv["runs"]] == ["completed", "completed"]
    assert set(cv["mean"]) >= {"test/acc", "best val/loss"}


def test_a_cross_validation_resumes_only_as_a_whole(tmp_path: Path) -> None:
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match=r"^resume=some\.ckpt: a cross-validation continues as a whole"):
        train_in_process(*TINY, "cv.folds=2", f"paths.output_dir={tmp_path}", "resume=some.ckpt")


def test_a_trial_stopped_by_a_signal_is_failed_in_the_study(tmp_path: Path, monkeypatch) -> None:
    import optuna

    from kiln.config import compose
    from kiln.interrupts import Interrupted
    from kiln.stages import search
    from kiln.training import run as run_module

    cfg = compose(
        "search",
        [f"paths.output_dir={tmp_path}", *TINY, 'search.params={model.optimizer.lr:"choice(0.01,0.001)"}'],
    )

    def stopped(*args: Any, **kwargs: Any) -> None:
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(run_module, "train_once", stopped)
    study = optuna.create_study()
    trial = study.ask()
    space = search.search_space(cfg)
    with pytest.raises(Interrupted):
        search.run_trial(cfg, trial, space, tmp_path, {"metric": "val/loss", "mode": "min"})
    (frozen,) = study.get_trials()
    assert frozen.state == optuna.trial.TrialState.FAIL
    assert frozen.user_attrs["interrupted"] == "SIGTERM"
    assert search.finished_trials(study) == 0  # not counted: continuing the search replaces it
