"""KilnModule: one LightningModule for classification and regression around a plain `net`.

Training uses manual optimization over *chunks* of mini-batches (see kiln/data/batches.py): one
Lightning step runs `len(chunk)` optimizer steps. Each optimizer step is the idiomatic one
(zero_grad, forward, loss, backward, step) at the configured batch size; only Lightning's
bookkeeping is amortized. Metrics are logged at epoch level only.

On one device in 32-bit or bf16-mixed precision, Lightning's manual_backward only calls hooks
around a plain `loss.backward()`; when neither the module nor a callback implements them, kiln
calls `loss.backward()` itself (manual_backward's hooks cost about a twentieth of a small MLP's
step on CPU). Every optimizer step goes through Lightning's public `optimizer.step()`, which
counts it (global_step) and calls `on_before_optimizer_step`.

Fine-tuning options (all off by default): label smoothing, a frozen `net.backbone` for the first
epochs, a smaller learning rate for the backbone, gradient accumulation over mini-batches (across
chunks), channels_last memory format and torch.compile.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from kiln.data.batches import Batch, Chunk
from kiln.errors import InvalidArgument, KilnError, one_line, require
from kiln.models.metrics import MeanLoss, metric_collection, metric_names

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]
_Module = TypeVar("_Module", bound=nn.Module)


class KilnModule(L.LightningModule):
    # kiln's in-memory loaders may hand this module a Chunk of mini-batches per Lightning step.
    trains_on_chunks = True
    # torch.compile's backend (compile=True); tests choose "eager": seconds, no C++ compiler
    compile_backend: str | Callable[..., Any] = "inductor"

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
        label_smoothing: float = 0.0,
        freeze_backbone_epochs: int = 0,
        backbone_lr_scale: float = 1.0,
        accumulate_grad_batches: int = 1,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_arguments(
            net,
            task,
            class_names,
            scheduler_interval=scheduler_interval,
            gradient_clip_val=gradient_clip_val,
            label_smoothing=label_smoothing,
            freeze_backbone_epochs=freeze_backbone_epochs,
            backbone_lr_scale=backbone_lr_scale,
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
        self.label_smoothing = label_smoothing
        self.freeze_backbone_epochs = freeze_backbone_epochs
        self.backbone_lr_scale = backbone_lr_scale
        self.accumulate_grad_batches = accumulate_grad_batches
        self.channels_last = channels_last
        self.compile_net = compile  # not `self.compile`: that is nn.Module's own compile()
        self._set_up_losses(task, label_smoothing)
        self._set_up_training_state()
        self._set_up_metrics(task, input_shape)
        self._check_optimizer()

    def _set_up_losses(self, task: str, label_smoothing: float) -> None:
        """What evaluation reports (val/ and test/loss, and kiln's per-group and importance
        measures): the plain loss, comparable across label_smoothing values. Training may smooth it."""
        self.loss_fn: nn.Module = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
        self.smoothed_loss_fn: nn.Module | None = (
            nn.CrossEntropyLoss(label_smoothing=label_smoothing) if label_smoothing > 0 else None
        )

    def _set_up_training_state(self) -> None:
        """Manual optimization's state between steps: all empty until fit() starts."""
        self.automatic_optimization = False
        self._direct_steps = False  # decided at on_train_start (see _direct_steps_allowed)
        # backbone freezing (see _freeze_backbone)
        self._backbone_frozen = False
        self._frozen_params: list[nn.Parameter] = []
        self._frozen_norms: list[nn.Module] = []
        self._dropped_grads: list[nn.Parameter] = []
        # the open accumulation window: mini-batches and rows so far, rows of its first mini-batch
        self._window_batches = self._window_rows = self._window_unit = 0
        self._restored_grads: dict[str, Tensor] = {}
        # the epoch's training metrics (by name) whose state was restored from a checkpoint: kept
        # here, as torchmetrics' update count cannot be set through its public API
        self._restored_epoch: set[str] = set()
        # torch.compile's callable; deliberately not a registered submodule (see _compiled)
        object.__setattr__(self, "_compiled_net", None)

    def _set_up_metrics(self, task: str, input_shape: Sequence[int]) -> None:
        num_classes = len(self.class_names)
        self.train_loss, self.val_loss, self.test_loss = MeanLoss(), MeanLoss(), MeanLoss()
        self.train_metrics = metric_collection(task, num_classes, "train/", training=True)
        self.val_metrics = metric_collection(task, num_classes, "val/")
        self.test_metrics = metric_collection(task, num_classes, "test/")
        self.example_input_array = torch.zeros(2, *input_shape)  # for the TensorBoard graph

    @property
    def accumulate_grad_batches(self) -> int:
        """Mini-batches whose gradients add up to one optimizer step. kiln's run hands
        `trainer.accumulate_grad_batches` to this module: Lightning refuses it under manual
        optimization."""
        return self._accumulate

    @accumulate_grad_batches.setter
    def accumulate_grad_batches(self, k: int) -> None:
        require(_is_int(k) and k >= 1, "accumulate_grad_batches", f"must be an integer >= 1, got {k!r}")
        self._accumulate = k
        self.hparams["accumulate_grad_batches"] = k  # the checkpoint records what was trained

    def _check_optimizer(self) -> None:
        """Fail at start-up, not mid-fit, on a bad learning rate or a bad optimizer argument."""
        try:
            optimizer = self.optimizer_factory(self.net.parameters())
        except (ValueError, TypeError) as exc:
            raise InvalidArgument("optimizer", str(exc)) from exc
        require(
            self.backbone_lr_scale == 1.0 or "lr" in optimizer.defaults,
            "backbone_lr_scale",
            f"scales the optimizer's lr, and {type(optimizer).__name__} has none",
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.task == "regression" else out

    def _outputs(self, x: Tensor) -> Tensor:
        """forward() as training and evaluation run it: in channels_last and through torch.compile
        when chosen. forward() itself stays plain: it is what export traces."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        compiled = self._compiled()
        if compiled is None:
            return self(x)
        out = compiled(x)
        return out.squeeze(-1) if self.task == "regression" else out

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_compiled_net"] = None  # a copy (compression's deepcopy) compiles again if it trains
        return state

    # -- fine-tuning set-up -----------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.channels_last:  # 4-D weights only; the same Parameter objects (optimizers keep them)
            self.net.to(memory_format=torch.channels_last)

    def teardown(self, stage: str) -> None:
        if self.channels_last:  # what follows a fit (TensorBoard graph, export) sees the usual layout
            self.net.to(memory_format=torch.contiguous_format)

    def on_fit_start(self) -> None:
        self._compiled()  # a platform without torch.compile fails here, not mid-epoch

    def _compiled(self) -> Callable[[Tensor], Tensor] | None:
        """The compiled net, made on first use. Kept out of nn.Module's registry (object.__setattr__),
        so state_dict keys, checkpoints and the exported graph are those of the plain net."""
        compiled = self.__dict__["_compiled_net"]
        if compiled is None and self.compile_net:
            try:
                compiled = torch.compile(self.net, backend=self.compile_backend)
            except RuntimeError as exc:  # e.g. a Python version or platform dynamo does not support
                raise _compile_error(exc) from exc
            object.__setattr__(self, "_compiled_net", compiled)
        return compiled

    @contextlib.contextmanager
    def _compile_errors(self) -> Iterator[None]:
        """torch.compile compiles on first call (and again for new shapes), forward and backward: a
        platform where it cannot (no C++ compiler) gets one line, not a compiler's traceback."""
        if self.__dict__["_compiled_net"] is None:
            yield
            return
        from torch._dynamo.exc import BackendCompilerFailed

        try:
            yield
        except BackendCompilerFailed as exc:
            raise _compile_error(exc) from exc

    def _freeze_backbone(self, frozen: bool) -> None:
        """Frozen: the backbone's parameters get no gradient (so no update and no weight decay: torch's
        optimizers skip a parameter whose grad is None) and its BatchNorm layers keep their running
        statistics (eval mode, see train()). Unwrapped (one device) by requires_grad=False, which
        also skips the backbone's backward; under DDP, which fixed the parameters it reduces when it
        wrapped the module, gradients are computed and dropped before each step."""
        if frozen == self._backbone_frozen:
            return
        backbone = _backbone(self.net)
        if frozen:
            self._frozen_params = [p for p in backbone.parameters() if p.requires_grad]
            self._frozen_norms = [m for m in backbone.modules() if isinstance(m, _BATCH_NORMS)]
            unwrapped = not _has_trainer(self) or self.trainer.strategy.model is self
            if unwrapped:
                for parameter in self._frozen_params:
                    parameter.requires_grad_(False)
            else:
                self._dropped_grads = self._frozen_params
            for norm in self._frozen_norms:
                norm.eval()
        else:
            for parameter in self._frozen_params:
                parameter.requires_grad_(True)
            for norm in self._frozen_norms:
                norm.train(self.training)
            self._frozen_params, self._frozen_norms, self._dropped_grads = [], [], []
        self._backbone_frozen = frozen

    def train(self: _Module, mode: bool = True) -> _Module:
        super().train(mode)
        for norm in getattr(self, "_frozen_norms", ()):  # Lightning sets train mode after validation
            norm.eval()
        return self

    def logged_metric_names(self) -> list[str]:
        """Every key this module logs at epoch level: what `monitor.metric` may name."""
        return [name for stage in ("train", "val", "test") for name in metric_names(self.task, stage)]

    def _scores(self, out: Tensor) -> Tensor:
        """What metrics see: class probabilities (AUROC needs them) or predicted values."""
        return out.float().softmax(dim=-1) if self.task == "classification" else out.float()

    # -- training ---------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._direct_steps = _direct_steps_allowed(self)
        # a resumed accumulation window's gradients: here, after Lightning's zero_grad at fit start
        parameters = dict(self.named_parameters())
        for name, grad in self._restored_grads.items():
            parameters[name].grad = grad.to(parameters[name])
        self._restored_grads = {}

    def on_train_epoch_start(self) -> None:
        if self.freeze_backbone_epochs:  # by the epoch, so a resumed run freezes (or not) as it should
            self._freeze_backbone(self.current_epoch < self.freeze_backbone_epochs)
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
        loss_fn = self.loss_fn if self.smoothed_loss_fn is None else self.smoothed_loss_fn
        accumulate = self._accumulate > 1
        epoch_ends = accumulate and self._ends_epoch(chunk_index)
        losses, outputs, targets = [], [], []
        with self._compile_errors():
            for index, (x, y) in enumerate(batches):
                self._seed_step()
                out = self._outputs(x)
                loss = loss_fn(out, y)
                if accumulate:
                    if self._accumulated_backward(
                        loss, len(y), direct, epoch_ends and index == len(batches) - 1
                    ):
                        self._optimizer_step(optimizer, scheduler)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    self._backward(loss, direct)
                    self._optimizer_step(optimizer, scheduler)
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
        labels = torch.cat(targets)
        if labels.is_floating_point() and labels.dim() == 2:  # soft targets (mixup, CutMix): the larger share
            labels = labels.argmax(dim=-1)
        self.train_metrics.update(outputs_all, labels)
        if chunk_index == self.trainer.num_training_batches - 1:
            # logged from the epoch's last step, so callbacks' on_train_epoch_end (checkpointing,
            # progress lines) see this epoch's values: they run before the module's own hook
            self._log_epoch("train")

    def _backward(self, loss: Tensor, direct: bool) -> None:
        if direct:
            loss.backward()
        else:
            self.manual_backward(loss)

    def _optimizer_step(self, optimizer: Any, scheduler: Any) -> None:
        """One real optimizer step on the gradients there are: clipped, then stepped and counted."""
        for parameter in self._dropped_grads:  # a frozen backbone under DDP (see _freeze_backbone)
            parameter.grad = None
        if self.gradient_clip_val:
            self.clip_gradients(
                optimizer.optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm="norm",
            )
        optimizer.step()  # Lightning's public step: it counts the step (global_step) and calls its hooks
        if scheduler is not None:
            scheduler.step()

    def _accumulated_backward(self, loss: Tensor, rows: int, direct: bool, epoch_ends: bool) -> bool:
        """Adds one mini-batch's gradient to the open window; True when the window is complete (k
        mini-batches, or the epoch's last one): its gradients are then the mean loss's over the
        window's rows, as one batch of those rows would give. Each loss is weighted by rows/(k * rows
        of the window's first mini-batch): loss/k for full mini-batches; a short window (the epoch's
        rest) is rescaled when it closes. Windows run across chunks; under DDP only the closing
        backward reduces gradients over ranks."""
        k = self._accumulate
        if self._window_batches == 0:
            self.optimizers().zero_grad(set_to_none=True)  # type: ignore[union-attr]
            self._window_unit = rows
        self._window_batches += 1
        self._window_rows += rows
        closes = self._window_batches == k or epoch_ends
        strategy = self.trainer.strategy
        reduction: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if not (closes or direct) and isinstance(strategy, ParallelStrategy):
            reduction = strategy.block_backward_sync()  # DDP: gradients stay local until the window closes
        with reduction:
            self._backward(loss * (rows / (k * self._window_unit)), direct)
        if not closes:
            return False
        full_rows = k * self._window_unit
        if self._window_rows != full_rows:
            for parameter in self.parameters():
                if parameter.grad is not None:
                    parameter.grad.mul_(full_rows / self._window_rows)
        self._window_batches = self._window_rows = self._window_unit = 0
        return True

    def _ends_epoch(self, chunk_index: int) -> bool:
        """This Lightning step is the epoch's last: a known length, or (any loader) the fetcher
        found no next batch. Lightning counts an optimizer step only inside training_step, so an
        accumulation window's rest is stepped here, not in on_train_epoch_end."""
        if chunk_index == self.trainer.num_training_batches - 1:
            return True
        return bool(self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    def _seed_step(self) -> None:
        """Randomness in an optimizer step (dropout) depends on (seed, step) only, not on what drew
        from the generator before (data loader set-up does, differently on resume) nor on how steps
        are chunked: a resumed run replays an unbroken one exactly. Only this device's generator:
        torch.manual_seed visits every backend (0.4 ms a call here, against 2 us). An accumulated
        step's mini-batches draw differently: the window's position is part of the seed."""
        seed = self.seed * 1_000_003 + self.global_step + self._window_batches * _WINDOW_SEED_STRIDE
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def on_train_epoch_end(self) -> None:
        if self._holds_epoch_state("loss"):  # an epoch of unknown length: its last step was not recognised
            self._log_epoch("train")
        self._discard_window()

    def on_train_end(self) -> None:
        self._discard_window()
        self._freeze_backbone(False)  # the module leaves fit() as trainable as it came

    def on_validation_model_zero_grad(self) -> None:
        if not self._window_batches:  # a validation inside an epoch keeps an open window's gradients
            super().on_validation_model_zero_grad()

    def _discard_window(self) -> None:
        """A window still open after the epoch's last step: training stopped inside it (max_steps);
        its gradients are dropped, as Lightning's own accumulation does."""
        if self._window_batches:
            self.optimizers().zero_grad(set_to_none=True)  # type: ignore[union-attr]
            self._window_batches = self._window_rows = self._window_unit = 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A save inside an epoch (a preempted SLURM job) keeps the epoch's running training loss and
        metrics, so the resumed epoch's train/* still cover all its steps. Summed over ranks here
        (saves are collective under DDP) and restored on rank 0 alone. Plain tensors: loadable with
        weights_only=True. Nothing at an epoch's end: the metrics were reset when logged."""
        checkpoint[_EPOCH_STATE_KEY] = {
            name: _state_over_ranks(metric)
            for name, metric in self._train_epoch_metrics().items()
            if self._holds_epoch_state(name)  # the same on every rank: ranks take the same steps
        }
        if self._window_batches:
            checkpoint[_WINDOW_KEY] = self._window_state()

    def _window_state(self) -> dict[str, Any]:
        """An open accumulation window: its counts and its gradients so far. Under DDP each rank's
        partial gradients are replaced by their mean over ranks (exact: the closing step reduces
        sums of them), so every rank can restore the one saved copy."""
        named = [(name, p.grad) for name, p in self.named_parameters() if p.grad is not None]
        flat = torch.cat([grad.detach().flatten() for _, grad in named])
        if _has_trainer(self) and self.trainer.world_size > 1:
            flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
            for (_, grad), mean in zip(named, flat.split([grad.numel() for _, grad in named]), strict=True):
                grad.copy_(mean.view_as(grad))
        return {
            "batches": self._window_batches,
            "rows": self._window_rows,
            "unit": self._window_unit,
            "grads": {name: grad.detach().clone() for name, grad in named},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        window = checkpoint.get(_WINDOW_KEY)
        if window is not None:  # every rank: the saved gradients are already the mean over ranks
            self._restored_grads = window["grads"]  # set at on_train_start
            self._window_batches, self._window_rows = window["batches"], window["rows"]
            self._window_unit = window["unit"]
        if self.global_rank != 0:  # the saved state is every rank's sum: counted once
            return
        metrics = self._train_epoch_metrics()
        for name, state in checkpoint.get(_EPOCH_STATE_KEY, {}).items():  # absent from older checkpoints
            if name in metrics:
                for attribute, value in state.items():
                    setattr(metrics[name], attribute, value.to(self.device))
                self._restored_epoch.add(name)

    def _holds_epoch_state(self, name: str) -> bool:
        """Has this epoch's training metric `name` a state (updated, or restored from a checkpoint)?"""
        return self._train_epoch_metrics()[name].update_called or name in self._restored_epoch

    def _train_epoch_metrics(self) -> dict[str, Metric]:
        return {"loss": self.train_loss, **dict(self.train_metrics.items(keep_base=True))}

    # -- evaluation -------------------------------------------------------------------------

    def validation_step(self, batch: Chunk | Batch, batch_index: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Chunk | Batch, batch_index: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Chunk | Batch, stage: str) -> None:
        loss, metrics = self._stage_state(stage)
        with self._compile_errors():
            for x, y in _batches(batch):
                out = self._outputs(x)
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
        with warnings.catch_warnings():
            if stage == "train" and self._restored_epoch:  # restored, maybe not updated since: not empty
                warnings.filterwarnings("ignore", message=_COMPUTE_BEFORE_UPDATE, category=UserWarning)
            values = {f"{stage}/loss": loss.compute(), **metrics.compute()}
        if stage == "train":
            self._restored_epoch = set()
        # one value per epoch, so its weight is moot; given, Lightning does not guess it from the chunk
        self.log_dict(values, on_step=False, on_epoch=True, batch_size=1)
        loss.reset()
        metrics.reset()

    def predict_step(self, batch: Chunk | Batch, batch_index: int) -> Tensor:
        with self._compile_errors():
            return torch.cat([self._scores(self._outputs(x)) for x, _ in _batches(batch)])

    # -- optimization -----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        # Under mixed precision Lightning refuses to clip a fused optimizer's gradients (its kernel
        # unscales them itself), so there clipping keeps torch's default loop.
        mixed = _has_trainer(self) and isinstance(self.trainer.precision_plugin, MixedPrecision)
        fused = not (mixed and self.gradient_clip_val)
        if self.backbone_lr_scale == 1.0:
            optimizer = build_optimizer(self.optimizer_factory, self.parameters(), fused=fused)
        else:
            # named groups: the learning-rate monitor logs lr-<Optimizer>/head and .../backbone
            backbone = list(_backbone(self.net).parameters())
            in_backbone = {id(p) for p in backbone}
            rest = [p for p in self.parameters() if id(p) not in in_backbone]
            groups = [{"params": rest, "name": "head"}, {"params": backbone, "name": "backbone"}]
            optimizer = build_optimizer(self.optimizer_factory, groups, fused=fused)
            # the configured lr, however the factory was given (a partial's keyword, a default):
            # schedulers made next take each group's lr as its base, so both follow the schedule
            optimizer.param_groups[1]["lr"] = optimizer.defaults["lr"] * self.backbone_lr_scale
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
    factory: OptimizerFactory,
    parameters: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    *,
    fused: bool = True,
) -> torch.optim.Optimizer:
    """The configured optimizer, on torch's fused kernel (with `fused`) when it has one (Adam, AdamW,
    SGD, Adagrad) and the config chose no implementation (`fused` or `foreach`): each parameter is
    updated by one kernel instead of a dozen. On 2 CPU cores AdamW's step gets about 3x faster,
    which is a fifth of a small MLP's training step. `+model.optimizer.fused=false` keeps torch's
    default loop."""
    params = list(parameters)  # parameters, or param groups (dicts)
    keywords = factory.keywords if isinstance(factory, functools.partial) else {}
    chosen = any(keywords.get(name) is not None for name in ("fused", "foreach"))
    if not fused or chosen or "fused" not in inspect.signature(factory).parameters:
        return factory(params)
    try:
        return factory(params, fused=True)
    except RuntimeError:  # a device or dtype the fused kernel does not support: torch's default
        return factory(params)


_EPOCH_STATE_KEY = "kiln_train_epoch_metrics"
# torchmetrics' warning for a compute() with no update() since the last reset
_COMPUTE_BEFORE_UPDATE = r".*``compute`` method of metric .* was called before the ``update`` method"
_WINDOW_KEY = "kiln_accumulation_window"
# Seeds of an accumulation window's later mini-batches: far from any step count a run reaches.
_WINDOW_SEED_STRIDE = 1_000_000_007


# torch's batch norms (their common base, _BatchNorm, is private)
_BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)


def _check_arguments(
    net: nn.Module,
    task: str,
    class_names: Sequence[str],
    *,
    scheduler_interval: str,
    gradient_clip_val: float | None,
    label_smoothing: float,
    freeze_backbone_epochs: int,
    backbone_lr_scale: float,
) -> None:
    """KilnModule's arguments, each checked before anything is built: one line naming a bad one."""
    require(
        task in ("classification", "regression"),
        "task",
        f"must be classification or regression, got {task!r}",
    )
    require(
        task == "regression" or len(class_names) >= 2, "class_names", "classification needs 2 or more classes"
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
    require(0.0 <= label_smoothing < 1.0, "label_smoothing", f"must be >= 0 and < 1, got {label_smoothing}")
    require(
        task == "classification" or label_smoothing == 0.0,
        "label_smoothing",
        "smooths class targets: only for classification (set it to 0 for a regression)",
    )
    require(
        _is_int(freeze_backbone_epochs) and freeze_backbone_epochs >= 0,
        "freeze_backbone_epochs",
        f"must be an integer >= 0, got {freeze_backbone_epochs!r}",
    )
    require(backbone_lr_scale > 0, "backbone_lr_scale", f"must be > 0, got {backbone_lr_scale}")
    _check_backbone_options(net, freeze_backbone_epochs, backbone_lr_scale)


def _check_backbone_options(net: nn.Module, freeze_backbone_epochs: int, backbone_lr_scale: float) -> None:
    has_backbone = isinstance(getattr(net, "backbone", None), nn.Module)
    for argument, used in (
        ("freeze_backbone_epochs", freeze_backbone_epochs > 0),
        ("backbone_lr_scale", backbone_lr_scale != 1.0),
    ):
        require(
            has_backbone or not used,
            argument,
            f"the net has no `backbone` submodule ({type(net).__name__}); it applies to nets with a "
            "`backbone` and a `head`, e.g. kiln.models.backbones.Backbone",
        )


def _has_trainer(module: L.LightningModule) -> bool:
    """Is the module attached to a Trainer? (Lightning's `trainer` property raises when not.)"""
    try:
        module.trainer  # noqa: B018
    except RuntimeError:
        return False
    return True


def _backbone(net: nn.Module) -> nn.Module:
    backbone = net.backbone
    assert isinstance(backbone, nn.Module)  # checked at construction
    return backbone


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _compile_error(exc: BaseException) -> KilnError:
    cause = getattr(exc, "inner_exception", None) or exc  # dynamo's wrapper names only the backend
    text = f"{type(cause).__name__}: {cause}"
    reason = next((line for line in text.splitlines() if line.strip()), type(cause).__name__)
    return KilnError(
        f"model.compile=true: torch.compile cannot compile the net here ({one_line(reason)}); "
        "set model.compile=false"
    )


def _state_over_ranks(metric: Metric) -> dict[str, Tensor]:
    """The metric's state tensors, reduced over all ranks (each rank holds its own rows' share).
    List states (rows kept whole, as AUROC's) are not kept: the training metrics have none."""
    with metric.sync_context(should_unsync=True):
        state = metric.metric_state
        return {name: value.detach().clone() for name, value in state.items() if isinstance(value, Tensor)}


# Hooks Lightning's manual_backward exists to call (besides the module's own `backward`).
_BACKWARD_HOOKS = ("on_before_backward", "on_after_backward")


def _direct_steps_allowed(module: KilnModule) -> bool:
    """True when Lightning's manual_backward would add nothing but calls to unimplemented hooks:
    one device (DDP's backward prepares gradient reduction), 32-bit or bf16-mixed precision (no
    gradient scaler to apply), and no callback or module overriding a backward hook or `backward`."""
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.model_helpers import is_overridden

    trainer = module.trainer
    precision = trainer.precision_plugin
    plain_precision = type(precision) is Precision or (
        type(precision) is MixedPrecision and precision.scaler is None
    )
    callbacks: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]
    hooked = any(
        is_overridden(hook, module, L.LightningModule) for hook in ("backward", *_BACKWARD_HOOKS)
    ) or any(is_overridden(hook, callback, L.Callback) for callback in callbacks for hook in _BACKWARD_HOOKS)
    return type(trainer.strategy) is SingleDeviceStrategy and plain_precision and not hooked
