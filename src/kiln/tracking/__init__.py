"""Trackers: where a run's params, metrics and files go besides its run directory.

    kiln train                                      TensorBoard (conf/logger/tensorboard.yaml)
    kiln train logger=mlflow logger.tracking_uri=http://127.0.0.1:5000     TensorBoard + MLflow
    kiln train logger=[tensorboard,mlflow] logger.tracking_uri=...         the same, as a list

Each config in conf/logger/ adds its tracker under `logger.trackers.<name>` (a `_target_`); the
configs chosen are merged, so several trackers run at once. kiln builds each tracker with the
settings of `logger` that its __init__ names (plus, if it asks for them, `run_dir`,
`previous_record`: run.json before this attempt, and `experiment`: the experiment= choice,
else kiln-<task_name>), and calls them through one small interface
(kiln.tracking.base.Tracker): start, log_metrics, log_artifacts, finish.

The training stage builds and starts the trackers (`build_trackers`, `start`); the stage ends
them once the run is complete and exported (`finish_run`), however it ended. A logger config
with a `_target_` of its own and no `trackers` (any Lightning logger) is built as Lightning's
logger, as before trackers.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.tracking.base import (
    RunInfo,
    Tracker,
    UsesLightningLogger,
    default_experiment,
    flat_params,
    tracker_logger,
)
from kiln.tracking.mlflow import (
    BUILDER,
    TRACKER,
    ParentRun,
    check_server,
    log_summary,
    parent_run,
    split_credentials,
    stray_git_tags,
    tensorboard_and_mlflow,
)
from kiln.tracking.tensorboard import TensorBoardTracker

__all__ = [
    "ParentRun",
    "RunInfo",
    "Tracker",
    "Tracking",
    "build_trackers",
    "check_server",
    "finish_run",
    "log_summary",
    "parent_run",
    "split_credentials",
    "start",
    "stray_git_tags",
    "tensorboard_and_mlflow",
]

COMPLETE = ("completed", "pruned")  # a run status whose tracking must not fail silently
# The trackers started in this process, by run directory, until the stage finishes them.
_started: dict[Path, list[tuple[str, Tracker]]] = {}


@dataclasses.dataclass(frozen=True)
class Tracking:
    """A run's trackers (by their name under logger.trackers) and the Lightning loggers the
    Trainer logs through (False: none)."""

    trackers: list[tuple[str, Tracker]]
    loggers: list[Any] | bool


def build_trackers(cfg: Any, run_dir: Path, previous_record: Mapping[str, Any]) -> Tracking:
    """The trackers `cfg.logger` names, built (on every rank: Lightning's loggers need it)."""
    from omegaconf import OmegaConf

    from kiln.builder import build, plain

    node = OmegaConf.select(cfg, "logger", default=None)
    if node is None:
        return Tracking([], False)
    settings = plain(node)
    if "trackers" not in settings and settings.get("_target_") != BUILDER:
        return Tracking([], build("logger", node))  # a Lightning logger of the user's own
    named = settings.pop("trackers", None) or _legacy_trackers(settings)
    runtime = {"run_dir": str(run_dir), "previous_record": dict(previous_record)}
    runtime["experiment"] = default_experiment(cfg)
    trackers: list[tuple[str, Tracker]] = []
    for name, tracker_node in named.items():
        if tracker_node is None:  # logger.trackers.<name>=null leaves one out
            continue
        key = f"logger.trackers.{name}"
        tracker = build(key, with_logger_settings(key, tracker_node, settings), **runtime)
        if not isinstance(tracker, Tracker):
            raise KilnError(
                f"logger.trackers.{name}._target_={tracker_node['_target_']}: not a tracker; a tracker "
                "has start, log_metrics, log_artifacts and finish (kiln.tracking.base.Tracker)"
            )
        trackers.append((name, tracker))
    return Tracking(trackers, lightning_loggers(trackers) or False)


def with_logger_settings(key: str, node: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The tracker's node with the settings of `logger` that its __init__ names (its own node
    wins): `logger.tracking_uri` reaches MLflow, `logger.log_graph` TensorBoard. They are
    checked against its signature's types as its own arguments are."""
    import inspect

    from hydra.utils import get_object

    from kiln.builder import check_allowed_targets

    check_allowed_targets(node, key)  # before its module is imported
    names = inspect.signature(get_object(node["_target_"])).parameters
    return {**{name: value for name, value in settings.items() if name in names}, **node}


def _legacy_trackers(settings: dict[str, Any]) -> dict[str, Any]:
    """A saved run's logger=mlflow from before trackers: the same two trackers."""
    settings.pop("_target_", None)
    return {
        "tensorboard": {"_target_": f"{TensorBoardTracker.__module__}.{TensorBoardTracker.__name__}"},
        "mlflow": {"_target_": TRACKER},
    }


def lightning_loggers(trackers: list[tuple[str, Tracker]]) -> list[Any]:
    """What Lightning logs through: a tracker's own Lightning logger, else one that hands the
    tracker the metrics. TensorBoard first, as before trackers: Lightning's `trainer.logger` and
    `trainer.log_dir` are the first logger's."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [
        tracker.lightning_logger
        if isinstance(tracker, UsesLightningLogger)
        else tracker_logger(name, tracker)
        for name, tracker in trackers
    ]
    return sorted(loggers, key=lambda logger: not isinstance(logger, TensorBoardLogger))


def start(tracking: Tracking, cfg: Any, run: Any) -> None:
    """Once the trainer is built, on the writing rank: each tracker starts with the run's record
    and config (kiln.runs.Run `run`); `finish_run` ends the ones that started."""
    if not run.writer or not tracking.trackers:
        return
    info = RunInfo(run.directory, dict(run.record), flat_params(cfg), run.update)
    started = _started.setdefault(Path(run.directory).resolve(), [])
    for name, tracker in tracking.trackers:
        started.append((name, tracker))  # one that fails to start is still ended, as failed
        tracker.start(info)


def finish_run(cfg: Any, run_dir: Path) -> None:
    """After a run (and its export) ended, however it ended: the trackers started for `run_dir`
    get its files and its status (from run.json). `cfg` is the run's config, as the stage has it;
    the trackers already hold their settings. A tracker's failure after a completed run is one
    KilnError (once every tracker had its turn); after a failed one, a warning (the run's own
    error is the one to see)."""
    from kiln.runs import RunLayout, read_record

    trackers = _started.pop(Path(run_dir).resolve(), [])
    if not trackers:
        return
    layout = RunLayout(Path(run_dir))
    status = str((read_record(layout.root) if layout.record.is_file() else {}).get("status") or "failed")
    files = [path for path in layout.artifacts if path.is_file()]  # what the run holds of them
    failures = [line for name, tracker in trackers if (line := _finish_one(name, tracker, files, status))]
    if failures and status in COMPLETE:
        raise KilnError(f"{failures[0]}; the run itself is complete in {run_dir}")
    for line in failures:
        print(f"kiln: warning: {line}", file=sys.stderr, flush=True)


def _finish_one(name: str, tracker: Tracker, files: list[Path], status: str) -> str | None:
    """None, or the line that says why `tracker` could not finish."""
    try:
        tracker.log_artifacts(files)
        tracker.finish(status)
    except Exception as exc:
        describe = getattr(tracker, "describe_failure", None)  # optional: a tracker's own words
        if callable(describe):
            return str(describe(exc))
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"logger.trackers.{name}: could not finish its run ({type(exc).__name__}: {first})"
    return None
