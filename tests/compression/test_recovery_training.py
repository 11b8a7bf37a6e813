"""Recovery by training (kiln.compression.recovery): the quantization-aware fine-tune's fake
quantization, the distillation loss, what a module needs for each, and compress.recovery_epochs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.compression.recovery import (
    RecoverySettings,
    distillation_refusal,
    distilling,
    fake_quantized,
    never_called,
    read_settings,
)
from kiln.errors import KilnError


def test_fake_quantization_rounds_weights_per_channel_and_inputs_per_tensor_then_leaves_a_plain_layer():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    layer.weight.data = torch.tensor([[0.5, -0.25, 0.1], [2.0, 1.0, -0.013]])
    x = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.2, 3.0]])
    with fake_quantized([layer]) as observed:
        layer.train()
        out = layer(x)
        quantized_weight = layer.weight.detach()
    # int8 weights: a grid of max|w| / 127 per output channel (0.5/127 and 2.0/127)
    steps = quantized_weight / torch.tensor([[0.5 / 127], [2.0 / 127]])
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert not torch.equal(quantized_weight[1, 2], torch.tensor(-0.013))  # rounded to the grid
    # the input: uint8 over the observed range [0, 3], a step of 3/255
    scale = 3.0 / 255
    expected = (x / scale).round() * scale @ quantized_weight.T + layer.bias.detach()
    assert torch.allclose(out, expected, atol=1e-5)
    assert observed.training_calls == 1
    # after: the plain layer with its fp32 weights, no hook, no parametrization
    assert torch.equal(layer.weight.detach()[1, 2], torch.tensor(-0.013))
    assert not layer._forward_pre_hooks and "parametrizations" not in dict(layer.named_modules())


def test_the_fine_tune_trains_the_fp32_weights_through_the_rounding():
    torch.manual_seed(0)
    layer = nn.Linear(4, 2)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with fake_quantized([layer]):
        layer.train()
        layer(torch.randn(8, 4)).pow(2).sum().backward()
        optimizer.step()
    assert isinstance(layer.weight, nn.Parameter)
    assert not torch.allclose(layer.weight, before)  # straight-through gradients reached them


class Classifier(nn.Module):
    """What distilling() uses of a LightningModule: a training_step that calls the part's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


def test_distillation_trains_on_the_own_loss_and_the_teachers_softened_logits_by_their_gradient():
    torch.manual_seed(0)
    student, teacher = Classifier(), nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    settings = RecoverySettings(epochs=1, temperature=2.0, alpha=0.25)
    with distilling(student.net, teacher, settings) as calls:
        own = student.training_step((x, y), 0)  # the module's own loss, as its training_step returns it
        own.backward()
    distilled = student.net.weight.grad.clone()
    assert calls.training == 1
    # the same gradient by autograd of the textbook loss: (1 - a) * CE + a * T^2 * KL(teacher || student)
    student.net.weight.grad = None
    logits = student.net(x)
    soft = F.softmax(teacher(x).detach() / 2.0, dim=-1)
    kl = F.kl_div(F.log_softmax(logits / 2.0, dim=-1), soft, reduction="batchmean")
    (0.75 * F.cross_entropy(logits, y) + 0.25 * 4.0 * kl).backward()
    assert torch.allclose(distilled, student.net.weight.grad, atol=1e-6)
    assert float(kl.detach()) > 0.01  # the teacher's term is not nothing
    student.net.weight.grad = None
    student.training_step((x, y), 0).backward()  # after: the own loss alone again
    assert not torch.allclose(distilled, student.net.weight.grad, atol=1e-4)


class DataWith:
    def __init__(self, **attributes: object) -> None:
        self.__dict__.update(attributes)


def test_distillation_refuses_a_module_without_logits_in_one_line_naming_the_key_and_the_fix():
    example = torch.randn(2, 3)
    classes = DataWith(class_names=["a", "b", "c", "d"])
    assert distillation_refusal(Classifier(), classes, example, 2) is None

    regression = distillation_refusal(Classifier(), DataWith(task="regression"), example, 2)
    assert regression is not None and "\n" not in regression
    assert regression.startswith("compress.recovery_epochs=2: distillation needs a classification output")
    assert "this module is a regression" in regression and "compress.recovery_epochs=0" in regression

    probabilities = Classifier()
    probabilities.forward = lambda x: F.softmax(probabilities.net(x), dim=-1)  # type: ignore[method-assign]
    said = distillation_refusal(probabilities, classes, example, 3)
    assert said is not None and "forward answers probabilities (each row sums to 1)" in said

    one_score = Classifier()
    one_score.net = nn.Linear(3, 1)
    said = distillation_refusal(one_score, classes, example, 2)
    assert said is not None and "needs logits of shape (batch, classes); forward answers [2, 1]" in said


def test_recovery_epochs_must_be_a_whole_number_at_least_zero():
    from kiln.compression.recipes import read_recipe

    auto = {"recipe": "auto", "candidates": {"int8": ["quantize_static"]}}
    assert read_settings(auto) == RecoverySettings(epochs=2, temperature=4.0, alpha=0.5)
    assert read_recipe({**auto, "recovery_epochs": 0}).config["recovery_epochs"] == 0
    for bad in (-1, 1.5, "two"):
        with pytest.raises(KilnError) as raised:
            read_recipe({**auto, "recovery_epochs": bad})
        assert str(raised.value).startswith(f"compress.recovery_epochs={bad}: must be a whole number >= 0")
        assert "compress.recovery_epochs=2" in str(raised.value)
    with pytest.raises(KilnError, match=r"compress.distillation.alpha=1.5: must be between 0 and 1"):
        read_recipe({**auto, "distillation": {"alpha": 1.5}})
    with pytest.raises(KilnError, match=r"compress.distillation=.*\(no key temp\)"):
        read_recipe({**auto, "distillation": {"temp": 2}})


class Scores(nn.Module):
    """A regressor's net: one output per row, nothing distillation could soften."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)
        self.example_input_array = torch.randn(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


DISTILLED_AUTO = {"recipe": "auto", "candidates": {"pruned": ["prune_structured"]}}


def test_distillation_asked_for_explicitly_must_be_able_to_run_one_line_each():
    from kiln.compression.recipes import read_recipe

    asked = {**DISTILLED_AUTO, "distillation": {"required": True}}
    assert read_settings(asked).required is True
    cases = {
        "compress.distillation.required=true: compress.recovery_epochs=0 turns recovery off; "
        "set compress.recovery_epochs=2": {**asked, "recovery_epochs": 0},
        "compress.distillation.required=true: distillation is a recovery of compress=auto; use "
        "compress=auto": {
            "recipe": "prune_structured",
            "steps": ["prune_structured"],
            "distillation": {"required": True},
        },
        "compress.distillation.required=yes: use true": {
            **DISTILLED_AUTO,
            "distillation": {"required": "yes"},
        },
    }
    for line, config in cases.items():
        with pytest.raises(KilnError) as raised:
            read_recipe(config)
        assert str(raised.value).startswith(line) and "\n" not in str(raised.value)
    assert read_recipe({**asked, "recovery_epochs": 2}).config["recovery_epochs"] == 2  # the fix it names


def test_a_module_distillation_cannot_run_on_is_refused_before_any_work_when_it_was_asked_for(tmp_path):
    from kiln.compression.pipeline import compress
    from kiln.compression.recipes import read_recipe

    regression = DataWith(task="regression")
    recipe = read_recipe({**DISTILLED_AUTO, "distillation": {"required": True}})
    with pytest.raises(KilnError) as raised:
        compress(tmp_path, Scores(), regression, recipe, monitor={}, opset=18, seed=0, finetune_trainer={})
    said = str(raised.value)
    assert said.startswith("compress.distillation.required=true: distillation needs a classification output")
    assert "set compress.distillation.required=false to go on without it" in said and "\n" not in said
    assert list(tmp_path.iterdir()) == []  # nothing staged, nothing written
    # the fix it names: required=false lets the compression go on (the skip is said later, below)
    from kiln.compression.recovery import check_distillation_asked

    relaxed = read_recipe({**DISTILLED_AUTO, "distillation": {"required": False}})
    assert check_distillation_asked(relaxed, Scores(), regression, torch.randn(2, 3)) is None


def test_under_auto_a_distillation_the_module_cannot_take_is_skipped_saying_why_in_one_line(tmp_path):
    from kiln.compression.recipes import read_recipe
    from kiln.compression.recovery import Work, distilled

    said: list[str] = []
    work = Work(
        Scores(),
        DataWith(task="regression"),
        tmp_path,
        {},
        torch.randn(2, 3),
        18,
        "auto",
        {},
        list,
        None,
        said.append,
    )
    candidate = read_recipe(DISTILLED_AUTO).candidates[0]
    abandoned: list[dict] = []
    assert distilled(candidate, None, read_settings(DISTILLED_AUTO), work, abandoned) is None
    assert len(said) == 1 and said[0].startswith(
        "pruned_distilled: skipped (compress.recovery_epochs=2: distillation needs a classification output"
    )
    assert [a["name"] for a in abandoned] == ["pruned_distilled"]  # the report keeps the reason
    assert abandoned[0]["abandoned"] in said[0]


def test_a_fine_tune_that_never_reached_the_part_names_the_part_the_technique_and_the_fix():
    line = never_called("QAT", nn.Linear(2, 2), ", so no fake quantization was trained")
    assert line.startswith(
        "QAT needs a training_step that calls Linear.forward (self(x)); this one never did, so no"
    )
    assert line.endswith("(define kiln_export_module() returning the part it calls)")
    assert "\n" not in never_called("distillation", nn.Conv2d(1, 1, 1))
