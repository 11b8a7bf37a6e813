"""How a stage runs under Hydra.

A stage is a plain `main(cfg)` wrapped by `stage(config_name)`. The wrapper runs it under
`hydra.main` (so `--help`, `--cfg job`, `--info`, `-m` and every override behave as Hydra users
expect) and turns user mistakes into one line on stderr with exit code 2. `main.call(cfg)` runs
the same stage in this process on a config from `kiln.config.compose`.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from kiln.config import check_config, config_dir, continued_command_line, forget_run_name, register_resolvers
from kiln.errors import EXIT_USER_ERROR, SweepRefused, describe_user_error


def stage(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], int]]:
    """Turn `main(cfg)` into a Hydra app over kiln's configs that reports user errors in one line."""

    def wrap(task: Callable[[Any], Any]) -> Callable[[], int]:
        failures: list[str] = []  # the user errors this invocation reported (a sweep has several jobs)
        # Here, not only in run(): a SLURM job unpickles the task in a fresh process and resolves
        # the config there without calling run().
        register_resolvers()
        guarded = _guarded(config_name, task, failures)

        def call(cfg: Any) -> Any:
            """The stage's work in this process, on a config from `compose`: what the CLI runs
            after composing. A user's mistake raises KilnError instead of printing it."""
            check_config(cfg)
            return task(cfg)

        def run() -> int:
            return _run_app(config_name, guarded, failures)

        run.call = call  # type: ignore[attr-defined]
        return run

    return wrap


def _guarded(config_name: str, task: Callable[[Any], Any], failures: list[str]) -> Callable[[Any], Any]:
    """`task` as Hydra runs it: a user error inside a job is reported here, in one line; Hydra then
    sees a finished job (no multi-line "Error executing job" report) and a sweep goes on to its
    next job. Wrapped so that Hydra (and Lightning's DDP re-launch) see the stage's own module."""

    @functools.wraps(task)
    def guarded(cfg: Any) -> Any:
        try:
            check_config(cfg)
            return task(cfg)
        except Exception as exc:
            line = describe_user_error(exc)
            if line is None:
                raise
            print(f"kiln {config_name}: error: {line}", file=sys.stderr, flush=True)
            failures.append(line)
            return None

    return guarded


def _run_app(config_name: str, guarded: Callable[[Any], Any], failures: list[str]) -> int:
    """Run the stage as a Hydra app on this process's command line; its exit code."""
    import hydra

    from kiln import sweep

    forget_run_name()  # each invocation of a stage is a new run
    failures.clear()
    # Hydra re-raises composition errors instead of printing its own multi-line report.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    if config_name == "train":  # before Hydra reads the command line
        sys.argv = [sys.argv[0], *continued_command_line(sys.argv[1:])]
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(guarded)
    sweep.finished_sweeps.clear()
    try:
        app()
        _report_sweeps(config_name, failures)
    except SweepRefused as exc:
        print(f"kiln {config_name}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        line = describe_user_error(exc)
        if line is None:
            raise
        print(f"kiln {config_name}: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_USER_ERROR if failures else 0


def _report_sweeps(config_name: str, failures: list[str]) -> None:
    """After a sweep, one table of its jobs; a job that failed in its own process (a SLURM job)
    is known only from its run record, and counts as a failure here."""
    from kiln import sweep

    all_completed = all([sweep.report_sweep(d) for d in sweep.finished_sweeps])
    if not all_completed and not failures:
        failures.append("a job of the sweep did not complete")
        print(
            f"kiln {config_name}: error: not every job of the sweep completed; "
            f"see the table above and each job's {config_name}.log",
            file=sys.stderr,
        )
