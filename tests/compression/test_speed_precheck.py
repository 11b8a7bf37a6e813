"""auto's speed pre-check: a candidate whose net is shown slower than the fp32 net at batch 1 could
never ship under objective=latency, so it is abandoned before the export scores and times it
(its evidence recorded); a faster one, or objective=size, goes on as before."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from kiln.compression import pipeline, speed_check
from kiln.export.measure import Stopwatch

WIDTH = 64


def matmul_chain(path: Path, layers: int) -> Path:
    """x (batch, WIDTH) through `layers` MatMuls: more layers, a slower net, the same input."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for index in range(layers):
        weight = numpy_helper.from_array(
            rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.1, f"w{index}"
        )
        weights.append(weight)
        output = "y" if index == layers - 1 else f"h{index}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{index}"], [output]))
        previous = output
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_a_net_shown_slower_at_batch_one_is_abandoned_with_its_speedup_and_its_file_removed(tmp_path: Path):
    matmul_chain(tmp_path / "fp32.net.onnx", 1)
    matmul_chain(tmp_path / "int8_dynamic.net.onnx", 60)  # 60 times the work of fp32's
    variant = {"name": "int8_dynamic", "steps": ["quantize_dynamic"], "precision": "int8", "params": 4096}
    variant |= {"net_onnx": "int8_dynamic.net.onnx", "notes": []}
    recipe = SimpleNamespace(auto=True, objective="latency")
    abandoned: list[dict] = []
    said: list[str] = []
    watch = Stopwatch()
    example = torch.zeros(2, WIDTH)
    assert pipeline.slower_than_fp32(recipe, tmp_path, variant, example, watch, said.append, abandoned)
    (record,) = abandoned
    speedup = record["speedup"]["1"]
    low, high = speedup["ci95"]
    assert low <= speedup["median"] <= high < 1 and speedup["rounds"] >= 8
    assert record["abandoned"].startswith(
        "not scored: its net measured slower than the fp32 net at batch 1 ("
    )
    assert record["abandoned"].endswith("so under compress.objective=latency it could never ship")
    assert said == [f"int8_dynamic: abandoned ({record['abandoned']})"]
    assert not (tmp_path / "int8_dynamic.net.onnx").exists() and (tmp_path / "fp32.net.onnx").exists()
    assert "int8_dynamic: speed pre-check" in watch.seconds  # its cost is in report.json's timings_s


def test_a_faster_net_and_objective_size_are_not_abandoned(tmp_path: Path):
    matmul_chain(tmp_path / "fp32.net.onnx", 60)
    matmul_chain(tmp_path / "quick.net.onnx", 1)
    matmul_chain(tmp_path / "slow.net.onnx", 120)
    example = torch.zeros(2, WIDTH)
    assert (
        speed_check.slower_than_fp32(tmp_path / "fp32.net.onnx", tmp_path / "quick.net.onnx", example, 30)
        is None
    )
    slow = {"name": "slow", "steps": ["quantize_dynamic"], "precision": "int8", "params": 1}
    slow |= {"net_onnx": "slow.net.onnx", "notes": []}
    size = SimpleNamespace(auto=True, objective="size")  # the smallest file ships, whatever its speed
    abandoned: list[dict] = []
    assert not pipeline.slower_than_fp32(size, tmp_path, slow, example, Stopwatch(), print, abandoned)
    assert abandoned == [] and (tmp_path / "slow.net.onnx").exists()
    # several inputs (a dict example): not checked here; the export times every candidate
    assert (
        speed_check.slower_than_fp32(
            tmp_path / "fp32.net.onnx", tmp_path / "slow.net.onnx", {"a": example}, 30
        )
        is None
    )
