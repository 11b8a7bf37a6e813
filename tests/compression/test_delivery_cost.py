"""What a delivery (compress + export) costs, said beside the training it follows: report.json's
`timings_s` holds the training's fit and each variant's seconds, and the summary line and
report.md give the ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.export import measure
from kilntest import QUICK, copy_run, kiln_in_process


def test_seconds_per_variant_add_up_compression_and_export_parts_of_one_variant():
    compress = {"fp32: export": 0.5, "int8_static: quantize": 1.25, "pruned0: fine-tune": 4.0}
    export = {
        "baseline: score torch fp32": 9.0,  # no variant's
        "fp32: score": 1.0,
        "int8_static: score": 0.5,
        "int8_static: bootstrap": 0.25,
        "latency: candidates paired with fp32": 7.0,  # every candidate's together
        "embedding drift baseline": 3.0,
    }
    assert measure.seconds_per_variant(compress, export) == {
        "fp32": 1.5,
        "int8_static": 2.0,
        "pruned0": 4.0,
    }


def test_the_delivery_is_timed_against_the_training_in_report_json_the_summary_and_report_md(
    digits_cnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
):
    run = copy_run(digits_cnn_run, tmp_path)
    code = kiln_in_process(
        monkeypatch,
        "compress",
        f"run={run}",
        "compress=quantize_static",
        "compress.quantize_static.calibration_batches=2",
        "compress.max_metric_drop=100",
        *QUICK,
    )
    out = capfd.readouterr().out
    assert code == 0, out
    timings = json.loads((run / "report.json").read_text())["timings_s"]
    fit = json.loads((run / "run.json").read_text())["throughput"]["fit_seconds"]
    assert timings["train"] == fit > 0
    per_variant = timings["per_variant"]
    assert {"fp32", "quantize_static"} <= set(per_variant)  # and "int8 search" when static int8 searched
    quantize_parts = [v for k, v in timings["compress"].items() if k.startswith("quantize_static: ")]
    quantize_parts += [v for k, v in timings["export"].items() if k.startswith("quantize_static: ")]
    assert per_variant["quantize_static"] == pytest.approx(sum(quantize_parts), abs=0.002)
    summary = out[out.index("shipped quantize_static") :]
    assert f"the training's fit of {fit:.1f} s)" in summary
    spent = float(summary.split("compress + export ")[1].split(" s")[0])
    assert f"compress + export {spent:.1f} s ({spent / fit:.2f}x the training's fit" in summary
    markdown = (run / "report.md").read_text()
    together = (timings["compress_total"] + timings["export_total"]) / fit
    assert f"together {together:.2f}x the training's fit ({fit:.1f} s)" in markdown
    # every latency in report.md says what it is over: b1 as well as b256 give their runs
    table = next(line for line in markdown.splitlines() if line.startswith("| quantize_static"))
    runs_b1 = json.loads((run / "report.json").read_text())["variants"][1]["latency_runs"]["1"]
    assert f"] ({runs_b1}) |" in table
