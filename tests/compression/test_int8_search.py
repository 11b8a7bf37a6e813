"""Accuracy-aware static int8 (compression/int8_search.py): the calibration choices tried in order,
the most sensitive layers returned to fp32 until the drop fits, the search's stops, the sensitivity
proxy, and the settings' bad input. The judge is a stand-in here (scoring and timing have their
own tests); the end-to-end case is in test_int8_hard_case.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kiln.compression import int8_search
from kiln.compression.int8_search import Attempt, rank_layers, search
from kiln.compression.quantization import StaticSettings, prepare, quantize_prepared
from kiln.compression.recipes import read_recipe
from kiln.compression.steps import QuantizeStatic
from kiln.config import config_dir
from kiln.errors import KilnError
from kiln.export.onnx_export import export_graph

FEATURES = 16


def recipe_config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(config_dir() / "compress" / "quantize_static.yaml"))


def three_layers(outlier_in: int | None = None) -> nn.Sequential:
    """16 -> 32 -> 32 -> 4; with `outlier_in`, that layer's weights hold one huge value on an input
    that is always zero (the layer before never fires there): a per-tensor int8 weight scale then
    rounds the rest of its weights to nothing, while no activation range grows."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()
    if outlier_in is not None:
        with torch.no_grad():
            net[outlier_in - 2].weight[0] = 0.0
            net[outlier_in - 2].bias[0] = -1.0  # input 0 of the next layer is always 0 after the ReLU
            net[outlier_in].weight[0, 0] = 200.0
    return net


def prepared_net(tmp_path: Path, net: nn.Module) -> Path:
    exported = export_graph(net, torch.zeros(2, FEATURES), 18, "torchscript")
    onnx.save(exported.model, str(tmp_path / "fp32.onnx"))
    return prepare(tmp_path / "fp32.onnx", tmp_path / "prepared.onnx")


def calibration_set() -> list[np.ndarray]:
    return [np.random.default_rng(i).normal(size=(32, FEATURES)).astype(np.float32) for i in range(2)]


class StandIn:
    """A judge whose drop falls by `per_layer` points for each layer kept in fp32 (from `drop`), with
    a budget of 1 point; `faster` says what the timing shows. It records what it was asked."""

    def __init__(self, drop: float, per_layer: float = 1.0, faster: bool = True, fits: str = "") -> None:
        self.drop, self.per_layer, self.faster, self.fits = drop, per_layer, faster, fits
        self.judged: list[StaticSettings] = []
        self.timed = 0

    def judge(self, settings: StaticSettings, path: Path) -> Attempt:
        self.judged.append(settings)
        drop = self.drop - self.per_layer * len(settings.exclude)
        if self.fits and settings.method == self.fits:
            drop = 0.0
        attempt = Attempt(settings, path, drop, [drop - 0.5, drop + 0.5])
        attempt.within_budget = drop + 0.5 <= 1.0
        attempt.verdict = (
            "within the budget" if attempt.within_budget else f"over the budget ({drop + 0.5:.2f})"
        )
        return attempt

    def time(self, attempt: Attempt, feeds: dict[str, np.ndarray]) -> None:
        self.timed += 1
        attempt.speedup = {
            "median": 2.0 if self.faster else 0.8,
            "ci95": [1.5, 2.5] if self.faster else [0.7, 0.9],
        }
        attempt.faster, attempt.slower = self.faster, not self.faster


def run_search(tmp_path: Path, judge: StandIn, attempts: int = 4, choices=None):
    prepared = prepared_net(tmp_path, three_layers())
    work = tmp_path / "work"
    work.mkdir()
    target = tmp_path / "int8.onnx"
    found, outcome = search(
        choices or [StaticSettings()],
        prepared,
        target,
        calibration_set(),
        judge,  # type: ignore[arg-type]
        attempts,
        work,
    )
    return found, outcome, target, prepared


def float_layers(path: Path) -> set[str]:
    """Names of the Gemm/MatMul nodes whose weight is not dequantized int8 (kept in fp32)."""
    model = onnx.load(str(path))
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {
        n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and n.input[1] not in dequantized
    }


def test_the_most_sensitive_layers_return_to_fp32_until_the_drop_fits(tmp_path: Path):
    judge = StandIn(drop=2.0)  # upper ends: 2.5 with every layer int8, 1.5 with one in fp32, 0.5 with two
    attempts, outcome, target, prepared = run_search(tmp_path, judge)
    kept = [a.settings.exclude for a in attempts]
    ranked = rank_layers(prepared, attempts[0].path, calibration_set()[0])
    assert kept == [(), tuple(ranked[:1]), tuple(ranked[:2])]  # 1, then 2 most sensitive
    assert outcome == "within the budget with 2 layer(s) kept in fp32"
    assert float_layers(target) == set(ranked[:2])  # the graph written is the one that fits
    rows = [a.as_row() for a in attempts]
    assert [r["val_drop"] for r in rows] == [2.0, 1.0, 0.0]
    assert rows[1]["speedup"]["256"]["ci95"] == [1.5, 2.5]  # each fallback attempt is timed
    assert rows[0]["calibration"] == "minmax, per-channel" and rows[2]["kept_fp32"] == ranked[:2]


def test_the_search_stops_when_int8_is_not_faster_than_fp32(tmp_path: Path):
    judge = StandIn(drop=2.0, faster=False)
    attempts, outcome, target, _ = run_search(tmp_path, judge)
    assert len(attempts) == 1 and judge.timed == 1
    assert outcome.startswith(
        "no attempt qualifies: with every layer quantized the graph is not shown faster"
    )
    assert float_layers(target) == set()  # the plain int8 graph: the export's gate rejects it, with reasons


def test_the_attempts_are_bounded_and_the_outcome_says_so(tmp_path: Path):
    judge = StandIn(drop=9.0, per_layer=0.1)  # never fits
    attempts, outcome, _, _ = run_search(tmp_path, judge, attempts=1)
    assert len(attempts) == 2
    assert outcome == "no attempt qualifies within compress.quantize_static.max_fallback_attempts=1"
    (tmp_path / "all").mkdir()
    attempts, outcome, _, _ = run_search(tmp_path / "all", StandIn(drop=9.0, per_layer=0.1), attempts=4)
    assert [len(a.settings.exclude) for a in attempts] == [0, 1, 2, 3]  # 3 layers: 1, 2, then all 3
    assert outcome == "no attempt qualifies: every one of the 3 quantized layers was tried in fp32"


def test_calibration_choices_are_judged_in_order_and_the_first_within_budget_is_kept(tmp_path: Path):
    judge = StandIn(drop=5.0, fits="entropy")
    choices = QuantizeStatic(
        calibration=["minmax", "entropy", "percentile"], per_channel=[True, False]
    ).choices()
    assert [c.label for c in choices][:3] == [
        "minmax, per-channel",
        "minmax, per-tensor",
        "entropy, per-channel",
    ]
    attempts, outcome, _, _ = run_search(tmp_path, judge, choices=choices)
    assert [a.settings.label for a in attempts] == [c.label for c in choices]  # every choice judged
    assert outcome == "calibration entropy, per-channel is within the budget with every layer quantized"
    assert judge.timed == 0  # same layers quantized: the export times the chosen one


def test_the_sensitivity_proxy_ranks_the_layer_int8_hurts_most_first(tmp_path: Path):
    import onnxruntime as ort

    prepared = prepared_net(tmp_path, three_layers(outlier_in=2))
    settings = StaticSettings(per_channel=False)
    batch = calibration_set()
    quantize_prepared(prepared, tmp_path / "int8.onnx", "input", batch, settings)
    ranked = rank_layers(prepared, tmp_path / "int8.onnx", batch[0])
    assert len(ranked) == 3

    def output_error(exclude: tuple[str, ...]) -> float:  # the truth the proxy stands in for
        path = tmp_path / f"int8-{'-'.join(exclude).replace('/', '_')}.onnx"
        quantize_prepared(prepared, path, "input", batch, StaticSettings(per_channel=False, exclude=exclude))
        want = ort.InferenceSession(str(prepared)).run(None, {"input": batch[1]})[0]
        got = ort.InferenceSession(str(path)).run(None, {"input": batch[1]})[0]
        return float(np.mean((got - want) ** 2))

    errors = {name: output_error((name,)) for name in ranked}
    assert min(errors, key=errors.__getitem__) == ranked[0]  # fp32 there helps the output most
    assert errors[ranked[0]] < 0.5 * output_error(())


def test_a_layer_kept_in_fp32_stays_fp32_when_onnxruntime_optimizes_the_graph(tmp_path: Path):
    import onnxruntime as ort

    prepared = prepared_net(tmp_path, three_layers(outlier_in=2))  # /2/Gemm: wrecked by per-tensor int8
    batch = calibration_set()
    want = ort.InferenceSession(str(prepared)).run(None, {"input": batch[1]})[0]

    def relative_error(exclude: tuple[str, ...]) -> float:
        path = tmp_path / f"int8-{len(exclude)}.onnx"
        quantize_prepared(prepared, path, "input", batch, StaticSettings(per_channel=False, exclude=exclude))
        got = ort.InferenceSession(str(path)).run(None, {"input": batch[1]})[0]  # default optimizations
        return float(np.mean((got - want) ** 2) / np.mean(want**2))

    assert relative_error(()) > 0.1  # measured 0.27
    assert relative_error(("/2/Gemm",)) < 1e-3  # measured 9e-5; 0.27 when the optimizer re-quantized it


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "calibration",
            ["minmax", "kl"],
            r"compress\.quantize_static\.calibration=\['minmax', 'kl'\]: unknown calibration method",
        ),
        ("calibration", "histogram", r"use one or more of minmax, entropy, percentile"),
        (
            "max_fallback_attempts",
            0,
            r"compress\.quantize_static\.max_fallback_attempts=0: must be an integer >= 1",
        ),
        ("max_fallback_attempts", -2, r"max_fallback_attempts=-2: .*fallback=false turns the fallback off"),
        ("reduce_range", "maybe", r"compress\.quantize_static\.reduce_range=maybe: use false, true"),
    ],
)
def test_bad_static_int8_settings_name_the_key_and_the_fix(key: str, value, message: str):
    config = recipe_config()
    config["quantize_static"][key] = value
    with pytest.raises(KilnError, match=message):
        read_recipe(config)


def test_a_layer_to_exclude_that_the_graph_lacks_is_named_with_the_layers_it_has(tmp_path: Path):
    exported = export_graph(three_layers(), torch.zeros(2, FEATURES), 18, "torchscript")
    onnx.save(exported.model, str(tmp_path / "fp32.onnx"))
    step = QuantizeStatic(exclude=["/no/such/Gemm"])

    def calibration(batches: int, size: int) -> list[np.ndarray]:
        return calibration_set()

    with pytest.raises(KilnError) as raised:
        step.search(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calibration, judge=None)
    line = str(raised.value)
    assert line.startswith(
        "compress.quantize_static.exclude: the graph has no layer named /no/such/Gemm; its layers: "
    )
    prepared = prepare(tmp_path / "fp32.onnx", tmp_path / "prepared.onnx")
    first = next(n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Gemm")
    assert first in line and "\n" not in line
    assert not (tmp_path / "int8.onnx").exists()
    assert not list(tmp_path.glob(".int8.int8-search-*"))  # the work folder is gone too


def test_the_cpu_record_names_the_instruction_sets():
    cpu = int8_search.cpu_instruction_set()
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].splitlines()[0].split()
    assert cpu["avx2"] == ("avx2" in flags) and cpu["vnni"] == bool({"avx512_vnni", "avx_vnni"} & set(flags))
    line = int8_search.describe_cpu(cpu)
    assert f"VNNI {'yes' if cpu['vnni'] else 'no'}" in line and line.endswith(
        f"onnxruntime {cpu['onnxruntime']}"
    )
    assert QuantizeStatic(reduce_range="auto").choices()[0].reduce_range is (cpu["vnni"] is False)
