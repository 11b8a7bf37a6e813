"""The fp16 variant (kiln.compression.fp16): weights and activations in half precision, float32
in and out, checked against torch, judged by accuracy everywhere; timed only on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kiln.compression import fp16
from kiln.compression.recipes import read_recipe
from kiln.config import compose
from kilntest import QUICK, copy_run

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def test_the_converted_net_keeps_float32_in_and_out_and_answers_as_torch_within_fp16_rounding(tmp_path: Path):
    from kiln.export.onnx_export import export_net

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    x = torch.randn(16, 1, 8, 8)
    onnx.save(export_net(net, x[:2], 18), str(tmp_path / "fp32.onnx"))
    fp16.convert_file(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx")

    model = onnx.load(str(tmp_path / "fp16.onnx"))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [FLOAT]
    assert {t.data_type for t in model.graph.initializer if t.dims} == {FLOAT16}  # every weight
    session = ort.InferenceSession(str(tmp_path / "fp16.onnx"), providers=["CPUExecutionProvider"])
    answered = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = net(x).numpy()
    difference = float(np.max(np.abs(answered - expected)))
    assert 0 < difference < fp16.PARITY_ATOL  # rounded (really fp16), and within the export's tolerance


def test_auto_builds_fp16_only_where_onnxruntime_can_time_it_on_a_gpu(monkeypatch: pytest.MonkeyPatch):
    auto = read_recipe({"recipe": "auto", "candidates": {"int8": ["quantize_static"]}})
    monkeypatch.setattr(fp16, "has_gpu_provider", lambda: True)
    assert [c.name for c in fp16.candidates(auto, [])] == ["int8", "fp16"]
    monkeypatch.setattr(fp16, "has_gpu_provider", lambda: False)
    assert [c.name for c in fp16.candidates(auto, [])] == ["int8"]

    asked = read_recipe(
        {
            "recipe": "auto",
            "candidates": {"int8": ["quantize_static"], "half": ["fp16"]},
            "fp16": {"_target_": "kiln.compression.fp16.ConvertFp16"},
        }
    )
    abandoned: list[dict] = []
    assert [c.name for c in fp16.candidates(asked, abandoned)] == ["int8"]
    assert [a["name"] for a in abandoned] == ["half"]
    assert abandoned[0]["abandoned"].startswith("not built: onnxruntime here has no CUDA execution provider")
    fixed = read_recipe(
        {
            "recipe": "fp16",
            "steps": ["fp16"],
            "fp16": {"_target_": "kiln.compression.fp16.ConvertFp16"},
        }
    )
    assert [c.name for c in fp16.candidates(fixed, [])] == ["fp16"]  # asked for: built anywhere


def test_compress_fp16_ships_a_variant_checked_against_torch_and_judged_by_accuracy(
    digits_cnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from kiln.stages import compress as compress_stage

    monkeypatch.setattr(fp16, "has_gpu_provider", lambda: False)  # the CPU's story, on any machine
    run = copy_run(digits_cnn_run, tmp_path)
    compress_stage.main.call(compose("compress", [f"run={run}", *QUICK, "compress=fp16"]))
    report = json.loads((run / "report.json").read_text())
    assert report["shipped"] == "fp16" and report["status"] == "passed"
    variant = next(v for v in report["variants"] if v["name"] == "fp16")
    assert variant["precision"] == "fp16"
    assert variant["check"].startswith("parity: ") and "allowed 1e-02" in variant["check"]
    assert 0 < variant["parity_max_abs"] < fp16.PARITY_ATOL
    low, high = variant["drop_ci95"]
    assert low <= variant["val_drop"] <= high and abs(variant["val_drop"]) < 1.0
    assert fp16.NOT_ON_CPU in variant["notes"]
    graph = onnx.load(str(run / "model.onnx"))
    assert any(t.data_type == FLOAT16 for t in graph.graph.initializer)


def test_nodes_are_put_in_order_even_along_a_chain_longer_than_the_recursion_limit():
    from onnx import helper

    chain = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(3000)]
    graph = helper.make_graph(
        list(reversed(chain)),  # every node before the one it reads from
        "chain",
        [helper.make_tensor_value_info("t0", FLOAT, [1])],
        [helper.make_tensor_value_info("t3000", FLOAT, [1])],
    )
    fp16.in_order(graph)
    assert [node.output[0] for node in graph.node] == [f"t{i + 1}" for i in range(3000)]
    onnx.checker.check_graph(graph)


def test_where_the_gpu_provider_exists_the_step_times_fp16_against_fp32_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from kiln.export.onnx_export import export_net

    # the CPU provider stands in for CUDA: the timing's logic, not a GPU's numbers
    monkeypatch.setattr(fp16, "CUDA", "CPUExecutionProvider")
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    onnx.save(export_net(net, torch.randn(2, 8), 18), str(tmp_path / "fp32.onnx"))
    batches: list[tuple[int, int]] = []

    def calibration(count: int, size: int) -> list[np.ndarray]:
        batches.append((count, size))
        return [np.random.default_rng(0).normal(size=(size, 8)).astype(np.float32)]

    notes = fp16.ConvertFp16().quantize(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx", calibration)
    assert batches == [(1, 64)]
    assert len(notes) == 1 and notes[0].startswith(
        "fp16 on the GPU (onnxruntime CPUExecutionProvider), batch 64: "
    )
    assert f"medians of {fp16.CUDA_ROUNDS} alternating calls" in notes[0]
    assert (tmp_path / "fp16.onnx").is_file()
