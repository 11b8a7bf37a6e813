"""The hard case of static int8: a depthwise-convolution net (timm's MobileNetV3-Small, width 0.5,
built from scratch) on the built-in digit images. Plain static int8 there misses a zero budget or
is not faster than fp32; kiln then retries with layers in fp32 or says, one line per attempt, why
none qualifies, and the report shows every attempt and the CPU it was measured on.
The real sizes are in scripts/benchmark_images.py (--depthwise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.compression.choose import is_faster, judged_drop


@pytest.fixture(scope="module")
def depthwise_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln.config import compose
    from kiln.stages import train as train_stage

    run_dir = tmp_path_factory.mktemp("depthwise") / "run"
    cfg = compose(
        "train",
        [
            "data=digit_images",
            "data.size=16",
            "data.num_workers=0",
            "model=backbone",
            "model.net.name=mobilenetv3_small_050",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=4",  # int8's trouble here is the architecture, not the training
            "monitor.metric=val/acc",
            "monitor.mode=max",
            "compress=auto",
            "~compress.candidates.int8_dynamic",
            "~compress.candidates.pruned",
            "~compress.candidates.pruned_int8_static",
            "compress.max_metric_drop=0",  # any loss misses: the fallback must run or say why not
            "compress.decision=point",
            "compress.quantize_static.calibration=[minmax,percentile]",
            "compress.quantize_static.calibration_batches=1",
            "compress.quantize_static.calibration_batch_size=32",
            "compress.recovery_epochs=0",  # recovery by training (QAT, distillation) has its own tests
            "compress.quantize_static.max_fallback_attempts=2",
            "export.latency_repeats=3",
            "progress=lines",
            f"run_dir={run_dir}",
        ],
    )
    train_stage.main.call(cfg)
    return run_dir


def test_static_int8_of_a_depthwise_net_recovers_or_says_why_per_attempt(depthwise_run: Path):
    report = json.loads((depthwise_run / "report.json").read_text())
    built = [v for v in report["variants"] if v["name"] == "int8_static"]
    given_up = [a for a in report["abandoned"] if a["name"] == "int8_static"]  # slower than fp32 at batch 1
    (int8,) = built or given_up
    search = int8["int8_search"]
    attempts = search["attempts"]
    assert [a["calibration"] for a in attempts[:2]] == ["minmax, per-channel", "percentile, per-channel"]
    assert all(a["kept_fp32"] == [] for a in attempts[:2])  # calibration first, every layer int8
    for attempt in attempts:  # one line each: why it does or does not qualify
        assert attempt["verdict"].startswith(("over the budget", "within the budget"))
        assert "\n" not in attempt["verdict"]
    fallbacks = attempts[2:]
    assert len(fallbacks) <= 2  # max_fallback_attempts
    assert [len(a["kept_fp32"]) for a in fallbacks] == [1, 2][: len(fallbacks)]
    assert all(a["speedup"]["256"]["rounds"] >= 8 for a in fallbacks)  # each retry is timed against fp32
    if report["shipped"] == "int8_static":  # recovered: within the zero budget and shown faster
        assert judged_drop(int8, "point") <= 0 and is_faster(int8)
    else:
        assert report["shipped"] == "fp32"
        assert search["outcome"].startswith(("no attempt qualifies", "within the budget", "calibration"))
        why = report["verdicts"].get("int8_static") or given_up[0]["abandoned"]
        assert why and "\n" not in why
    markdown = (depthwise_run / "report.md").read_text()
    assert "Static int8 attempts of int8_static" in markdown
    assert (
        markdown.count("| minmax, per-channel |") >= 1 and markdown.count("| percentile, per-channel |") >= 1
    )
    cpu = report["cpu"]
    assert set(cpu) >= {"avx2", "avx512", "vnni", "amx", "onnxruntime"}
    assert f"VNNI {'yes' if cpu['vnni'] else 'no'}" in markdown
