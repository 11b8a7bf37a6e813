"""export.exporter: auto takes torch's torchscript exporter only for a graph it can trust, and falls
back to dynamo (saying why) when the trace might not hold for other inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.export.onnx_export import export_graph
from kiln.export.pipeline import read_settings


class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ScalesByItsInput(nn.Module):
    """float(...) of the input is a Python number to the tracer: the trace would keep the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) / float(x.abs().max())


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), x


def answers(model, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def test_auto_uses_torchscript_for_a_plain_net_and_its_graph_takes_any_batch_size():
    torch.manual_seed(0)
    net = SmallCnn().eval()
    exported = export_graph(net, torch.randn(2, 1, 8, 8), opset=20)
    assert exported.exporter == "torchscript" and exported.fallback_reason == ""
    for rows in (1, 7):
        x = torch.randn(rows, 1, 8, 8)
        with torch.no_grad():
            expected = net(x).numpy()
        assert np.abs(answers(exported.model, x) - expected).max() < 1e-5
    assert {o.domain or "ai.onnx": o.version for o in exported.model.opset_import}["ai.onnx"] == 20


@pytest.mark.slow
def test_auto_falls_back_to_dynamo_when_the_trace_may_not_hold_and_says_why():
    torch.manual_seed(0)
    net = ScalesByItsInput().eval()
    exported = export_graph(net, torch.randn(2, 2, 3), opset=20)
    assert exported.exporter == "dynamo"
    assert "Converting a tensor to a Python float" in exported.fallback_reason
    x = 10 * torch.randn(5, 2, 3)  # another scale and batch than the example's
    with torch.no_grad():
        expected = net(x).numpy()
    assert np.abs(answers(exported.model, x) - expected).max() < 1e-5


def test_a_net_with_two_outputs_is_left_to_dynamo():
    exported = export_graph(TwoOutputs().eval(), torch.randn(2, 6), opset=20)
    assert exported.exporter == "dynamo" and "2 outputs" in exported.fallback_reason


def test_torchscript_asked_for_refuses_an_untrusted_trace_in_one_line():
    with pytest.raises(KilnError) as caught:
        export_graph(ScalesByItsInput().eval(), torch.randn(2, 2, 3), opset=20, exporter="torchscript")
    message = str(caught.value)
    assert message.startswith("export.exporter=torchscript: the torchscript trace may not hold")
    assert message.endswith("use export.exporter=dynamo") and "\n" not in message


def test_dynamo_asked_for_is_used():
    exported = export_graph(SmallCnn().eval(), torch.randn(2, 1, 8, 8), opset=20, exporter="dynamo")
    assert exported.exporter == "dynamo" and exported.fallback_reason == ""


def test_an_unknown_exporter_is_one_line_naming_the_key():
    with pytest.raises(KilnError, match=r"^export.exporter=onnx: use auto .*, dynamo or torchscript$"):
        read_settings({"exporter": "onnx"})
