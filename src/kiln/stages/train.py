"""`kiln train`: compose a config, train with early stopping, test the best checkpoint, then
compress and export it.

    kiln train experiment=digits_cnn trainer.max_epochs=50

Steps: train once (kiln.training.run: build, fit, test the best checkpoint, record) or, with
`cv.folds=K`, K folds (kiln.training.cross_validation) -> on rank 0, compress and export the
tested checkpoint (kiln.delivery) -> with logger=mlflow, send the run's record, report and
model.onnx to the tracking server (kiln.tracking.finish_run; the server is checked before the run
directory is claimed). Only rank 0 writes files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kiln.stages.runner import stage


@stage("train")
def main(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from kiln import runs, slurm, tracking
    from kiln.config import is_rank_zero

    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)

    def save_config() -> None:
        runs.save_run_config(run_dir, cfg, list(hydra.overrides.task), hydra)

    continuing = cfg.resume is not None or slurm.is_requeued()
    kept = keep_saved_config(cfg, run_dir, list(hydra.overrides.task)) if continuing else []
    if not is_rank_zero():  # the other ranks of a DDP run write nothing
        return train(cfg, run_dir, save_config)
    tracking.check_server(cfg)  # logger=mlflow: before the run directory is claimed or written
    if not cfg.run_dir and not slurm.is_requeued():
        runs.remember_new_directory(run_dir)  # a run name drawn now
    runs.claim(run_dir, continuing=continuing)
    say_what_continues(run_dir, kept)
    try:
        return train(cfg, run_dir, save_config)
    except BaseException:
        runs.undo_refused_start(run_dir)  # refused before its record started: left as it was found
        raise
    finally:
        runs.release(run_dir)  # in-process callers (kiln.api, tests) go on without it


def keep_saved_config(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> list[str]:
    """A continued run keeps its saved config wherever this command line sets nothing: a value
    composed differently today (a kiln upgrade changed a default) takes the saved one. The other
    ranks of a DDP run take rank 0's config of this attempt, saved before they started. Returns
    the values kept (kiln.runs.keep_saved_values)."""
    from kiln import runs
    from kiln.config import is_rank_zero

    if not is_rank_zero():
        return runs.keep_saved_values(cfg, run_dir, None)
    continued = runs.continuation(run_dir)
    line = continued.changed if continued is not None else overrides
    return runs.keep_saved_values(cfg, run_dir, frozenset(runs.override_key(o) for o in line))


def say_what_continues(run_dir: Path, kept: list[str]) -> None:
    """One line for the overrides a continued run carries, one for saved values it kept."""
    from kiln import runs

    if (continued := runs.continuation(run_dir)) is not None:
        print(continued.describe(), file=sys.stderr, flush=True)
    if kept:
        print(
            f"kiln: {run_dir}'s saved config differs from today's where this line sets nothing; "
            f"continuing with the saved values: {', '.join(kept)}",
            file=sys.stderr,
            flush=True,
        )


def train(cfg: DictConfig, run_dir: Path, save_config: Callable[[], None]) -> dict[str, Any]:
    from lightning.pytorch.utilities import rank_zero_only

    from kiln.config import is_rank_zero
    from kiln.interrupts import Interrupted
    from kiln.tracking import finish_run

    if OmegaConf.select(cfg, "cv.folds") is not None:  # k-fold: one sub-run per fold, no export
        from kiln.training.cross_validation import REFIT_DIR, cross_validate
        from kiln.training.settings import CrossValidationSettings

        settings = CrossValidationSettings.from_config(cfg)
        if is_rank_zero():
            save_config()
        means = cross_validate(settings, run_dir)
        if cfg.cv.get("refit") and rank_zero_only.rank == 0:  # type: ignore[attr-defined]
            from kiln.delivery import after_training

            try:
                after_training(cfg, run_dir / REFIT_DIR)  # the refit is the model to ship
            finally:
                finish_run(cfg, run_dir / REFIT_DIR)  # logger=mlflow: its files, the model version
        return means
    from kiln.training.run import train_once
    from kiln.training.settings import TrainSettings

    try:
        try:
            test_metrics = train_once(TrainSettings.from_config(cfg), run_dir, save_config=save_config)
        except Interrupted as exc:
            raise exc.said(
                f"{exc.message or f'interrupted by {exc.signal_name}'}; continue it with: "
                f"kiln train run_dir={run_dir} resume=auto"
            ) from None
        stop_if_signalled_as_training_ended(run_dir)
        if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
            # The tested checkpoint is recorded and safe; compression and export follow as their own
            # stage, so a failing gate there never touches the run's training results.
            from kiln.delivery import after_training

            after_training(cfg, run_dir)
    finally:
        # logger=mlflow: run.json, the report and model.onnx as artifacts, the model version, the
        # run's status; however the run ended (rank 0 only)
        finish_run(cfg, run_dir)
    return test_metrics


def stop_if_signalled_as_training_ended(run_dir: Path) -> None:
    """A Ctrl-C or SIGTERM that came as the last epoch ended waited for the test (a run stopped
    there could not be resumed: no epoch left to train); the run is complete now, so stop before
    compression and export."""
    from kiln.interrupts import Interrupted, take_deferred
    from kiln.runs import RunLayout

    signum = take_deferred()
    if signum is not None:
        stopped = Interrupted(signum)
        raise stopped.said(
            f"interrupted by {stopped.signal_name} as training ended: the run is complete (tested and "
            f"recorded in {RunLayout(run_dir).record}), not exported; export it with: kiln export run={run_dir}"
        )


if __name__ == "__main__":  # how Lightning re-launches ranks > 0 of a DDP run
    from kiln.interrupts import Interrupted

    try:
        sys.exit(main())
    except Interrupted as stopped:  # rank 0 says what happened; the other ranks just stop
        sys.exit(stopped.exit_code)
