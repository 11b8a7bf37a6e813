"""KilnModule's fine-tuning options on tiny in-memory data in a real one-CPU Trainer: label
smoothing, a frozen backbone for the first epochs, a smaller backbone learning rate, gradient
accumulation (the same weights as one batch of k mini-batches' rows, across chunks, epochs' short
ends and a resume inside a window), channels_last and torch.compile."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from kiln.data import SyntheticDataModule
from kiln.data.batches import chunk_loader
from kiln.errors import InvalidArgument, KilnError
from kiln.models import KilnModule
from kiln.models.nets import mlp
from kiln.training.preemption import PREEMPTED_CHECKPOINT, ExactResume, Preemption
from kiln.training.run import hand_accumulation_to_module
from kilntest import PreemptAt

ROWS, FEATURES, CLASSES = 300, 6, 3


class BackboneNet(nn.Module):
    """The shape of kiln.models.backbones.Backbone: a feature extractor and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def tiny_data(shape: tuple[int, ...] = (FEATURES,)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(ROWS, *shape, generator=generator)
    flat = features.flatten(1)
    return features, (flat[:, :CLASSES].argmax(dim=1) + (flat[:, -1] > 1.0).long()) % CLASSES


def loaders(batch_size: int, per_chunk: int, shape: tuple[int, ...] = (FEATURES,)) -> tuple[Any, Any]:
    features, targets = tiny_data(shape)
    rows = torch.arange(ROWS)
    common = {"batch_size": batch_size, "seed": 3}
    train = chunk_loader(features, targets, rows, batches_per_chunk=per_chunk, shuffle=True, **common)
    val = chunk_loader(features, targets, rows, batches_per_chunk=1, shuffle=False, **common)
    return train, val


def new_module(net: Callable[[], nn.Module] | None = None, **settings: Any) -> KilnModule:
    """Built from the same seed: modules made alike start from the same weights."""
    torch.manual_seed(0)
    return KilnModule(
        net=net() if net is not None else mlp([FEATURES], CLASSES, hidden_sizes=[16], dropout=0.0),
        task="classification",
        input_shape=[FEATURES],
        class_names=[str(c) for c in range(CLASSES)],
        optimizer=settings.pop("optimizer", partial(torch.optim.AdamW, lr=0.01)),
        seed=7,
        **settings,
    )


def fit(
    module: KilnModule,
    epochs: int = 2,
    batch_size: int = 32,
    per_chunk: int = 4,
    callbacks: list[L.Callback] | None = None,
    shape: tuple[int, ...] = (FEATURES,),
    **settings: Any,
) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
        **settings,
    )
    train, val = loaders(batch_size, per_chunk, shape)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return trainer


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if x.is_floating_point():
            assert torch.allclose(x, y, rtol=0, atol=atol), (name, (x - y).abs().max())


# -- label smoothing ---------------------------------------------------------------------------


def test_label_smoothing_smooths_the_training_loss_and_evaluation_reports_the_plain_loss():
    module = new_module(optimizer=partial(torch.optim.SGD, lr=0.0), label_smoothing=0.2)
    with torch.no_grad():  # confident logits, where smoothing shows
        for parameter in module.net.parameters():
            parameter.mul_(4)
    trainer = fit(module, epochs=1)  # lr 0: the weights stay as they were, so the losses are known
    features, targets = tiny_data()
    with torch.no_grad():
        logits = module(features)
    smoothed = nn.functional.cross_entropy(logits, targets, label_smoothing=0.2)
    plain = nn.functional.cross_entropy(logits, targets)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float(smoothed), rel=1e-5)
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(float(plain), rel=1e-5)
    assert abs(float(smoothed) - float(plain)) > 0.01  # far apart against the tolerance above


@pytest.mark.parametrize(
    ("settings", "argument", "message"),
    [
        ({"label_smoothing": 1.0}, "label_smoothing", "must be >= 0 and < 1"),
        ({"label_smoothing": -0.1}, "label_smoothing", "must be >= 0 and < 1"),
        ({"freeze_backbone_epochs": 2}, "freeze_backbone_epochs", "the net has no `backbone` submodule"),
        ({"freeze_backbone_epochs": -1}, "freeze_backbone_epochs", "an integer >= 0"),
        ({"backbone_lr_scale": 0.1}, "backbone_lr_scale", "the net has no `backbone` submodule"),
        ({"backbone_lr_scale": 0.0}, "backbone_lr_scale", "must be > 0"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches", "an integer >= 1"),
    ],
)
def test_bad_fine_tuning_settings_are_refused_at_construction(
    settings: dict[str, Any], argument: str, message: str
):
    with pytest.raises(InvalidArgument, match=message) as raised:
        new_module(**settings)  # an MLP: no backbone
    assert raised.value.argument == argument


def test_label_smoothing_is_refused_for_a_regression():
    with pytest.raises(InvalidArgument, match="only for classification") as raised:
        KilnModule(net=nn.Linear(FEATURES, 1), task="regression", input_shape=[FEATURES], label_smoothing=0.1)
    assert raised.value.argument == "label_smoothing"


# -- a frozen backbone, a smaller backbone learning rate -----------------------------------------


class Snapshots(L.Callback):
    """The backbone's and head's weights and BatchNorm statistics after each epoch, and in each
    epoch's steps whether the BatchNorm layer was training and the backbone took gradients."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.norm_training: list[set[bool]] = []
        self.backbone_grad: list[set[bool]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.norm_training.append(set())
        self.backbone_grad.append(set())

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.norm_training[-1].add(pl_module.net.backbone[1].training)
        self.backbone_grad[-1].add(pl_module.net.backbone[0].weight.requires_grad)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> set[str]:
    return {name for name in before if name.startswith(prefix) and not torch.equal(before[name], after[name])}


def test_a_frozen_backbone_is_bit_identical_with_its_batchnorm_statistics_until_it_trains():
    module = new_module(
        BackboneNet,
        optimizer=partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1),  # fused; decay would show
        freeze_backbone_epochs=2,
        backbone_lr_scale=0.5,  # the backbone's own param group is all grad-None while frozen
    )
    initial = {k: v.clone() for k, v in module.net.state_dict().items()}
    snapshots = Snapshots()
    fit(module, epochs=3, callbacks=[snapshots])
    assert module.optimizers().optimizer.defaults["fused"] is True
    first, second, third = snapshots.states
    backbone = {name for name in initial if name.startswith("backbone.")}
    for frozen in (first, second):  # weights, running mean and var, batch count: untouched
        assert changed(initial, frozen, "backbone.") == set()
        assert changed(initial, frozen, "head.") == {"head.weight", "head.bias"}
    assert changed(second, third, "backbone.") == backbone  # epoch 3 trains it, statistics too
    # BatchNorm in eval mode in every frozen step (also after each validation), training after
    assert snapshots.norm_training == [{False}, {False}, {True}]
    # one device: no gradient at all, so no backward through the backbone either
    assert snapshots.backbone_grad == [{False}, {False}, {True}]
    assert all(p.requires_grad for p in module.parameters())  # fit() leaves the net trainable


def test_a_run_resumed_inside_the_freeze_freezes_by_its_epoch(tmp_path: Path):
    module = new_module(BackboneNet, freeze_backbone_epochs=2)
    trainer = fit(module, epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = new_module(BackboneNet, freeze_backbone_epochs=2)
    snapshots = Snapshots()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[snapshots],
    )
    train, val = loaders(32, 4)
    trainer.fit(resumed, train_dataloaders=train, val_dataloaders=val, ckpt_path=tmp_path / "epoch1.ckpt")
    assert snapshots.norm_training == [{False}, {True}]  # epoch 2 still frozen, epoch 3 not
    saved = {k: v for k, v in module.net.state_dict().items() if k.startswith("backbone.")}
    assert all(torch.equal(snapshots.states[0][k], v) for k, v in saved.items())


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def test_the_backbone_gets_its_own_learning_rate_and_both_follow_the_schedule():
    step_lr = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    for factory, lr in (
        (partial(torch.optim.AdamW, lr=0.02), 0.02),
        (lambda params: torch.optim.SGD(params, lr=0.03, momentum=0.9), 0.03),
        (torch.optim.Adam, 0.001),  # its default lr
    ):
        module = new_module(BackboneNet, optimizer=factory, backbone_lr_scale=0.1)
        module.scheduler_factory = step_lr
        configured = module.configure_optimizers()
        optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
        backbone_group = optimizer.param_groups[1]["params"]
        assert {id(p) for p in backbone_group} == {id(p) for p in module.net.backbone.parameters()}
        assert len(optimizer.param_groups[0]["params"]) == 2  # the head's weight and bias
        assert learning_rates(optimizer) == pytest.approx({"head": lr, "backbone": lr * 0.1})
        scheduler.step()
        scheduler.step()
        assert learning_rates(optimizer) == pytest.approx({"head": lr / 4, "backbone": lr * 0.1 / 4})

    trained = new_module(BackboneNet, backbone_lr_scale=0.1)  # AdamW, lr 0.01
    trained.scheduler_factory = step_lr
    fit(trained, epochs=3)  # stepped at the start of epochs 2 and 3
    assert learning_rates(trained.optimizers().optimizer) == pytest.approx(
        {"head": 0.0025, "backbone": 0.00025}
    )
    assert len(new_module(BackboneNet).configure_optimizers().param_groups) == 1  # scale 1: as before


# -- gradient accumulation -----------------------------------------------------------------------


class StepHook(L.Callback):
    """Implementing a backward hook sends the module through Lightning's manual_backward (its
    steps always go through Lightning's optimizer.step, which calls on_before_optimizer_step)."""

    def __init__(self) -> None:
        self.steps = 0
        self.backwards = 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.backwards += 1

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self.steps += 1


def sgd_module(**settings: Any) -> KilnModule:
    module = new_module(optimizer=partial(torch.optim.SGD, lr=0.2), gradient_clip_val=0.5, **settings)
    module.scheduler_factory = partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.7)
    module.scheduler_interval = "step"
    return module


@pytest.mark.slow
@pytest.mark.parametrize("lightning_path", [False, True])
def test_accumulating_k_batches_of_b_rows_trains_what_batches_of_k_times_b_rows_train(lightning_path: bool):
    """16 rows x 3 against 48 rows: 300 rows make 6 full windows and a short one of 12 rows (one
    batch), which must weigh as the 12-row last batch does; 4 batches a chunk: windows cross chunks.
    Clipping and a per-step schedule act on the accumulated gradient, once per real step. A
    validation inside the epoch (after 8 mini-batches) leaves the open window's gradients alone."""
    hooks = [StepHook()] if lightning_path else []
    accumulated, whole = sgd_module(accumulate_grad_batches=3), sgd_module()
    accumulated_trainer = fit(
        accumulated, epochs=3, batch_size=16, per_chunk=4, callbacks=hooks, val_check_interval=0.5
    )
    whole_trainer = fit(whole, epochs=3, batch_size=48, per_chunk=2)
    assert accumulated._direct_steps is not lightning_path
    steps_per_epoch = -(-ROWS // 48)
    assert accumulated_trainer.global_step == whole_trainer.global_step == 3 * steps_per_epoch
    if lightning_path:
        assert hooks[0].steps == 3 * steps_per_epoch
        assert hooks[0].backwards == -(-ROWS // 16) * 3  # one backward a mini-batch
    assert accumulated.lr_schedulers().last_epoch == 3 * steps_per_epoch
    assert_same_weights(accumulated, whole, atol=1e-6)
    start, end = sgd_module().net.state_dict(), whole.net.state_dict()
    assert all((start[name] - end[name]).abs().max() > 1e-2 for name in start)  # it did train


def test_the_run_hands_trainer_accumulation_to_kilns_module_and_leaves_a_users_to_lightning():
    module = new_module()
    settings = {"max_epochs": 2, "accumulate_grad_batches": 4}
    assert hand_accumulation_to_module(settings, module) == {"max_epochs": 2, "accumulate_grad_batches": 1}
    assert module.accumulate_grad_batches == 4 and module.hparams["accumulate_grad_batches"] == 4
    own = L.LightningModule()  # automatic optimization: Lightning accumulates
    assert hand_accumulation_to_module(settings, own) is settings
    assert hand_accumulation_to_module({"max_epochs": 2}, new_module()) == {"max_epochs": 2}
    with pytest.raises(KilnError, match=r"model\.accumulate_grad_batches=2: set only one of them"):
        hand_accumulation_to_module(settings, new_module(accumulate_grad_batches=2))


def fit_synthetic(
    module: KilnModule, callbacks: list[L.Callback], ckpt_path: Path | None = None
) -> L.Trainer:
    data = SyntheticDataModule(
        num_samples=600, num_features=FEATURES, num_classes=CLASSES, batch_size=32, batches_per_chunk=2
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def dropout_module() -> KilnModule:
    net = partial(mlp, [FEATURES], CLASSES, hidden_sizes=[16], dropout=0.3)  # the draws must match too
    return new_module(net, accumulate_grad_batches=3)


def test_a_run_preempted_inside_an_accumulation_window_resumes_it_exactly(tmp_path: Path):
    straight = dropout_module()
    straight_trainer = fit_synthetic(straight, [ExactResume()])

    preemption = Preemption(tmp_path, stopped_within_s=0)
    with pytest.raises(KilnError, match="did not stop the job"):  # saved, then waited for SLURM
        fit_synthetic(dropout_module(), [PreemptAt(preemption, epoch=1, chunk=1), preemption])
    saved = torch.load(tmp_path / PREEMPTED_CHECKPOINT, weights_only=True)
    assert saved["kiln_accumulation_window"]["batches"] == 1  # 4 mini-batches in: one of 3 pending
    resumed = dropout_module()
    resumed_trainer = fit_synthetic(resumed, [ExactResume()], ckpt_path=tmp_path / PREEMPTED_CHECKPOINT)

    assert (
        resumed_trainer.global_step == straight_trainer.global_step == 2 * 5
    )  # 420 rows: 14 batches, 5 steps
    assert_same_weights(resumed, straight)  # bit for bit: the pending gradient and the dropout draws


# -- channels_last, torch.compile ----------------------------------------------------------------


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, CLASSES)
    )


def test_channels_last_trains_and_evaluates_in_that_layout_and_leaves_the_usual_one():
    layouts: list[tuple[bool, bool]] = []

    def record(conv: nn.Module, inputs: tuple[torch.Tensor]) -> None:
        channels_last = torch.channels_last
        layouts.append(
            (
                inputs[0].is_contiguous(memory_format=channels_last),
                conv.weight.is_contiguous(memory_format=channels_last),
            )
        )

    # SGD: Adam would turn the conv bias's zero gradient (BatchNorm follows) into lr-sized steps of rounding noise
    sgd = partial(torch.optim.SGD, lr=0.1)
    plain, fast = new_module(conv_net, optimizer=sgd), new_module(conv_net, optimizer=sgd, channels_last=True)
    fast.net[0].register_forward_pre_hook(record)
    fit(plain, epochs=1, shape=(2, 6, 6))
    fit(fast, epochs=1, shape=(2, 6, 6))
    assert layouts and set(layouts) == {(True, True)}  # training and validation steps alike
    assert fast.net[0].weight.is_contiguous()  # after fit: checkpoints from here, export, as before
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert_same_weights(fast, plain, atol=1e-5)  # the same computation in another layout

    mlp_module = new_module(channels_last=True)  # 2-D inputs: nothing to do
    assert fit(mlp_module, epochs=1).global_step == -(-ROWS // 32)


def test_compile_trains_through_a_compiled_net_that_checkpoints_and_export_never_see():
    compiled, plain = new_module(compile=True), new_module()
    compiled.compile_backend = "eager"  # dynamo's tracing without inductor's C++ build: seconds
    fit(compiled, epochs=1)
    fit(plain, epochs=1)
    wrapper = compiled.__dict__["_compiled_net"]
    assert isinstance(wrapper, torch._dynamo.eval_frame.OptimizedModule) and wrapper._orig_mod is compiled.net
    assert "_compiled_net" not in dict(compiled.named_modules())
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no _orig_mod. prefixes
    assert_same_weights(compiled, plain, atol=1e-6)
    assert copy.deepcopy(compiled).__dict__["_compiled_net"] is None  # a copy compiles its own, if it trains


def test_a_platform_where_torch_compile_fails_gets_one_line():
    def no_compiler(graph: Any, example_inputs: Any) -> Any:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n\nSet TORCHDYNAMO_VERBOSE=1")

    module = new_module(compile=True)
    module.compile_backend = no_compiler
    with pytest.raises(KilnError) as raised:
        fit(module, epochs=1)
    message = str(raised.value)
    assert message.startswith("model.compile=true: torch.compile cannot compile the net here (")
    assert "No working C++ compiler found" in message and message.endswith("; set model.compile=false")
    assert "\n" not in message


@pytest.mark.slow
def test_compile_with_inductor_trains_what_eager_trains():
    """The real backend: inductor's C++ build (here 8 s with a warm cache, 40 s cold on 2 cores)."""
    compiled, plain = new_module(compile=True), new_module()
    fit(compiled, epochs=1)
    fit(plain, epochs=1)
    assert_same_weights(compiled, plain, atol=1e-4)  # inductor fuses: rounding differs
