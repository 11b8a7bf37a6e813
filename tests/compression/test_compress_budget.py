"""Compression that costs a fraction of training: a pruned candidate that cannot make the metric
budget is given up early (and the report says why), and a delivered run keeps only what a resume
and a user need (checkpoints, model.onnx, the report), unless compress.keep_variants=true.

The stages run in this process (kiln.config.compose + the stage's main.call) on the session's tiny
digits CNN run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.compression.pruning import HOPELESS_FLOOR, Budget, BudgetProgress
from kiln.config import compose
from kilntest import QUICK, copy_run, read_run

POINTS = Budget(metric="val/acc", mode="max", unit="points", max_drop=1.0, baseline=0.9)


def test_a_pruned_net_near_chance_is_not_fine_tuned():
    progress = BudgetProgress(POINTS, epochs=10, window=3)
    progress.start({"val/acc": 0.15})  # 75 points lost: over 20 budgets and over the 60-point floor
    assert progress.abandoned is not None and "not fine-tuned" in progress.abandoned
    assert "75.00 points" in progress.abandoned
    assert progress.record()["budget_drops"] == [75.0]

    recoverable = BudgetProgress(POINTS, epochs=10, window=3)
    recoverable.start({"val/acc": 0.62})  # 28 points: the demo CNN's, which its fine-tune recovers
    assert recoverable.abandoned is None
    assert HOPELESS_FLOOR["points"] == 60.0


def test_the_pruning_budget_reuses_the_int8_searchs_score_of_the_same_torch_model():
    from kiln.compression.pipeline import BudgetOnce
    from kiln.compression.recipes import read_recipe
    from kiln.export.measure import Stopwatch

    class Classes:
        class_names = ("a", "b")

    recipe = read_recipe({"recipe": "auto", "candidates": {"pruned": ["prune_structured"]}})
    monitor = {"metric": "val/loss", "mode": "min"}
    watch = Stopwatch()
    scored = {"val/acc": 0.9, "val/loss": 0.3}  # the int8 search scored the torch fp32 model already
    # no module to validate: a second validation pass would fail here
    budget = BudgetOnce(recipe, monitor, None, Classes(), {}, watch, scored=lambda: scored).get()
    assert budget == POINTS  # val/acc (a classifier's gate), points, 1.0, baseline 0.9
    assert "baseline: validate for the pruning budget" not in watch.seconds


def test_the_fine_tune_stops_once_the_budget_is_out_of_reach_at_its_recent_pace():
    # best drop 30 before the fine-tune, then 10, 8, 7.5 after epochs 1-3 (of 10)
    assert POINTS.out_of_reach([30.0, 10.0], epochs_left=9, window=3) is None  # 20/epoch: reachable
    assert POINTS.out_of_reach([30.0, 10.0, 8.0], epochs_left=8, window=3) is None  # 11/epoch
    # over the last 3 epochs it gained (30 - 7.5) / 3 = 7.5 a epoch: 7 epochs left reach < 1
    assert POINTS.out_of_reach([30.0, 10.0, 8.0, 7.5], epochs_left=7, window=3) is None
    # 10 -> 7.4 over epochs 2-4: 0.867 a epoch; 6 epochs left reach 7.4 - 5.2 = 2.2, over 1
    reach = POINTS.out_of_reach([30.0, 10.0, 8.0, 7.5, 7.4], epochs_left=6, window=3)
    assert reach == pytest.approx(7.4 - (10.0 - 7.4) / 3 * 6)
    assert POINTS.out_of_reach([30.0, 10.0, 8.0, 7.5, 0.9], epochs_left=6, window=3) is None  # within


def compress_in_process(run: Path, *overrides: str) -> dict:
    from kiln.stages import compress as compress_stage

    compress_stage.main.call(compose("compress", [f"run={run}", *QUICK, *overrides]))
    return json.loads((run / "report.json").read_text())


@pytest.mark.slow
def test_a_pruned_candidate_that_cannot_recover_is_abandoned_after_one_epoch_and_reported(
    digits_cnn_run: Path, tmp_path: Path
):
    run = copy_run(digits_cnn_run, tmp_path)
    report = compress_in_process(
        run,
        "compress=auto",
        "compress.quantize_static.calibration_batches=1",
        "compress.prune_structured.ratio=0.3",
        "compress.prune_structured.finetune_epochs=5",
        "compress.prune_structured.lr_scale=1e-9",  # it cannot learn: the budget is out of reach
        "compress.max_metric_drop=0",
        "compress.recovery_epochs=0",  # no distillation after it (test_recovery_e2e.py tests that)
    )
    # an int8 candidate may be abandoned too, when its net is shown slower than fp32 at batch 1 (the
    # speed pre-check: on this tiny CNN, static int8 is, on a busy machine)
    by_budget = [a for a in report["abandoned"] if a["name"].startswith("pruned")]
    assert [a["name"] for a in by_budget] == ["pruned", "pruned_int8_static"]  # shared pruning
    slower = [a for a in report["abandoned"] if a not in by_budget]
    assert all(
        a["abandoned"].startswith("not scored: its net measured slower than the fp32 net") for a in slower
    )
    assert {a["name"] for a in slower} <= {"int8_static", "int8_dynamic"}
    abandoned = by_budget[0]
    assert abandoned["abandoned"].startswith("fine-tune stopped after epoch 1 of 5")
    before, after = abandoned["budget_drops"]
    assert before > 0 and after == pytest.approx(before, abs=1e-6)  # no progress at all
    assert "fine-tuned 1 epochs" in abandoned["notes"][0]
    built = [v["name"] for v in report["variants"]]
    assert built == [
        n for n in ("fp32", "int8_static", "int8_dynamic") if n not in {a["name"] for a in slower}
    ]
    assert "- pruned: abandoned: fine-tune stopped after epoch 1 of 5" in (run / "report.md").read_text()
    timings = report["timings_s"]["compress"]
    assert "pruned0: export" not in timings and "pruned0: fine-tune" in timings


@pytest.mark.slow
def test_a_delivered_run_keeps_checkpoints_model_and_report_and_export_builds_the_variants_again(
    digits_cnn_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from kiln.stages import export as export_stage

    run = copy_run(digits_cnn_run, tmp_path)
    first = compress_in_process(run, "compress=quantize_static")
    assert first["shipped"] == "quantize_static"
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert not [f for f in files if f.startswith("export/") or f.endswith((".onnx", ".pt"))][1:]  # model.onnx
    assert {
        "model.onnx",
        "report.json",
        "report.md",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
    } <= set(files)
    assert [f for f in files if f.startswith("compress/")] == ["compress/manifest.json"]
    assert read_run(run)["delivery"]["variant_files"] == "removed (compress.keep_variants=false)"
    assert {v["name"] for v in first["variants"]} == {"fp32", "quantize_static"}  # numbers kept

    capsys.readouterr()
    export_stage.main.call(compose("export", [f"run={run}", *QUICK]))
    said = capsys.readouterr().out
    assert "compressing again from the best checkpoint with recipe quantize_static" in said
    again = json.loads((run / "report.json").read_text())
    assert again["shipped"] == "quantize_static" and again["status"] == "passed"
    assert again["variants"][1]["val_metrics"] == first["variants"][1]["val_metrics"]
    assert not (run / "export").exists()


def test_keep_variants_keeps_every_variant_file(digits_cnn_run: Path, tmp_path: Path):
    run = copy_run(digits_cnn_run, tmp_path)
    report = compress_in_process(run, "compress=quantize_static", "compress.keep_variants=true")
    for variant in report["variants"]:
        assert (run / variant["file"]).is_file()
    assert (run / "compress" / "fp32.net.onnx").is_file()
    assert (run / "compress" / "quantize_static.net.onnx").is_file()
    assert read_run(run)["delivery"]["variant_files"] == "kept"


def test_keep_variants_must_be_true_or_false():
    from kiln.compression.recipes import read_recipe
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match=r"compress.keep_variants=yes: use true"):
        read_recipe({"recipe": "none", "keep_variants": "yes"})
