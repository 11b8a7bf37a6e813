"""What `kiln train` leaves after testing the best checkpoint, read back from the run directory:
PR and ROC curves for a classifier, a residual plot for a regressor, and the permutation
importance of a table's raw columns in run.json and in TensorBoard."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kilntest import NO_COMPRESSION, read_run, run_dirs

pytestmark = pytest.mark.slow

# Every raw column of palmerpenguins' table except the target (species).
PENGUIN_COLUMNS = {
    "island",
    "bill_length_mm",
    "bill_depth_mm",
    "flipper_length_mm",
    "body_mass_g",
    "sex",
    "year",
}


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0}
    )
    return accumulator.Reload()


def test_a_table_classifier_records_importance_of_every_raw_column(penguins_run: Path):
    record = read_run(penguins_run)
    importance = record["feature_importance"]
    assert {item["feature"] for item in importance} == PENGUIN_COLUMNS
    assert len(importance) == len(PENGUIN_COLUMNS)
    means = [item["mean"] for item in importance]
    assert means == sorted(means, reverse=True)
    assert all(item["std"] >= 0 for item in importance)
    assert record["feature_importance_measure"] == "rise in val/loss"  # penguins_mlp monitors val/loss
    # even 3 epochs learn something: shuffling the best column hurts
    assert importance[0]["mean"] > 0


def test_a_table_classifier_has_pr_and_roc_curves_and_an_importance_chart(penguins_run: Path):
    accumulator = events(penguins_run)
    tags = accumulator.Tags()
    class_names = ["Adelie", "Chinstrap", "Gentoo"]
    pr_tags = set(accumulator.PluginTagToContent("pr_curves"))
    assert {f"test/pr_curve/{name}" for name in class_names} <= pr_tags
    for image in ("test/roc_curve", "test/confusion_matrix", "val/feature_importance"):
        assert image in tags["images"], f"{image} missing from {tags['images']}"
    assert "val/feature_importance_table/text_summary" in set(accumulator.PluginTagToContent("text"))


def test_a_regression_run_has_a_residual_plot_and_the_importance_switch_works(kiln, tmp_path: Path):
    result = kiln(
        "train",
        "experiment=diabetes_mlp",
        "trainer.max_epochs=3",
        "progress=lines",
        "report.feature_importance=false",
        *NO_COMPRESSION,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert "feature_importance" not in read_run(run_dir)
    tags = events(run_dir).Tags()
    assert "test/residuals" in tags["images"]
    assert "test/roc_curve" not in tags["images"]
    assert "val/feature_importance" not in tags["images"]


def test_a_bad_repeat_count_is_refused_before_training(kiln):
    result = kiln("train", "experiment=penguins_mlp", "report.importance_repeats=0", *NO_COMPRESSION)
    assert result.returncode == 2
    assert "report.importance_repeats=0: must be an integer >= 1" in result.stderr


def test_the_model_graph_is_logged_without_torchs_tracing_deprecation(tmp_path: Path):
    """TensorBoard traces the graph with torch.jit.trace, which torch 2.14 warns is deprecated: that
    advice is not the user's, and no such line reaches a training's output."""
    import warnings

    from kiln.config import compose
    from kiln.stages import train as train_stage
    from kilntest import TINY_DIGITS_CNN

    run_dir = tmp_path / "run"
    cfg = compose("train", [*TINY_DIGITS_CNN, "trainer.max_epochs=1", *NO_COMPRESSION, f"run_dir={run_dir}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_stage.main.call(cfg)
    assert any(run_dir.glob("**/events.out.tfevents.*"))  # the graph and the rest were written
    deprecations = [str(w.message) for w in caught if "torch.jit.trace" in str(w.message)]
    assert deprecations == []
