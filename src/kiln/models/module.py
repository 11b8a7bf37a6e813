"""KilnModule: one LightningModule for classification and regression around a plain `net`.

Training uses manual optimization over *chunks* of mini-batches (see kiln/data/batches.py): one
Lightning step runs `len(chunk)` optimizer steps. Each optimizer step is the idiomatic one
(zero_grad, forward, loss, backward, step) at the configured batch size; only Lightning's
bookkeeping is amortized. Metrics are logged at epoch level only.

On one device in 32-bit or bf16-mixed precision, Lightning's per-step wrappers (manual_backward,
LightningOptimizer.step) only call hooks around plain `loss.backward()` and `optimizer.step()`;
when no callback implements those hooks, kiln calls the two directly (about a tenth of a small
MLP's step time on CPU) and still counts each step where Lightning does (global_step).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from kiln.data.batches import Batch, Chunk
from kiln.errors import InvalidArgument, KilnError, require
from kiln.models.metrics import MeanLoss, metric_collection, metric_names

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


class KilnModule(L.LightningModule):
    # kiln's in-memory loaders may hand this module a Chunk of mini-batches per Lightning step.
    trains_on_chunks = True

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
        self._direct_steps = False  # decided at on_train_start (see _direct_steps_allowed)
        self.loss_fn: nn.Module = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
        num_classes = len(self.class_names)
        self.train_loss, self.val_loss, self.test_loss = MeanLoss(), MeanLoss(), MeanLoss()
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

    def on_train_start(self) -> None:
        self._direct_steps = _direct_steps_allowed(self)

    def on_train_epoch_start(self) -> None:
        scheduler = self._scheduler()
        if scheduler is not None and self.scheduler_interval == "epoch":
            # stepped at epoch *start*: a checkpoint taken at an epoch's end resumes with the right rate
            while scheduler.last_epoch < self.current_epoch:
                scheduler.step()

    def training_step(self, chunk: Chunk | Batch, chunk_index: int) -> None:
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list), "KilnModule uses one optimizer"
        scheduler = self._scheduler() if self.scheduler_interval == "step" else None
        batches = _batches(chunk)
        direct = self._direct_steps
        losses, outputs, targets = [], [], []
        for x, y in batches:
            self._seed_step()
            out = self(x)
            loss = self.loss_fn(out, y)
            optimizer.zero_grad(set_to_none=True)
            if direct:
                loss.backward()
            else:
                self.manual_backward(loss)
            if self.gradient_clip_val:
                self.clip_gradients(
                    optimizer.optimizer,
                    gradient_clip_val=self.gradient_clip_val,
                    gradient_clip_algorithm="norm",
                )
            if direct:  # the step counting of LightningOptimizer.step, without its hook calls
                optimizer._on_before_step()
                optimizer.optimizer.step()
                optimizer._on_after_step()
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.detach())
            outputs.append(out.detach())
            targets.append(y)
        batch_losses = torch.stack(losses)
        if not torch.isfinite(batch_losses).all():
            raise KilnError(
                f"the training loss became {batch_losses.sum().item()} at epoch {self.current_epoch + 1} (step "
                f"{self.global_step}): the run diverged; likely causes: a learning rate too high "
                f"(model.optimizer.lr), unscaled inputs, or overflow in low precision; lower the learning rate "
                "or set model.gradient_clip_val=1.0. Checkpoints saved so far are kept"
            )
        rows = torch.tensor([float(len(y)) for y in targets], device=batch_losses.device)
        self.train_loss.update(batch_losses, rows)
        outputs_all = torch.cat(outputs).float()  # logits: accuracy takes their argmax
        self.train_metrics.update(outputs_all, torch.cat(targets))
        if chunk_index == self.trainer.num_training_batches - 1:
            # logged from the epoch's last step, so callbacks' on_train_epoch_end (checkpointing,
            # progress lines) see this epoch's values: they run before the module's own hook
            self._log_epoch("train")

    def _seed_step(self) -> None:
        """Randomness in an optimizer step (dropout) depends on (seed, step) only, not on what drew
        from the generator before (data loader set-up does, differently on resume) nor on how steps
        are chunked: a resumed run replays an unbroken one exactly. Only this device's generator:
        torch.manual_seed visits every backend (0.4 ms a call here, against 2 us)."""
        seed = self.seed * 1_000_003 + self.global_step
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def on_train_epoch_end(self) -> None:
        if self.train_loss.update_called:  # an epoch of unknown length: its last step was not recognised
            self._log_epoch("train")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A save inside an epoch (a preempted SLURM job) keeps the epoch's running training loss and
        metrics, so the resumed epoch's train/* still cover all its steps. Summed over ranks here
        (saves are collective under DDP) and restored on rank 0 alone. Plain tensors: loadable with
        weights_only=True. Nothing at an epoch's end: the metrics were reset when logged."""
        checkpoint[_EPOCH_STATE_KEY] = {
            name: _state_over_ranks(metric)
            for name, metric in self._train_epoch_metrics().items()
            if metric.update_called  # the same on every rank: ranks take the same steps
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.global_rank != 0:  # the saved state is every rank's sum: counted once
            return
        metrics = self._train_epoch_metrics()
        for name, state in checkpoint.get(_EPOCH_STATE_KEY, {}).items():  # absent from older checkpoints
            if name in metrics:
                for attribute, value in state.items():
                    setattr(metrics[name], attribute, value.to(self.device))
                metrics[name]._update_count = 1  # it has been updated: compute() without a warning

    def _train_epoch_metrics(self) -> dict[str, Metric]:
        return {"loss": self.train_loss, **dict(self.train_metrics.items(keep_base=True))}

    # -- evaluation -------------------------------------------------------------------------

    def validation_step(self, batch: Chunk | Batch, batch_index: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Chunk | Batch, batch_index: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Chunk | Batch, stage: str) -> None:
        loss, metrics = self._stage_state(stage)
        for x, y in _batches(batch):
            out = self(x)
            loss.update(self.loss_fn(out, y), torch.tensor(float(len(y)), device=out.device))
            metrics.update(self._scores(out), y)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _stage_state(self, stage: str) -> tuple[MeanLoss, MetricCollection]:
        if stage == "train":
            return self.train_loss, self.train_metrics
        return (self.val_loss, self.val_metrics) if stage == "val" else (self.test_loss, self.test_metrics)

    def _log_epoch(self, stage: str) -> None:
        """The epoch's mean loss (weighted by rows) and metrics; compute() reduces over ranks itself.
        Accumulated in metrics, not self.log per step: Lightning's self.log costs about 1 ms a call."""
        loss, metrics = self._stage_state(stage)
        values = {f"{stage}/loss": loss.compute(), **metrics.compute()}
        # one value per epoch, so its weight is moot; given, Lightning does not guess it from the chunk
        self.log_dict(values, on_step=False, on_epoch=True, batch_size=1)
        loss.reset()
        metrics.reset()

    def predict_step(self, batch: Chunk | Batch, batch_index: int) -> Tensor:
        return torch.cat([self._scores(self(x)) for x, _ in _batches(batch)])

    # -- optimization -----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        # Under mixed precision Lightning refuses to clip a fused optimizer's gradients (its kernel
        # unscales them itself), so there clipping keeps torch's default loop.
        mixed = self._trainer is not None and isinstance(self.trainer.precision_plugin, MixedPrecision)
        fused = not (mixed and self.gradient_clip_val)
        optimizer = build_optimizer(self.optimizer_factory, self.parameters(), fused=fused)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    def _scheduler(self) -> Any:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return None
        return schedulers[0] if isinstance(schedulers, list) else schedulers


def _batches(item: Chunk | Sequence[Tensor]) -> list[Batch]:
    """The (x, y) mini-batches of one loader item: a kiln Chunk, or one batch from any loader
    (a tuple, or the default collate's list; entries after x and y are left alone)."""
    if isinstance(item, Chunk):
        return item
    return [(item[0], item[1])]


def build_optimizer(
    factory: OptimizerFactory, parameters: Iterable[nn.Parameter], *, fused: bool = True
) -> torch.optim.Optimizer:
    """The configured optimizer, on torch's fused kernel (with `fused`) when it has one (Adam, AdamW,
    SGD, Adagrad) and the config chose no implementation (`fused` or `foreach`): each parameter is
    updated by one kernel instead of a dozen. On 2 CPU cores AdamW's step gets about 3x faster,
    which is a fifth of a small MLP's training step. `+model.optimizer.fused=false` keeps torch's
    default loop."""
    parameters = list(parameters)
    keywords = factory.keywords if isinstance(factory, functools.partial) else {}
    chosen = any(keywords.get(name) is not None for name in ("fused", "foreach"))
    if not fused or chosen or "fused" not in inspect.signature(factory).parameters:
        return factory(parameters)
    try:
        return factory(parameters, fused=True)
    except RuntimeError:  # a device or dtype the fused kernel does not support: torch's default
        return factory(parameters)


_EPOCH_STATE_KEY = "kiln_train_epoch_metrics"


def _state_over_ranks(metric: Metric) -> dict[str, Tensor]:
    """The metric's state tensors, reduced over all ranks (each rank holds its own rows' share).
    List states (rows kept whole, as AUROC's) are not kept: the training metrics have none."""
    with metric.sync_context(should_unsync=True):
        state = metric.metric_state
        return {name: value.detach().clone() for name, value in state.items() if isinstance(value, Tensor)}


# Hooks Lightning's manual_backward and LightningOptimizer.step exist to call.
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def _direct_steps_allowed(module: KilnModule) -> bool:
    """True when Lightning's per-step wrappers would add nothing but calls to unimplemented hooks:
    one device (DDP's backward prepares gradient reduction), 32-bit or bf16-mixed precision (no
    gradient scaler to apply), and no callback or module overriding a step hook or `backward`."""
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.model_helpers import is_overridden

    trainer = module.trainer
    precision = trainer.precision_plugin
    plain_precision = type(precision) is Precision or (
        type(precision) is MixedPrecision and precision.scaler is None
    )
    callbacks: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]
    hooked = any(
        is_overridden(hook, module, L.LightningModule) for hook in ("backward", *_STEP_HOOKS)
    ) or any(is_overridden(hook, callback, L.Callback) for callback in callbacks for hook in _STEP_HOOKS)
    return type(trainer.strategy) is SingleDeviceStrategy and plain_precision and not hooked
