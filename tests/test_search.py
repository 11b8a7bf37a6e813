"""kiln search: Optuna trials as kiln runs, pruning, resuming, and the bad input it must refuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

from kilntest import (
    HOLD_ENV,
    NO_COMPRESSION,
    ONE_THREAD,
    Output,
    hold_at,
    kiln_cli,
    kiln_command,
    kiln_in_process,
    ok,
    read_run,
    wait_for,
)

pytestmark = pytest.mark.slow

TINY = [
    "data=digits",
    "model=mlp",
    "model.net.hidden_sizes=[16]",
    "trainer.max_epochs=4",
    "progress=lines",
    "search.startup_trials=2",
    *NO_COMPRESSION,
]
LR_AND_WIDTH = 'search.params={model.optimizer.lr:"tag(log, interval(1e-3, 1e-1))",model.net.hidden_sizes:"choice([16],[32])"}'


def search_dir(cwd: Path) -> Path:
    (directory,) = (cwd / "runs" / "search").iterdir()
    return directory


def kiln_search(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return kiln_cli(
        "search", f"paths.output_dir={cwd / 'runs'}", *args, cwd=cwd, env={**ONE_THREAD, **(env or {})}
    )


def test_search_trains_trials_as_runs_and_beats_or_matches_the_baseline(tmp_path: Path) -> None:
    result = ok(kiln_search(*TINY, LR_AND_WIDTH, "search.n_trials=4", cwd=tmp_path))
    directory = search_dir(tmp_path)
    record = json.loads((directory / "search.json").read_text())
    trials = sorted(directory.glob("trial_*"))
    assert [t.name for t in trials] == ["trial_000", "trial_001", "trial_002", "trial_003"]
    assert record["states"] == {"complete": 4}
    # The first trial trains the composed config itself; the best is at least as good (val/loss: min).
    assert record["baseline"]["trial"] == 0
    assert record["best"]["score"] <= record["baseline"]["score"]
    best_run = read_run(Path(record["best"]["run_dir"]))
    assert best_run["best_checkpoint"]["score"] == pytest.approx(record["best"]["score"])
    # Each trial is a run directory whose overrides train it alone, with the sampled values.
    overrides = yaml.safe_load((Path(record["best"]["run_dir"]) / ".hydra" / "overrides.yaml").read_text())
    lr = record["best"]["params"]["model.optimizer.lr"]
    assert f"model.optimizer.lr={lr}" in overrides and "data=digits" in overrides
    assert record["best"]["command"] == "kiln train " + " ".join(overrides)
    # The study is in its sqlite file, with the same values.
    study = optuna.load_study(study_name="kiln", storage=f"sqlite:///{directory / 'study.db'}")
    assert study.best_value == pytest.approx(record["best"]["score"])
    assert f"best trial {record['best']['trial']}" in result.stdout
    assert (directory / "runs.md").is_file()


def test_a_poor_trial_is_pruned_on_the_monitored_metric(tmp_path: Path) -> None:
    # Baseline lr 0.05 trains well; a grid trial with lr 1e-6 learns nothing and is stopped early.
    ok(
        kiln_search(
            *TINY,
            "trainer.max_epochs=6",
            "model.optimizer.lr=0.05",
            'search.params={model.optimizer.lr:"choice(0.05,0.000001)"}',
            "search.sampler=grid",
            "search.n_trials=3",
            "search.startup_trials=1",
            "search.pruner_warmup_epochs=1",
            cwd=tmp_path,
        )
    )
    directory = search_dir(tmp_path)
    record = json.loads((directory / "search.json").read_text())
    assert record["states"].get("pruned") == 1, record["states"]
    statuses = {t.name: read_run(t) for t in directory.glob("trial_*")}
    (pruned,) = [r for r in statuses.values() if r["status"] == "pruned"]
    assert pruned["best_checkpoint"] is None and pruned["test_metrics"] == {}
    assert record["best"]["params"]["model.optimizer.lr"] == 0.05


def test_an_interrupted_search_continues_where_it_stopped(tmp_path: Path) -> None:
    held = tmp_path / "held"
    args = [
        f"paths.output_dir={tmp_path / 'runs'}",
        *TINY,
        "trainer.max_epochs=2",  # what is tested is which trials ran, not how well they trained
        LR_AND_WIDTH,
        "search.n_trials=3",
        # trial 1 holds after its first training step until it is killed (kilntest.HoldAt); the
        # other trials, and every trial of the continued search, train through
        hold_at(held, epoch=0, step=0, run="trial_001"),
    ]
    process = subprocess.Popen(
        kiln_command("search", *args),
        cwd=tmp_path,
        env={**os.environ, **HOLD_ENV, **ONE_THREAD},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(process.stdout)
    try:
        # Killed while trial 1 trains: trial 0 has completed, since trials run one after another,
        # and trial 1's run record exists.
        wait_for(
            held.exists,
            "trial 1 to hold inside its training",
            timeout=600,
            process=process,
            output=output,
        )
        process.send_signal(signal.SIGKILL)  # no chance to clean up
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, output.finish()
    directory = search_dir(tmp_path)
    assert read_run(directory / "trial_000")["status"] == "completed"
    assert read_run(directory / "trial_001")["status"] == "running"

    result = ok(kiln_search(*args[1:], f"run_dir={directory}", cwd=tmp_path, env=HOLD_ENV))
    assert "trial 1 was interrupted; it is replaced" in result.stdout
    record = json.loads((directory / "search.json").read_text())
    assert record["states"] == {"complete": 3, "fail": 1}  # the killed trial, replaced
    assert sorted(t.name for t in directory.glob("trial_*")) == [f"trial_{n:03d}" for n in range(4)]
    assert read_run(directory / "trial_003")["status"] == "completed"


def test_a_search_in_which_every_trial_fails_says_why_each_failed(tmp_path: Path) -> None:
    result = kiln_search(
        *TINY, 'search.params={data.batch_size:"choice(0,-4)"}', "search.n_trials=2", cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    table = (search_dir(tmp_path) / "runs.md").read_text()
    assert table.count("| failed |") == 2 and table.count("data.batch_size") >= 1
    assert "kiln search: error: no trial of the search completed" in result.stderr
    assert result.stderr.count("kiln search: trial") == 2  # each failure, with its reason
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ['search.params={model.optimizer.lrr:"interval(0.1, 0.2)"}'],
            "search.params.model.optimizer.lrr: no such config key",
        ),
        (
            [LR_AND_WIDTH, "search.storage=mysql+pymysql://nobody:secret@127.0.0.1:1/optuna"],
            "search.storage=mysql+pymysql://nobody:***@127.0.0.1:1/optuna: cannot open it",
        ),
        ([LR_AND_WIDTH, "search.storage=nosuchdb://x"], "search.storage=nosuchdb://x: cannot open it"),
        (
            [LR_AND_WIDTH, "search.sampler=annealing"],
            "search.sampler=annealing: must be one of tpe, random, grid",
        ),
        ([LR_AND_WIDTH, "search.sampler=grid"], "search.sampler=grid: model.optimizer.lr is an interval"),
        (
            ["search.params={model.optimizer.lr:0.1}"],
            "search.params.model.optimizer.lr: give a range to search",
        ),
        ([], "search.params: nothing to search"),
    ],
)
def test_bad_search_settings_are_one_line_and_no_trial(
    tmp_path: Path, overrides: list[str], message: str, capfd: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """Through the CLI's own entry point, in this process: a refusal comes before any trial (and
    before any torch work), so a child process would only add its imports."""
    monkeypatch.chdir(tmp_path)
    code = kiln_in_process(monkeypatch, "search", f"paths.output_dir={tmp_path / 'runs'}", *TINY, *overrides)
    stderr = capfd.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln search: error: ") and message in lines[0], stderr
    assert not list(tmp_path.glob("runs/search/*/trial_*"))


def test_a_sweep_over_a_key_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    result = kiln_cli(
        "train",
        "-m",
        f"paths.output_dir={tmp_path / 'runs'}",
        *TINY[:-3],
        "model.optimizer.lrr=0.1,0.2",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "model.optimizer.lrr: no such config key" in result.stderr
    assert not list(tmp_path.rglob("run.json"))


def test_a_trials_overrides_compose_the_config_it_trained(tmp_path: Path) -> None:
    """hparams_search=digits_cnn sets experiment=digits_cnn and trainer.max_epochs itself: the trial's
    overrides.yaml must carry them, so that `kiln train` with them composes the same config."""
    ok(
        kiln_search(
            "hparams_search=digits_cnn",
            "search.n_trials=1",
            "data.batch_size=128",
            *NO_COMPRESSION,
            cwd=tmp_path,
        )
    )
    trial = search_dir(tmp_path) / "trial_000"
    overrides = yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
    assert "experiment=digits_cnn" in overrides and "trainer.max_epochs=15" in overrides
    composed = ok(kiln_cli("train", *overrides, "--cfg", "job", cwd=tmp_path))
    again = yaml.safe_load(composed.stdout)
    trained = yaml.safe_load((trial / ".hydra" / "config.yaml").read_text())
    for key in ("data", "model", "trainer", "monitor", "callbacks", "seed"):
        assert again[key] == trained[key], key
