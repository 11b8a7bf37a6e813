"""kiln's own callbacks: progress as plain lines where there is no terminal, and the monitor check."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from kiln.errors import KilnError


class EpochLines(Callback):
    """One plain line per epoch (for job logs and pipes, where a redrawn bar is noise).

    By default through the `kiln` logger: on stderr and in the run's log file, so a cluster job's
    run directory keeps its own progress. With `stream`, printed there instead.
    """

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self._started = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume inside an epoch gets no on_train_epoch_start for it: its time counts from here.
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank reads the metrics: reading them reduces values logged with sync_dist across ranks,
        # a collective that would wait forever if only rank 0 took part. Rank 0 alone prints.
        shown = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/loss", "val/"))
        }
        if not trainer.is_global_zero:
            return
        metrics = "  ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items()))
        line = (
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {metrics}  "
            f"({time.perf_counter() - self._started:.1f} s)"
        )
        if self.stream is None:
            logging.getLogger("kiln.progress").info(line)
        else:
            print(line, file=self.stream, flush=True)


class MonitorCheck(Callback):
    """After the first validation epoch, the monitored key must have been logged (else: say which are)."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            logged = ", ".join(sorted(metrics)) or "none"
            raise KilnError(
                f"monitor.metric={self.monitor} is not logged at epoch level; logged keys: {logged}"
            )
        # A NaN score would be "never better" to EarlyStopping and silently end the run; stop instead.
        for name in dict.fromkeys(["val/loss", self.monitor]):
            value = metrics.get(name)
            if value is not None and not math.isfinite(float(value)):
                raise KilnError(
                    f"{name} became {float(value)} at epoch {trainer.current_epoch + 1}: the run diverged; "
                    "likely causes: a learning rate too high (model.optimizer.lr), unscaled inputs, or overflow "
                    "in low precision; lower the learning rate or set model.gradient_clip_val=1.0. "
                    "Checkpoints saved so far are kept"
                )
