"""report.group_by: every test metric per value of a table column, with gaps flagged."""

from __future__ import annotations

import pytest

from kilntest import NO_COMPRESSION, QUICK, TINY_PENGUINS, read_run, run_dirs

pytestmark = pytest.mark.slow


def test_metrics_by_island_add_up_to_the_test_split_and_gaps_are_flagged(kiln, tmp_path):
    result = kiln(
        "train", *TINY_PENGUINS, "compress=none", *QUICK, "report.group_by=island", "report.group_gap=0"
    )
    assert result.returncode == 0, result.stderr
    (run,) = run_dirs(tmp_path / "runs")
    record = read_run(run)
    groups = record["group_metrics"]
    assert groups["column"] == "island" and set(groups["groups"]) == {"Biscoe", "Dream", "Torgersen"}
    rows = {name: g["rows"] for name, g in groups["groups"].items()}
    assert sum(rows.values()) == 52  # penguins: 344 rows, 15% held out for testing
    # the overall test loss is the row-weighted mean of the groups' losses
    weighted = sum(g["rows"] * g["metrics"]["test/loss"] for g in groups["groups"].values()) / 52
    assert weighted == pytest.approx(record["test_metrics"]["test/loss"], rel=1e-4)
    # Torgersen has only Adelie penguins: its AUROC is undefined, not 0
    assert groups["groups"]["Torgersen"]["metrics"]["test/auroc"] is None
    # with a gap threshold of 0, every metric that differs between islands is flagged, and said
    assert groups["flagged"] == [k for k, spread in groups["spread"].items() if spread > 0]
    assert "test/loss" in groups["flagged"]
    assert "kiln train: warning: test/loss differs by" in result.stderr
    # the run's report carries the table too, beside the feature importance
    report = (run / "report.md").read_text()
    assert "## Test metrics by island" in report and "| Torgersen |" in report
    assert "Spread above report.group_gap=0" in report and "## Feature importance" in report

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "test_by_island/loss/Biscoe" in scalars and "test_by_island/acc/Torgersen" in scalars
    assert "test_by_island/text_summary" in events.Tags()["tensors"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [*TINY_PENGUINS, "report.group_by=islnd"],
            "report.group_by=islnd: no such column in the table; its columns: ",
        ),
        (
            ["data=digits", "trainer.max_epochs=1", "report.group_by=island"],
            "per-group metrics need a table (data=table)",
        ),
        (
            [*TINY_PENGUINS, "report.group_by=island", "report.group_gap=-1"],
            "report.group_gap=-1: must be a number >= 0",
        ),
    ],
)
def test_bad_group_settings_are_one_line_before_training(kiln, tmp_path, overrides, message):
    result = kiln("train", *overrides, *NO_COMPRESSION)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("kiln train: error: ") and message in lines[-1], result.stderr
    assert "epoch 1/" not in result.stderr  # refused before any training
