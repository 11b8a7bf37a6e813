"""What kiln adds around every Hydra multirun (`kiln train -m ...`), in the submitting process.

Before the sweep: URL passwords leave the config for the environment (nothing Hydra writes or
pickles holds one), and on the SLURM launcher, settings that cannot fit are refused before
anything is submitted. After it: the jobs' results are read back from their run.json files and shown as one
table (`kiln report`), and the exit code says whether every job completed. A SLURM job's own
failure never reaches the submitting process otherwise: Hydra only sees that the job returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

# Sweep directories finished in this process, for the stage's exit code (kiln.stages.runner.stage).
finished_sweeps: list[Path] = []


class SweepCallback(Callback):
    """hydra.callbacks.sweep in conf/train.yaml."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        hide_secrets(config)
        target = str(config.hydra.launcher.get("_target_", ""))
        if target.endswith("submitit_launcher.SlurmLauncher"):
            from kiln.errors import KilnError, SweepRefused
            from kiln.slurm import check_launcher_fits

            # Hydra turns an Exception raised by a callback into a warning and goes on submitting;
            # a BaseException stops it (kiln.stages.runner.stage reports it as the one error line).
            try:
                check_launcher_fits(config.hydra.launcher, config.trainer)
            except KilnError as exc:
                raise SweepRefused(str(exc)) from exc

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        finished_sweeps.append(Path(str(config.hydra.sweep.dir)))


def hide_secrets(config: Any) -> None:
    """Before Hydra writes the sweep's multirun.yaml and hands the jobs their overrides (pickled
    into .submitit/ for SLURM): every URL password becomes an environment variable reference,
    the password travels in the environment (kiln.runs.secrets_to_environment)."""
    from hydra.core.hydra_config import HydraConfig

    from kiln.runs import secrets_to_environment

    secrets_to_environment(config)
    held = HydraConfig.instance().cfg  # its own copy of the hydra node: pickled for SLURM jobs
    if held is not None and held is not config:
        secrets_to_environment(held)


def report_sweep(directory: Path) -> bool:
    """Print the sweep's table (and write runs.md, runs.csv); True when every job completed.

    A job counts as completed when its directory holds run records and all of them completed (or
    were pruned), or, for a search worker, when it wrote its search.json: a SLURM job that failed
    before writing one, or was cancelled, leaves none.
    """
    from kiln.runs import RunLayout, find_runs
    from kiln.stages import report

    jobs = [path for path in directory.iterdir() if path.is_dir() and path.name.isdigit()]
    if find_runs(directory):
        report.main([f"dir={directory}"])
    for job in jobs:
        if RunLayout(job).search_record.is_file() and not find_runs(job):
            continue  # a search worker that found the study already complete: nothing to train
        runs = find_runs(job)
        # a pruned trial of kiln search ended as designed
        if not runs or any(report.read_run(job, run).status not in ("completed", "pruned") for run in runs):
            return False
    return True
