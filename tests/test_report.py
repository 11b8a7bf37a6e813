"""`kiln report dir=...`: one table of the runs of a sweep, best first, through the real CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kilntest import TINY_DIGITS, assert_ok, read_run, run_kiln

ONE_EPOCH = [arg for arg in TINY_DIGITS if not arg.startswith("trainer.max_epochs=")] + [
    "trainer.max_epochs=1"
]


def read_table(directory: Path) -> list[dict[str, str]]:
    with open(directory / "runs.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def fake_run(
    directory: Path,
    *,
    status: str,
    score: float | None,
    metric: str = "val/loss",
    mode: str = "min",
    overrides: list[str] | None = None,
    error: str | None = None,
) -> Path:
    """A run directory as kiln train leaves it, reduced to what the report reads."""
    (directory / ".hydra").mkdir(parents=True)
    record = {
        "status": status,
        "monitor": {"metric": metric, "mode": mode},
        "best_checkpoint": {"path": "x", "score": score, "epoch": 1} if score is not None else None,
        "test_metrics": {"test/acc": 0.5} if status == "completed" else {},
        "error": error,
    }
    (directory / "run.json").write_text(json.dumps(record))
    (directory / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides or []))
    return directory


@pytest.mark.slow
def test_report_of_a_sweep_ranks_its_runs(tmp_path):
    result = run_kiln(
        [
            "train",
            "-m",
            *ONE_EPOCH,
            "model.net.hidden_sizes=[8],[64]",
            f"paths.output_dir={tmp_path / 'runs'}",
        ],
        tmp_path,
    )
    assert_ok(result)
    (sweep,) = (tmp_path / "runs" / "train_multirun").iterdir()

    report = run_kiln(["report", f"dir={sweep}"], tmp_path)
    assert_ok(report)
    rows = read_table(sweep)
    assert len(rows) == 2
    # the swept override is a column; overrides shared by both jobs are not
    assert sorted(row["model.net.hidden_sizes"] for row in rows) == ["[64]", "[8]"]
    assert "data" not in rows[0] and "trainer.max_epochs" not in rows[0]
    # sorted by the monitored metric (val/loss, min), and each score is the run's own best score
    scores = [float(row["best val/loss"]) for row in rows]
    assert scores == sorted(scores)
    for row in rows:
        record = read_run(sweep / row["run dir"])
        assert float(row["best val/loss"]) == pytest.approx(record["best_checkpoint"]["score"])
        assert float(row["test/acc"]) == pytest.approx(record["test_metrics"]["test/acc"])
        assert row["status"] == "completed"
    best = sweep / rows[0]["run dir"]
    assert f"best run: {best} (val/loss=" in report.stdout
    assert (
        (sweep / "runs.md")
        .read_text()
        .startswith("| rank | model.net.hidden_sizes | status | best val/loss |")
    )


def test_failed_runs_come_last_with_their_error(tmp_path):
    fake_run(
        tmp_path / "0", status="completed", score=0.9, mode="max", metric="val/acc", overrides=["seed=1"]
    )
    fake_run(
        tmp_path / "1",
        status="failed",
        score=None,
        mode="max",
        metric="val/acc",
        overrides=["seed=2"],
        error="KilnError: the run diverged",
    )
    fake_run(
        tmp_path / "2", status="completed", score=0.95, mode="max", metric="val/acc", overrides=["seed=3"]
    )
    result = run_kiln(["report", f"dir={tmp_path}"], tmp_path)
    assert_ok(result)
    rows = read_table(tmp_path)
    assert [row["seed"] for row in rows] == ["3", "1", "2"]  # mode max: the higher score first
    assert [row["rank"] for row in rows] == ["1", "2", ""]
    assert rows[2]["status"] == "failed" and rows[2]["error"] == "KilnError: the run diverged"
    assert f"best run: {tmp_path / '2'} (val/acc=0.9500" in result.stdout


def test_a_directory_without_runs_is_one_line_and_exit_2(tmp_path):
    result = run_kiln(["report", f"dir={tmp_path}"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"kiln report: error: dir={tmp_path}: no kiln runs under it (no run.json found); give the directory "
        "of a sweep (runs/train_multirun/<sweep>) or of a cross-validation run (runs/train/<run> with fold_*)"
    )
    assert not (tmp_path / "runs.md").exists()


def test_runs_with_different_monitors_are_refused(tmp_path):
    fake_run(tmp_path / "0", status="completed", score=0.3)
    fake_run(tmp_path / "1", status="completed", score=0.9, metric="val/acc", mode="max")
    result = run_kiln(["report", f"dir={tmp_path}"], tmp_path)
    assert result.returncode == 2
    assert "monitor different metrics (val/acc (max): 1 run, val/loss (min): 1 run)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_report_imports_no_torch():
    code = "import sys, kiln.stages.report; sys.exit('torch' in sys.modules or 'lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
