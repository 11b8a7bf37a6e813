"""logger=tensorboard: Lightning's TensorBoardLogger, writing <run_dir>/tensorboard.

TensorBoard's event files are written by Lightning (the epoch and test metrics) and by kiln's
extras after testing (hparams, graph, figures: kiln.training.tensorboard, through
`trainer.logger`); the tracker itself adds nothing at start, has no artifacts to send (its files
are in the run directory already) and leaves closing the writer to Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.runs import RunLayout
from kiln.tracking.base import RunInfo


class TensorBoardTracker:
    """`run_dir` comes from kiln; `save_dir` (default: the run directory) and the rest are
    Lightning's TensorBoardLogger's own settings."""

    def __init__(
        self,
        run_dir: str,
        save_dir: str | None = None,
        name: str = RunLayout.TENSORBOARD,
        version: str = "",
        default_hp_metric: bool = False,
        log_graph: bool = False,
    ) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        self.logger = TensorBoardLogger(
            save_dir=save_dir or run_dir,
            name=name,
            version=version,
            default_hp_metric=default_hp_metric,
            log_graph=log_graph,
        )

    @property
    def lightning_logger(self) -> Any:
        return self.logger

    def start(self, run: RunInfo) -> None:
        pass  # kiln writes the hparams table after testing, with the real final metrics

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.logger.log_metrics(dict(metrics), step)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        pass  # the event files live in the run directory beside everything else

    def finish(self, status: str) -> None:
        pass  # Lightning flushes and closes the writer at the end of fit and test
