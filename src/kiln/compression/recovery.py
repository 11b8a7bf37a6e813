"""Recovery by training: when a cheaper variant of an `auto` recipe misses the metric budget, a
short fine-tune through the module's own training_step tries to win the accuracy back.

    int8 static missed   ->  <name>_qat:        quantization-aware fine-tune, then int8 static again
    pruning missed       ->  <name>_distilled:  the pruned net fine-tuned with the fp32 model as teacher

Both run for at most `compress.recovery_epochs` epochs (0: no recovery) with the run's trainer
settings and the module's own optimizer (learning rate times RECOVERY_LR_SCALE), keep their best
epoch by monitor.metric, and become variants of their own, judged by the export like every other.

"Missed" is decided as the export decides it (kiln.compression.choose.within_budget): the
variant's graph is scored by the module's own validation_step in onnxruntime, its drop from the
uncompressed model's gets the same paired bootstrap interval, and `compress.decision` says which
end counts. A pruned candidate abandoned during its own fine-tune missed by definition.

The quantization-aware route, exactly: fake quantization in torch on every Conv and Linear of the
exported part (weights symmetric int8 per output channel, the layer's input asymmetric uint8 per
tensor with a running min/max), trained with straight-through gradients; the fake quantizers are
then removed, the tuned fp32 weights exported, and onnxruntime's static QDQ quantization applied
with the candidate's own calibration (the same batches as the variant that missed). The fine-tune
teaches the weights to live with int8 rounding; onnxruntime chooses the final ranges.

What a module needs (anything else is refused in one line naming what is missing):
- both: a `training_step` that calls the exported part's forward (`self(x)` or the part that
  kiln_export_module() returns), and a validation_step logging monitor.metric.
- distillation: a classifier whose exported part answers logits, shape (batch, classes). Its
  term is added at the logits' gradient (SoftTargets), so automatic and manual optimization both
  work; with gradient accumulation the term is not divided among the accumulated batches.
- QAT: at least one Conv or Linear layer in the exported part.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kiln.compression.recipes import (  # the settings are a recipe's; recovery uses them
    RecoverySettings,
    read_settings,
)

RECOVERY_LR_SCALE = 0.3  # the fine-tune's learning rate: the module's own times this
QUANTIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
RANGE_MOMENTUM = 0.9  # of the activations' running min/max: a fine-tune's ranges drift slowly


@dataclass
class Work:
    """What the recovery fine-tunes need from the compression in progress (kiln.compression.pipeline)."""

    module: Any
    datamodule: Any
    staging: Path  # the compress directory being written: nets and weights go there
    monitor: dict[str, str]
    example: Tensor
    opset: int
    exporter: str
    finetune_trainer: dict[str, Any]
    calibration: Callable[[int, int], list[Any]]
    watch: Any
    say: Callable[[str], None]


def recover(
    recipe: Any,
    variants: list[dict[str, Any]],
    abandoned: list[dict[str, Any]],
    budget_of: Callable[[], Any],
    work: Work,
) -> list[dict[str, Any]]:
    """The recovered variants of an auto recipe's candidates that missed the budget `budget_of()`
    gives (kiln.compression.pruning.Budget, asked only when recovery is on; None: the module does
    not log the metric, nothing to judge). A recovery kiln cannot run on this module is added to
    `abandoned`, with its one-line reason."""
    from kiln.compression.steps import QuantizeStatic

    settings = read_settings(recipe.config or {})
    if not recipe.auto or settings.epochs == 0:
        return []
    fresh_metric_states(work.module)  # an int8 search may have scored it under inference mode
    budget = budget_of()
    if budget is None:
        return []
    judges: list[Judge] = []  # made on first use: its baseline costs a validation pass

    def missed_budget(name: str, net: Path) -> str | None:
        if not judges:
            judges.append(Judge(work.module, work.datamodule, budget, recipe.decision))
        return judges[0].missed(name, net)

    built = {variant["name"]: variant for variant in variants}
    given_up = {record["name"]: record for record in abandoned}
    recovered = []
    for candidate in recipe.candidates:
        quantizer = candidate.quantize_step
        if not candidate.prune_steps and isinstance(quantizer, QuantizeStatic) and candidate.name in built:
            missed = missed_budget(candidate.name, work.staging / built[candidate.name]["net_onnx"])
            if missed:
                work.say(f"{candidate.name}: {missed}; recovering by a quantization-aware fine-tune")
                recovered.append(quantization_aware(candidate, settings, work, abandoned))
        elif candidate.prune_steps and quantizer is None:
            source = built.get(candidate.name)
            if source is not None:
                missed = missed_budget(candidate.name, work.staging / source["net_onnx"])
            else:
                missed = given_up[candidate.name]["abandoned"] if candidate.name in given_up else None
            if missed:
                work.say(f"{candidate.name}: {missed}; recovering by a fine-tune distilled from fp32")
                recovered.append(distilled(candidate, source, settings, work, abandoned))
    return [variant for variant in recovered if variant is not None]


class Judge:
    """Whether a graph is within the budget, as the export will judge it: the module's own
    validation_step with the graph serving forward, the paired bootstrap interval of the drop."""

    def __init__(self, module: Any, datamodule: Any, budget: Any, decision: str) -> None:
        from kiln import contract
        from kiln.compression.pruning import quiet_trainer
        from kiln.export.scoring import EVALUATION_TRAINER, RowRecorder, evaluate

        self.module, self.datamodule, self.budget, self.decision = module, datamodule, budget, decision
        self.target = contract.export_module(module)
        self.task = contract.task(datamodule, module)
        # no inference mode: the metrics' states it would make read-only are updated by the fine-tunes
        one_device = {key: EVALUATION_TRAINER[key] for key in ("accelerator", "devices")}
        self.trainer = quiet_trainer(one_device, datamodule, inference_mode=False)
        self.baseline_rows = RowRecorder(self.target)
        self.baseline = evaluate(module, datamodule, "val", self.baseline_rows, self.trainer)

    def missed(self, name: str, net: Path) -> str | None:
        """Why the graph at `net` misses the budget, or None when it is within it."""
        from kiln.compression.bootstrap import variant_drop_interval
        from kiln.compression.choose import metric_drop, over_budget, within_budget
        from kiln.export import checks
        from kiln.export.scoring import RowRecorder, evaluate_graph

        budget = self.budget
        rows = RowRecorder(self.target)
        session = checks.open_session(net)
        metrics = evaluate_graph(
            self.module, self.target, session, self.datamodule, "val", name, rows, self.trainer
        )
        if budget.metric not in metrics or budget.metric not in self.baseline:
            return None
        baseline = {"val_metrics": self.baseline}
        interval = variant_drop_interval(
            budget.metric, self.task, budget.mode, budget.unit, self.baseline_rows, rows, baseline, metrics
        )
        judged = {
            "passed": True,
            "val_drop": metric_drop(
                self.baseline[budget.metric], metrics[budget.metric], budget.mode, budget.unit
            ),
            "drop_ci95": interval.as_list(),
        }
        if within_budget(judged, budget.max_drop, self.decision):
            return None
        return "misses the budget: " + over_budget(judged, budget.max_drop, budget.unit, self.decision)


def eager_copy(module: Any) -> Any:
    """A copy of the module to fine-tune, in train mode and training eagerly: kiln's own module
    compiles its net with torch.compile when asked (`compile_net`), and a compiled graph runs past
    the hooks recovery adds."""
    copied = copy.deepcopy(module)
    if isinstance(getattr(copied, "compile_net", None), bool):
        copied.compile_net = False
    return copied.train()  # Lightning's fit keeps the modes it finds: the checkpoint's module is in eval


def fresh_metric_states(module: nn.Module) -> None:
    """Reset the module's torchmetrics outside inference mode: a scoring under inference mode (the
    export's evaluation trainer) leaves states that an update outside it may not change in place."""
    from torchmetrics import Metric

    for part in module.modules():
        if isinstance(part, Metric):
            part.reset()


def finetune(model: Any, settings: RecoverySettings, work: Work) -> Any:
    """The recovery's fine-tune: the run's trainer settings, the module's optimizer at
    RECOVERY_LR_SCALE, up to `settings.epochs` epochs, the best epoch by monitor.metric kept."""
    from kiln.compression import pruning

    return pruning.finetune(
        model,
        work.datamodule,
        epochs=settings.epochs,
        patience=settings.epochs,
        monitor=work.monitor["metric"],
        mode=work.monitor["mode"],
        lr_scale=RECOVERY_LR_SCALE,
        trainer_settings=work.finetune_trainer,
    )


def quantization_aware(
    candidate: Any, settings: RecoverySettings, work: Work, abandoned: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """`candidate` (one static int8 step) again, after a quantization-aware fine-tune."""
    from kiln.compression import pruning
    from kiln.contract import export_module

    name = f"{candidate.name}_qat"
    model = eager_copy(work.module)
    target = export_module(model)
    layers = [layer for layer in target.modules() if isinstance(layer, QUANTIZED_LAYERS)]
    steps = [*candidate.step_names, "qat"]
    if not layers:
        return refuse(
            abandoned, name, steps, "QAT needs a Conv or Linear layer in the exported part; it has none"
        )
    work.say(f"{name}: fake-quantized fine-tune of {len(layers)} layers, up to {settings.epochs} epochs")
    with work.watch.part(f"{name}: fine-tune"), fake_quantized(layers) as observed:
        tuned = finetune(model, settings, work)
    if observed.training_calls == 0:
        return refuse(
            abandoned, name, steps, never_called("QAT", target, ", so no fake quantization was trained")
        )
    target = target.eval()
    with (
        work.watch.part(f"{name}: export and quantize"),
        tempfile.TemporaryDirectory(prefix="kiln-qat-") as temp,
    ):
        exported = export_net(target, work)
        fp32_net = Path(temp) / "qat.fp32.onnx"
        save(exported.model, fp32_net)
        net = work.staging / f"{name}.net.onnx"
        warnings = candidate.quantize_step.quantize(fp32_net, net, work.calibration)
    note = (
        f"quantization-aware fine-tune of {candidate.name}: {len(layers)} Conv/Linear layers fake-quantized "
        f"(int8 weights per channel, uint8 inputs per tensor), {tuned['epochs']} epochs "
        f"(best {work.monitor['metric']}={_score(tuned['best_score'])}), then onnxruntime static QDQ "
        "with the same calibration"
    )
    return {
        "name": name,
        "steps": steps,
        "precision": "int8",
        "net_onnx": net.name,
        "weights": None,
        "params": pruning.count_parameters(target),
        "nonzero_params": pruning.count_nonzero(target),
        "recovers": candidate.name,
        **exported_by(exported),
        "notes": [note, *warnings],
    }


def distilled(
    candidate: Any,
    source: dict[str, Any] | None,
    settings: RecoverySettings,
    work: Work,
    abandoned: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """`candidate`'s pruned net (its fine-tuned weights when it was exported, else pruned again)
    fine-tuned with the fp32 model's logits as soft targets."""
    name = f"{candidate.name}_distilled"
    steps = [*candidate.step_names, "distill"]
    refusal = distillation_refusal(work.module, work.datamodule, work.example, settings.epochs)
    if refusal:
        work.say(f"{name}: skipped ({refusal})")
        return refuse(abandoned, name, steps, refusal)
    student, part = pruned_student(candidate, source, work)
    teacher = copy.deepcopy(contract_part(work.module)).eval().requires_grad_(False)
    work.say(
        f"{name}: fine-tuning the pruned net on the fp32 model's logits (temperature "
        f"{settings.temperature:g}, alpha {settings.alpha:g}), up to {settings.epochs} epochs"
    )
    with work.watch.part(f"{name}: fine-tune"), distilling(part, teacher, settings) as calls:
        tuned = finetune(student, settings, work)
    if calls.training == 0:
        return refuse(abandoned, name, steps, never_called("distillation", part))
    note = (
        f"distilled from the fp32 model (temperature {settings.temperature:g}, alpha {settings.alpha:g}): "
        f"{tuned['epochs']} epochs (best {work.monitor['metric']}={_score(tuned['best_score'])})"
    )
    with work.watch.part(f"{name}: export"):
        variant = export_student(part.eval(), name, work)
    return {
        **variant,
        "steps": steps,
        "recovers": candidate.name,
        "notes": [*(source or {}).get("notes", []), note],
    }


def never_called(technique: str, part: nn.Module, consequence: str = "") -> str:
    """Why a fine-tune through the user's training_step taught `part` nothing: it never ran."""
    return (
        f"{technique} needs a training_step that calls {type(part).__name__}.forward (self(x)); this one "
        f"never did{consequence} (define kiln_export_module() returning the part it calls)"
    )


def contract_part(module: Any) -> nn.Module:
    from kiln.contract import export_module

    part: nn.Module = export_module(module)
    return part


def pruned_student(candidate: Any, source: dict[str, Any] | None, work: Work) -> tuple[Any, nn.Module]:
    """A trainable copy of the module whose exported part is `candidate`'s pruned net: the pruned
    variant's fine-tuned weights when it was exported, else pruned again from the fp32 weights."""
    from kiln.compression import pruning

    student = eager_copy(work.module)
    part = contract_part(student)
    if source is not None and source.get("weights"):
        state = torch.load(work.staging / source["weights"], map_location="cpu", weights_only=True)
        pruning.fit_to_state_dict(part, state)
    else:
        for _, step in candidate.prune_steps:
            step.prune(part, work.example)
    return student, part


def export_student(part: nn.Module, name: str, work: Work) -> dict[str, Any]:
    """The distilled net as ONNX and its weights (the export checks parity against them)."""
    from kiln.compression import pruning

    exported = export_net(part, work)
    save(exported.model, work.staging / f"{name}.net.onnx")
    torch.save(part.state_dict(), work.staging / f"{name}.pt")
    return {
        "name": name,
        "precision": "fp32",
        "net_onnx": f"{name}.net.onnx",
        "weights": f"{name}.pt",
        "params": pruning.count_parameters(part),
        "nonzero_params": pruning.count_nonzero(part),
        "sparsity": round(pruning.weight_sparsity(part), 4),
        **exported_by(exported),
    }


def distillation_refusal(
    module: Any, datamodule: Any, example: Tensor, epochs: int, required: bool = False
) -> str | None:
    """Why this module cannot be distilled (one line naming what is missing, and the key that
    asked for it: `compress.distillation.required` when the user did, else recovery_epochs), or None."""
    from kiln import contract

    if required:
        key = "compress.distillation.required=true"
        fix = "or set compress.distillation.required=false to go on without it"
    else:
        key = f"compress.recovery_epochs={epochs}"
        fix = "or set compress.recovery_epochs=0 to turn recovery off"
    task = contract.task(datamodule, module)
    if task != "classification":
        return (
            f"{key}: distillation needs a classification output (logits over classes), and this module "
            f"is {'a ' + task if task else 'not declared a classifier'}; a classifier's datamodule names "
            f"its class_names, {fix}"
        )
    with torch.no_grad():
        output = contract.export_module(module).eval()(example)
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[1] < 2:
        shape = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
        return f"{key}: distillation needs logits of shape (batch, classes); forward answers {shape}; {fix}"
    if bool((output >= 0).all()) and torch.allclose(output.sum(1), torch.ones(len(output)), atol=1e-4):
        return (
            f"{key}: distillation needs logits, and forward answers probabilities (each row sums to 1); "
            f"return the scores before softmax, {fix}"
        )
    return None


def check_distillation_asked(recipe: Any, module: Any, datamodule: Any, example: Any) -> None:
    """With `compress.distillation.required=true`, a module distillation cannot run on is a user
    error (KilnError, one line) before any work; otherwise a refusal waits for a pruned miss and is
    then skipped, saying why."""
    from kiln.errors import KilnError

    settings = read_settings(recipe.config or {})
    if not (recipe.auto and settings.required):
        return
    if not isinstance(example, Tensor):
        raise KilnError(
            "compress.distillation.required=true: distillation retrains through one input tensor, and this "
            "model's forward takes several; set compress.distillation.required=false"
        )
    refusal = distillation_refusal(module, datamodule, example, settings.epochs, required=True)
    if refusal:
        raise KilnError(refusal)


class SoftTargets(torch.autograd.Function):
    """Identity on the student's logits going forward; going back, the gradient of (1 - alpha) *
    the module's own loss + alpha * T^2 * KL(teacher || student), both softened by T (Hinton et al.'s
    soft targets; mean over the rows): the own loss's gradient arrives from above, the
    distillation's is (softmax(z / T) - softmax(teacher / T)) * T / rows. Added at the logits, it
    needs nothing of training_step but that it calls forward and backpropagates through the
    logits: automatic or manual optimization alike."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, teacher_logits: Tensor, temperature: float, alpha: float) -> Tensor:
        ctx.save_for_backward(logits, teacher_logits)
        ctx.temperature, ctx.alpha = temperature, alpha
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None, None, None]:
        logits, teacher_logits = ctx.saved_tensors
        temperature, alpha = ctx.temperature, ctx.alpha
        student = torch.softmax(logits.detach().float() / temperature, dim=-1)
        teacher = torch.softmax(teacher_logits.float() / temperature, dim=-1)
        distillation = (student - teacher) * temperature / len(logits)
        return (1 - alpha) * grads[0] + alpha * distillation.to(grads[0].dtype), None, None, None


@dataclass
class Calls:
    training: int = 0  # forward calls made in training (with gradients)


@contextmanager
def distilling(student: nn.Module, teacher: nn.Module, settings: RecoverySettings) -> Iterator[Calls]:
    """While active, every training forward of `student` learns from `teacher`'s logits as well
    (SoftTargets); the calls are counted (none: the training_step never called it)."""
    calls = Calls()

    def soften(part: nn.Module, inputs: Any, output: Any) -> Any:
        if not (part.training and torch.is_grad_enabled() and isinstance(output, Tensor) and inputs):
            return None
        calls.training += 1
        with torch.no_grad():
            teacher_logits = teacher.to(output.device)(inputs[0])
        return SoftTargets.apply(output, teacher_logits, settings.temperature, settings.alpha)

    hook = student.register_forward_hook(soften)
    try:
        yield calls
    finally:
        hook.remove()
        teacher.cpu()


class FakeQuantizedWeight(nn.Module):
    """A parametrization: the weight as int8 would store it, symmetric, one scale per output
    channel (straight-through gradients: the fp32 weight keeps learning)."""

    def forward(self, weight: Tensor) -> Tensor:
        scale = weight.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / 127
        zero = torch.zeros(len(scale), dtype=torch.int32, device=weight.device)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -127, 127)


class InputRange:
    """A forward pre-hook: rounds a layer's input as uint8 per tensor would, over the running
    min/max of the inputs seen in training; counts the calls made in training."""

    def __init__(self, counter: Observed) -> None:
        self.low: float | None = None
        self.high: float | None = None
        self.counter = counter

    def __call__(self, layer: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = inputs[0] if inputs else None
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None
        if layer.training and torch.is_grad_enabled():
            self.counter.training_calls += 1
            self.observe(float(x.detach().min()), float(x.detach().max()))
        if self.low is None or self.high is None:
            return None
        low, high = min(self.low, 0.0), max(self.high, 0.0)  # zero must be exact in uint8
        scale = max(high - low, 1e-8) / 255
        zero_point = round(-low / scale)
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255), *inputs[1:])

    def observe(self, low: float, high: float) -> None:
        if self.low is None or self.high is None:
            self.low, self.high = low, high
        else:
            self.low = RANGE_MOMENTUM * self.low + (1 - RANGE_MOMENTUM) * low
            self.high = RANGE_MOMENTUM * self.high + (1 - RANGE_MOMENTUM) * high


@dataclass
class Observed:
    training_calls: int = 0


@contextmanager
def fake_quantized(layers: Sequence[nn.Module]) -> Iterator[Observed]:
    """While active, `layers` compute with fake-quantized weights and inputs; after, they are plain
    layers again holding the fine-tuned fp32 weights."""
    from torch.nn.utils import parametrize

    observed = Observed()
    hooks = []
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", FakeQuantizedWeight())
        hooks.append(layer.register_forward_pre_hook(InputRange(observed)))
    try:
        yield observed
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


def refuse(
    abandoned: list[dict[str, Any]], name: str, steps: list[str], reason: str
) -> dict[str, Any] | None:
    """A recovery not run on this module: one line in the report's abandoned list; no variant."""
    abandoned.append(
        {"name": name, "steps": steps, "params": None, "abandoned": reason, "budget_drops": [], "notes": []}
    )
    return None


def export_net(net: nn.Module, work: Work) -> Any:
    from kiln.export.onnx_export import export_graph

    return export_graph(net, work.example, work.opset, work.exporter)


def exported_by(exported: Any) -> dict[str, str]:
    from kiln.export.onnx_export import exported_by as record

    return record(exported)


def save(model: Any, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
