"""Recovery by training end to end: an auto recipe whose static int8 and pruned candidates miss
the budget gets a quantization-aware variant and a distilled one, each judged by the export like
every other variant (drop with its interval, speed-up with its interval). In this process, on the
session's tiny digits CNN run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.config import compose
from kilntest import QUICK, copy_run


def compress_in_process(run: Path, *overrides: str) -> dict:
    from kiln.stages import compress as compress_stage

    compress_stage.main.call(compose("compress", [f"run={run}", *QUICK, *overrides]))
    return json.loads((run / "report.json").read_text())


MISSING = [
    "compress=auto",
    "~compress.candidates",
    "+compress.candidates={pruned:[prune_structured],int8_static:[quantize_static]}",
    "compress.quantize_static.calibration_batches=1",
    "compress.quantize_static.calibration_batch_size=2",  # ranges from two images: int8 loses accuracy
    "compress.prune_structured.ratio=0.8",
    "compress.prune_structured.finetune_epochs=0",  # pruned and not fine-tuned: far over the budget
    "compress.metric=val/loss",  # a loss moves with every changed output: any int8 rounding costs some
    "compress.max_metric_drop=0",
    "compress.objective=size",  # latency would drop int8 on this CNN before judging it: slower than fp32
    "compress.keep_variants=true",
]


def test_variants_missing_the_budget_are_recovered_by_qat_and_distillation_and_judged(
    digits_cnn_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run = copy_run(digits_cnn_run, tmp_path)
    report = compress_in_process(run, *MISSING, "compress.recovery_epochs=1")
    said = capsys.readouterr().out
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["fp32", "pruned", "int8_static", "pruned_distilled", "int8_static_qat"]
    assert (
        "int8_static: misses the budget: " in said and "recovering by a quantization-aware fine-tune" in said
    )
    assert "pruned: misses the budget: " in said and "recovering by a fine-tune distilled from fp32" in said

    qat, distilled = variants["int8_static_qat"], variants["pruned_distilled"]
    assert qat["steps"] == ["quantize_static", "qat"] and qat["precision"] == "int8"
    assert distilled["steps"] == ["prune_structured", "distill"] and distilled["precision"] == "fp32"
    assert distilled["params"] == variants["pruned"]["params"] < variants["fp32"]["params"]
    assert distilled["passed"] and distilled["check"].startswith("parity:")  # against its torch weights
    for variant in (qat, distilled):  # judged like every other: the drop's interval, the speed-up's
        low, high = variant["drop_ci95"]
        assert low <= variant["val_drop"] <= high
        low, high = variant["speedup"]["256"]["ci95"]
        assert low <= variant["speedup"]["256"]["median"] <= high
        assert (run / variant["file"]).is_file()
    assert "1 epochs" in qat["notes"][0] and "then onnxruntime static QDQ" in qat["notes"][0]
    assert "distilled from the fp32 model (temperature 4, alpha 0.5): 1 epochs" in distilled["notes"][-1]
    timings = report["timings_s"]["compress"]
    assert "int8_static_qat: fine-tune" in timings and "pruned_distilled: fine-tune" in timings


def test_nothing_is_recovered_when_the_cheaper_variants_fit_or_recovery_is_off(
    digits_cnn_run: Path, tmp_path: Path
):
    run = copy_run(digits_cnn_run, tmp_path)
    within = compress_in_process(
        run,
        *(o for o in MISSING if "max_metric_drop" not in o),
        "compress.max_metric_drop=1000",
        "compress.recovery_epochs=1",
    )
    assert [v["name"] for v in within["variants"]] == ["fp32", "pruned", "int8_static"]
    assert "int8_static_qat: fine-tune" not in within["timings_s"]["compress"]
    off = compress_in_process(run, *MISSING, "compress.recovery_epochs=0")
    assert [v["name"] for v in off["variants"]] == ["fp32", "pruned", "int8_static"]


def test_a_negative_recovery_epochs_is_one_line_and_exit_2_with_nothing_written(
    digits_cnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from kilntest import kiln_in_process

    run = copy_run(digits_cnn_run, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    code = kiln_in_process(
        monkeypatch, "compress", f"run={run}", "compress=auto", "compress.recovery_epochs=-1"
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "compress.recovery_epochs=-1: must be a whole number >= 0" in err[0]
    assert "compress.recovery_epochs=2" in err[0]  # the fix
    assert sorted(p.name for p in run.iterdir()) == before  # no compress/, no report


def test_distillation_asked_for_with_recovery_off_is_one_line_and_exit_2_with_nothing_written(
    digits_cnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from kilntest import kiln_in_process

    run = copy_run(digits_cnn_run, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    asked = ["compress=auto", "compress.distillation.required=true", "compress.recovery_epochs=0"]
    code = kiln_in_process(monkeypatch, "compress", f"run={run}", *asked)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].endswith(
        "compress.distillation.required=true: compress.recovery_epochs=0 turns recovery off; "
        "set compress.recovery_epochs=2"
    )
    assert sorted(p.name for p in run.iterdir()) == before  # no compress/, no report
