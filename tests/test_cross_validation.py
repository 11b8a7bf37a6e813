"""`kiln train cv.folds=K`: K folds in one run directory, cv.json with their mean and std."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kilntest import QUICK, TINY_DIGITS, assert_ok, read_run, run_kiln


@pytest.mark.slow
def test_three_folds_and_their_mean_and_std(tmp_path):
    result = run_kiln(
        ["train", *TINY_DIGITS, "cv.folds=3", f"paths.output_dir={tmp_path / 'runs'}"], tmp_path
    )
    assert_ok(result)
    (run_dir,) = (tmp_path / "runs" / "train").iterdir()
    folds = [run_dir / f"fold_{i}" for i in range(3)]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("fold_")) == [p.name for p in folds]
    records = [read_run(fold) for fold in folds]
    assert [r["status"] for r in records] == ["completed"] * 3
    for i, fold in enumerate(folds):
        # each fold is a full run: its own checkpoints, TensorBoard logs and the overrides that rerun it
        assert (fold / "checkpoints" / "best.ckpt").is_file()
        assert any((fold / "tensorboard").glob("events.out.tfevents.*"))
        overrides = (fold / ".hydra" / "overrides.yaml").read_text()
        assert "- data.num_folds=3\n" in overrides and f"- data.fold={i}\n" in overrides
        assert "cv.folds" not in overrides
    assert not (run_dir / "model.onnx").exists() and not (run_dir / "checkpoints").exists()
    assert not any((fold / "model.onnx").exists() for fold in folds)  # folds are not exported

    cv = json.loads((run_dir / "cv.json").read_text())
    assert cv["status"] == "completed" and cv["folds"] == 3
    assert [run["run_dir"] for run in cv["runs"]] == ["fold_0", "fold_1", "fold_2"]
    names = records[0]["test_metrics"].keys()
    assert names and set(names) <= set(cv["mean"])
    for name in names:
        values = np.array([r["test_metrics"][name] for r in records])
        assert cv["mean"][name] == pytest.approx(values.mean(), abs=1e-12)
        assert cv["std"][name] == pytest.approx(values.std(), abs=1e-12)
    best = np.array([r["best_checkpoint"]["score"] for r in records])
    assert cv["mean"]["best val/loss"] == pytest.approx(best.mean(), abs=1e-12)
    # the validation folds differ, so the fold's runs do too
    assert len({r["best_checkpoint"]["score"] for r in records}) == 3
    assert "3-fold cross-validation done" in result.stdout and "test/acc" in result.stdout


@pytest.mark.slow
def test_refit_trains_on_train_and_validation_for_the_mean_best_epoch_and_ships(tmp_path):
    result = run_kiln(
        [
            "train",
            *TINY_DIGITS,
            "trainer.max_epochs=4",
            "cv.folds=2",
            "cv.refit=true",
            "export.after_training=true",
            *QUICK,
            f"paths.output_dir={tmp_path / 'runs'}",
        ],
        tmp_path,
    )
    assert_ok(result)
    (run_dir,) = (tmp_path / "runs" / "train").iterdir()
    cv = json.loads((run_dir / "cv.json").read_text())
    refit = read_run(run_dir / "refit")
    epochs = round(np.mean([run["best_epoch"] for run in cv["runs"]]))
    assert cv["status"] == "completed" and cv["refit"]["epochs"] == epochs == refit["epochs"]
    assert refit["status"] == "completed"
    # 1797 digits, 270 held out for testing: the refit trains on every other row, each fold on half
    assert refit["throughput"]["train_rows"] == 1527
    assert {read_run(run_dir / f"fold_{i}")["throughput"]["train_rows"] for i in (0, 1)} <= {763, 764}
    assert cv["refit"]["test_metrics"] == pytest.approx(refit["test_metrics"], abs=1e-12)
    overrides = (run_dir / "refit" / ".hydra" / "overrides.yaml").read_text()
    assert "- data.refit=true\n" in overrides and f"- trainer.max_epochs={epochs}\n" in overrides
    # the refit is the model to ship; the folds are not exported
    assert (run_dir / "refit" / "model.onnx").is_file()
    assert not any((run_dir / f"fold_{i}" / "model.onnx").exists() for i in (0, 1))
    assert "refit" in result.stdout and "on train + validation" in result.stdout


@pytest.mark.parametrize(
    ("folds", "message"),
    [
        ("1", "cv.folds=1: cross-validation needs an integer of at least 2 folds"),
        ("200", "cv.folds=200: the smallest class ('8') has only 147 rows outside the test split"),
    ],
)
@pytest.mark.slow
def test_bad_fold_counts_are_one_line_and_exit_2(tmp_path, folds, message):
    result = run_kiln(["train", *TINY_DIGITS, f"cv.folds={folds}", f"paths.output_dir={tmp_path}"], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kiln train: error: {message}"), result.stderr
    assert not list(tmp_path.rglob("fold_*"))
