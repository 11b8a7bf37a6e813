"""What a tracker is: the small interface every tracker (TensorBoard, MLflow, yours) implements.

kiln calls a run's trackers in this order, on rank 0 only (Lightning's metrics reach them on
rank 0 as well):

    start(run)                      once the trainer is built: the run's directory, record, params
    log_metrics(metrics, step)      every epoch's metrics and the test metrics, as Lightning logs them
    log_artifacts(paths)            once the run ended (and was exported): run.json, the report, model.onnx
    finish(status)                  last: "completed", "pruned", "interrupted" or "failed"

A tracker that needs Lightning's own logger (TensorBoard's event files, MLflow's) hands it over
as `lightning_logger`; any other tracker gets its metrics through `TrackerLogger`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

MAX_PARAM_LENGTH = 6000  # the MLflow server's limit on a param's value


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a tracker learns when the run starts."""

    directory: Path
    record: Mapping[str, Any]  # run.json as it stands when training starts
    params: Mapping[str, str]  # the resolved config flattened (a.b.c -> text), passwords masked
    # Adds keys to run.json, e.g. the tracker's own run id, so that a resumed run finds it again.
    update_record: Callable[..., None]


@runtime_checkable
class Tracker(Protocol):
    def start(self, run: RunInfo) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifacts(self, paths: Sequence[Path]) -> None: ...

    def finish(self, status: str) -> None: ...


@runtime_checkable
class UsesLightningLogger(Protocol):
    """A tracker whose metrics Lightning writes through Lightning's own logger."""

    @property
    def lightning_logger(self) -> Any: ...


def flat_params(config: Any) -> dict[str, str]:
    """The resolved config as `a.b.c -> text`, every password masked."""
    from omegaconf import OmegaConf

    from kiln.runs import without_credentials

    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = without_credentials(str(node))[:MAX_PARAM_LENGTH]

    walk(OmegaConf.to_container(config, resolve=True), "")
    return flat


def default_experiment(cfg: Any) -> str:
    """The experiment= choice (digits_cnn), else kiln-<task> (kiln-train, kiln-search)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    choice = OmegaConf.select(cfg, "hydra.runtime.choices.experiment", default=None) if cfg else None
    task = OmegaConf.select(cfg, "task_name", default=None) if cfg else None
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        choice = choice or hydra.runtime.choices.get("experiment")
        task = task or hydra.job.name
    if choice and str(choice) != "null":
        return str(choice)
    return f"kiln-{task or 'train'}"


@functools.cache
def _tracker_logger_class() -> type:
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.utilities import rank_zero_only

    class _TrackerLogger(Logger):
        """Lightning's logger interface (public: lightning.pytorch.loggers.Logger) in front of a
        tracker that has no Lightning logger of its own: it passes the metrics on."""

        def __init__(self, name: str, tracker: Tracker) -> None:
            super().__init__()
            self._name = name
            self.tracker = tracker

        @property
        def name(self) -> str:
            return self._name

        @property
        def version(self) -> str:
            return ""

        @rank_zero_only
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass  # a tracker gets the whole resolved config at start (RunInfo.params)

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            self.tracker.log_metrics({key: float(value) for key, value in metrics.items()}, step or 0)

    return _TrackerLogger


def tracker_logger(name: str, tracker: Tracker) -> Any:
    """The Lightning logger that hands `tracker` what Lightning logs (made on first use: Lightning
    imports late)."""
    return _tracker_logger_class()(name, tracker)
