"""KilnModule: one LightningModule for classification and regression around a plain `net`.

Training uses manual optimization over *chunks* of mini-batches (see kiln/data/batches.py): one
Lightning step runs `len(chunk)` optimizer steps. Each optimizer step is the idiomatic one
(zero_grad, forward, loss, backward, step) at the configured batch size; only Lightning's
bookkeeping is amortized. Metrics are logged at epoch level only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from kiln.errors import InvalidArgument, KilnError, require
from kiln.models.metrics import metric_collection, metric_names

Batch = tuple[Tensor, Tensor]
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class KilnModule(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        task: str,
        input_shape: Sequence[int],
        class_names: Sequence[str] = (),
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        gradient_clip_val: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        require(
            task in ("classification", "regression"),
            "task",
            f"must be classification or regression, got {task!r}",
        )
        require(
            task == "regression" or len(class_names) >= 2,
            "class_names",
            "classification needs 2 or more classes",
        )
        require(
            scheduler_interval in ("epoch", "step"),
            "scheduler_interval",
            f"must be epoch or step, got {scheduler_interval!r}",
        )
        require(
            gradient_clip_val is None or gradient_clip_val > 0,
            "gradient_clip_val",
            f"must be > 0, got {gradient_clip_val}",
        )
        # plain values only: checkpoints load with weights_only=True, nothing is unpickled
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.task = task
        self.class_names = list(class_names)
        self.optimizer_factory = optimizer or torch.optim.Adam
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.gradient_clip_val = gradient_clip_val
        self.seed = seed
        self.automatic_optimization = False
        self.loss_fn: nn.Module = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
        num_classes = len(self.class_names)
        self.train_metrics = metric_collection(task, num_classes, "train/", training=True)
        self.val_metrics = metric_collection(task, num_classes, "val/")
        self.test_metrics = metric_collection(task, num_classes, "test/")
        self.example_input_array = torch.zeros(2, *input_shape)  # for the TensorBoard graph
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        """Fail at start-up, not mid-fit, on a bad learning rate or a bad optimizer argument."""
        try:
            self.optimizer_factory(self.net.parameters())
        except (ValueError, TypeError) as exc:
            raise InvalidArgument("optimizer", str(exc)) from exc

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.task == "regression" else out

    def logged_metric_names(self) -> list[str]:
        """Every key this module logs at epoch level: what `monitor.metric` may name."""
        return [name for stage in ("train", "val", "test") for name in metric_names(self.task, stage)]

    def _scores(self, out: Tensor) -> Tensor:
        """What metrics see: class probabilities (AUROC needs them) or predicted values."""
        return out.float().softmax(dim=-1) if self.task == "classification" else out.float()

    # -- training ---------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        scheduler = self._scheduler()
        if scheduler is not None and self.scheduler_interval == "epoch":
            # stepped at epoch *start*: a checkpoint taken at an epoch's end resumes with the right rate
            while scheduler.last_epoch < self.current_epoch:
                scheduler.step()

    def training_step(self, chunk: list[Batch] | Batch, chunk_index: int) -> None:
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list), "KilnModule uses one optimizer"
        # Randomness in a step (dropout) depends on (seed, step) only, not on what else drew from the
        # global generator before (data loader set-up does, differently on resume): a resumed run
        # replays an unbroken one exactly.
        torch.manual_seed(self.seed * 1_000_003 + self.global_step)
        scheduler = self._scheduler() if self.scheduler_interval == "step" else None
        batches = chunk if isinstance(chunk, list) else [chunk]
        losses, outputs, targets = [], [], []
        for x, y in batches:
            out = self(x)
            loss = self.loss_fn(out, y)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            if self.gradient_clip_val:
                self.clip_gradients(
                    optimizer.optimizer,
                    gradient_clip_val=self.gradient_clip_val,
                    gradient_clip_algorithm="norm",
                )
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.detach() * len(y))
            outputs.append(out.detach())
            targets.append(y)
        rows = sum(len(y) for y in targets)
        mean_loss = torch.stack(losses).sum() / rows
        if not torch.isfinite(mean_loss):
            raise KilnError(
                f"the training loss became {mean_loss.item()} at epoch {self.current_epoch + 1} (step "
                f"{self.global_step}): the run diverged; likely causes: a learning rate too high "
                f"(model.optimizer.lr), unscaled inputs, or overflow in low precision; lower the learning rate "
                "or set model.gradient_clip_val=1.0. Checkpoints saved so far are kept"
            )
        self.train_metrics.update(self._scores(torch.cat(outputs)), torch.cat(targets))
        self.log("train/loss", mean_loss, on_step=False, on_epoch=True, batch_size=rows, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    # -- evaluation -------------------------------------------------------------------------

    def validation_step(self, chunk: list[Batch] | Batch, chunk_index: int) -> None:
        self._evaluate(chunk, "val")

    def test_step(self, chunk: list[Batch] | Batch, chunk_index: int) -> None:
        self._evaluate(chunk, "test")

    def _evaluate(self, chunk: list[Batch] | Batch, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        for x, y in chunk if isinstance(chunk, list) else [chunk]:
            out = self(x)
            metrics.update(self._scores(out), y)
            self.log(
                f"{stage}/loss",
                self.loss_fn(out, y),
                on_step=False,
                on_epoch=True,
                batch_size=len(y),
                sync_dist=True,
            )

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute())  # compute() syncs across ranks itself
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def predict_step(self, chunk: list[Batch] | Batch, chunk_index: int) -> Tensor:
        return torch.cat([self._scores(self(x)) for x, _ in (chunk if isinstance(chunk, list) else [chunk])])

    # -- optimization -----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    def _scheduler(self) -> Any:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return None
        return schedulers[0] if isinstance(schedulers, list) else schedulers
