"""User mistakes through the real CLI: one clear line on stderr, exit code 2, no finished-looking run.

Each test runs `python -m kiln train ...` in its own directory, mostly on a tiny table, and checks:
  - the exit code is 2 (kiln's code for a user error) and stderr holds no traceback,
  - stderr holds exactly one `kiln train: error:` line, and nothing else but progress lines,
  - that line names the config key or file and says how to fix it,
  - a run directory, if one was made, has run.json with status "failed", never "completed".

Every run spends seconds importing torch and Lightning, so the runs of the selected tests start
together up front, as many at a time as there are CPU cores (`@case` says what a test runs); each
test then checks its own run's outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

ERROR_PREFIX = "kiln train: error: "
# What a failing run may print besides its error: one progress line per finished epoch.
PROGRESS_LINE = re.compile(r"^epoch \d+/\d+ ")
# A tiny, fast run: a small MLP, 2 epochs of at most 2 batches, no compression or export after it.
FAST = [
    "model=mlp",
    "model.net.hidden_sizes=[8]",
    "debug=fast",
    "progress=lines",
    "logger.log_graph=false",
    "export.after_training=false",
]
TABLE = ["data=table", "data.target=y", "data.batch_size=16"]
WORKERS = max(1, min(4, os.cpu_count() or 1))


# -- data --------------------------------------------------------------------------------------


def table(n_rows: int = 60, seed: int = 0) -> pd.DataFrame:
    """Two numeric features, one text category and a yes/no target that depends on them."""
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n_rows).round(3), rng.normal(size=n_rows).round(3)
    color = rng.choice(["red", "green", "blue"], size=n_rows)
    y = np.where(x1 + x2 + (color == "red") > 0.5, "yes", "no")
    return pd.DataFrame({"x1": x1, "x2": x2, "color": color, "y": y})


def write_csv(directory: Path, frame: pd.DataFrame, name: str = "data.csv") -> str:
    frame.to_csv(directory / name, index=False)
    return name


def on_table(cwd: Path, frame: pd.DataFrame | None = None) -> list[str]:
    """Overrides for a run on `frame` (default: table()) written to cwd/data.csv."""
    return [*TABLE, f"data.path={write_csv(cwd, table() if frame is None else frame)}", *FAST]


# -- running kiln ------------------------------------------------------------------------------


def kiln_train(cwd: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`kiln train <overrides>` as a subprocess in `cwd`, with runs under cwd/runs."""
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    command = [sys.executable, "-m", "kiln", "train", f"paths.output_dir={cwd / 'runs'}", *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def runs_of(cwd: Path) -> list[Path]:
    base = cwd / "runs" / "train"
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []


@dataclass
class Outcome:
    cwd: Path
    result: subprocess.CompletedProcess[str]


Setup = Callable[[Path, "Launcher"], list[str]]  # writes a case's files into cwd, returns its overrides
SETUPS: dict[str, Setup] = {}


def case(setup: Setup) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register what the decorated test runs: `setup(cwd, launcher)` returns the overrides."""

    def register(test: Callable[..., None]) -> Callable[..., None]:
        SETUPS[test.__name__] = setup
        return test

    return register


class Launcher:
    """Runs the cases of the selected tests in parallel, plus one tiny trained run if a case needs it."""

    def __init__(self, base: Path, names: list[str]) -> None:
        self.base = base
        self.pool = ThreadPoolExecutor(max_workers=WORKERS)
        self._trained: Future[tuple[Path, str]] | None = None
        if any(name in NEEDS_TRAINED_RUN for name in names):
            self._trained = self.pool.submit(self._train)
        self.futures = {name: self.pool.submit(self._run, name) for name in names}

    def outcome(self, name: str) -> Outcome:
        return self.futures[name].result()

    def trained(self) -> tuple[Path, str]:
        """A finished tiny run (hidden size 8) on table(): its directory and last.ckpt's sha256."""
        assert self._trained is not None
        return self._trained.result()

    def _train(self) -> tuple[Path, str]:
        cwd = self.base / "trained"
        cwd.mkdir()
        result = kiln_train(cwd, *on_table(cwd))
        assert result.returncode == 0, result.stderr[-4000:]
        (run_dir,) = runs_of(cwd)
        return run_dir, sha256(run_dir / "checkpoints" / "last.ckpt")

    def _run(self, name: str) -> Outcome:
        cwd = self.base / name
        cwd.mkdir()
        return Outcome(cwd, kiln_train(cwd, *SETUPS[name](cwd, self)))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def launcher(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    selected = [
        name
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and (name := getattr(item, "originalname", item.name)) in SETUPS
    ]
    launcher = Launcher(tmp_path_factory.mktemp("bad_input"), list(dict.fromkeys(selected)))
    yield launcher
    launcher.close()


@pytest.fixture
def run(request: pytest.FixtureRequest, launcher: Launcher) -> Outcome:
    """The outcome of this test's case (started by the launcher)."""
    return launcher.outcome(request.node.originalname)


# -- what every case checks --------------------------------------------------------------------


def user_error(outcome: Outcome, *expected: str) -> str:
    """The one error line of a run that failed on a user mistake; it must contain each of `expected`.

    Also: every run directory made is marked failed with that error, and none says completed.
    """
    result = outcome.result
    report = f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert "Traceback" not in result.stderr, report
    assert result.returncode == 2, report
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, report
    others = [line for line in lines if line not in errors and not PROGRESS_LINE.match(line)]
    assert not others, f"stderr holds more than the error line:\n{report}"
    assert "done in" not in result.stdout, report
    line = errors[0].removeprefix(ERROR_PREFIX)
    for text in expected:
        assert text in line, f"{text!r} not in the error line: {line}"
    for record in run_records(outcome.cwd):
        assert record["status"] == "failed", record
        assert line[:60] in (record.get("error") or ""), record
    return line


def run_records(cwd: Path) -> list[dict[str, Any]]:
    """run.json of each run directory (a mistake caught before the record starts leaves none)."""
    paths = [run_dir / "run.json" for run_dir in runs_of(cwd)]
    return [json.loads(path.read_text()) for path in paths if path.exists()]


# -- 1-4: config mistakes ----------------------------------------------------------------------


@case(lambda cwd, _: ["model=nosuch"])
def test_unknown_config_group_option(run: Outcome):
    user_error(run, "model=nosuch", "no such option", "available:", "cnn, mlp")


@case(lambda cwd, _: ["trainer.max_epochz=3"])
def test_override_of_a_key_that_does_not_exist(run: Outcome):
    user_error(run, "trainer.max_epochz", "no such config key", "--cfg job", "+trainer.max_epochz=VALUE")


@case(lambda cwd, _: [*on_table(cwd), "trainer.max_epochs=abc"])
def test_wrong_type(run: Outcome):
    user_error(run, "trainer.max_epochs='abc'", "expected an integer", "trainer.max_epochs=10")
    assert not run_records(run.cwd)  # caught before the run started: no data loaded, no run record


@case(lambda cwd, _: [*on_table(cwd), "model.optimizer.lr=-0.1"])
def test_negative_learning_rate(run: Outcome):
    line = user_error(run, "model.optimizer.lr=-0.1", "learning rate", "fix model.optimizer.lr")
    assert "_target_" not in line  # the key, not a dump of the optimizer's config


@case(lambda cwd, _: [*on_table(cwd), "data.batch_size=0"])
def test_batch_size_zero(run: Outcome):
    user_error(run, "data.batch_size=0", "must be >= 1")


# -- 5-9: data mistakes ------------------------------------------------------------------------


@case(lambda cwd, _: [*TABLE, "data.path=nope.csv", *FAST])
def test_missing_data_file(run: Outcome):
    user_error(run, "data.path=nope.csv", "file not found", str(run.cwd / "nope.csv"))


def empty_file(cwd: Path, _: Launcher) -> list[str]:
    (cwd / "empty.csv").write_bytes(b"")
    return [*TABLE, "data.path=empty.csv", *FAST]


@case(empty_file)
def test_empty_csv(run: Outcome):
    user_error(run, "data.path=empty.csv", "the file is empty", "header row")


@case(lambda cwd, _: on_table(cwd, table().drop(columns="y")))
def test_csv_without_the_target_column(run: Outcome):
    user_error(run, "data.target=y", "no such column", "data.path=data.csv", "columns: x1, x2, color")


def missing_targets(cwd: Path, _: Launcher) -> list[str]:
    frame = table()
    frame.loc[[3, 7], "y"] = None
    return [*on_table(cwd, frame), "data.missing_target=error"]  # the default drops them, with a count


@case(missing_targets)
def test_csv_with_missing_target_values(run: Outcome):
    user_error(run, "data.target=y", "2 of 60 rows of data.path=data.csv", "data rows 4, 8", "drop or fill")


@case(lambda cwd, _: [*on_table(cwd), "data.categorical_columns=[nosuch]"])
def test_declared_categorical_column_absent(run: Outcome):
    user_error(
        run,
        "data.categorical_columns",
        "'nosuch' not in data.path=data.csv",
        "remove it from data.categorical_columns",
        "columns: x1, x2, color, y",
    )


def question_marks(cwd: Path, _: Launcher) -> list[str]:
    frame = table().astype({"x1": object})
    frame.loc[[2, 5, 9], "x1"] = "?"
    return on_table(cwd, frame)


@case(question_marks)
def test_numeric_column_holding_strings(run: Outcome):
    user_error(
        run,
        "column 'x1' of data.path=data.csv",
        "holds text in 3 rows ('?'; first in data row 3)",
        "empty cells",
        "data.categorical_columns=[x1]",
    )


@case(lambda cwd, _: on_table(cwd, table(n_rows=5)))
def test_fewer_rows_than_the_splits_need(run: Outcome):
    user_error(run, "data.path=data.csv", "5 rows", "at least 3 rows of every class", "add rows")


# -- 10-13: training mistakes ------------------------------------------------------------------


@case(lambda cwd, _: [*on_table(cwd), "monitor.metric=val/nosuch"])
def test_monitor_key_never_logged(run: Outcome):
    user_error(run, "monitor.metric=val/nosuch", "never logs it", "val/loss", "val/acc")


def resume_other_model(cwd: Path, launcher: Launcher) -> list[str]:
    run_dir, _ = launcher.trained()
    return [*on_table(cwd), "model.net.hidden_sizes=[16]", f"resume={run_dir / 'checkpoints' / 'last.ckpt'}"]


NEEDS_TRAINED_RUN = {"test_resume_from_a_checkpoint_of_another_model"}


@case(resume_other_model)
def test_resume_from_a_checkpoint_of_another_model(run: Outcome, launcher: Launcher):
    run_dir, checkpoint_hash = launcher.trained()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert sha256(last) == checkpoint_hash  # the checkpoint it tried to resume from is untouched
    user_error(
        run,
        f"checkpoint {last} is from another model",
        "has shape (8, 5) there but (16, 5) here",
        "resume with the model and data config it was trained with",
        str(run_dir / ".hydra" / "config.yaml"),
    )


def garbage_checkpoint(cwd: Path, _: Launcher) -> list[str]:
    (cwd / "broken.ckpt").write_bytes(np.random.default_rng(0).bytes(3000))
    return [*on_table(cwd), "resume=broken.ckpt"]


@case(garbage_checkpoint)
def test_resume_from_a_corrupted_checkpoint(run: Outcome):
    line = user_error(
        run, "resume=broken.ckpt", "cannot be read", "not a zip archive", "use another checkpoint"
    )
    assert "weights_only" not in line  # torch's advice to unpickle anything is not the fix


def diverging(cwd: Path, _: Launcher) -> list[str]:
    # One optimizer step per epoch (42 training rows, batch 64), early stopping off (debug=fast):
    # epoch 1's step blows the weights up (checkpoints are still saved), epoch 2's validation loss
    # is NaN, and epoch 3's training loss is NaN: the training loss check stops the run there.
    overrides = [o for o in on_table(cwd) if o != "data.batch_size=16"]
    return [*overrides, "data.batch_size=64", "trainer.max_epochs=3", "model.optimizer.lr=1e12"]


@case(diverging)
def test_loss_that_becomes_nan(run: Outcome):
    assert "epoch 1/3" in run.result.stderr
    line = user_error(run, "became nan", "diverged", "learning rate too high (model.optimizer.lr)", "lower")
    assert re.search(r"at epoch \d+", line), line
    checkpoints = runs_of(run.cwd)[0] / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()  # saved before the error, and kept
    (record,) = run_records(run.cwd)
    assert record["test_metrics"] == {} and record["best_checkpoint"] is None


def diverging_with_early_stopping(cwd: Path, _: Launcher) -> list[str]:
    # As above, with early stopping on (the default): when epoch 2's validation loss is NaN,
    # EarlyStopping(check_finite=true) stops the run quietly, and epoch 1 (weights already blown
    # up, val/loss 1e23) is the best checkpoint that gets tested and reported.
    return [o for o in diverging(cwd, _) if o != "debug=fast"]


@case(diverging_with_early_stopping)
def test_loss_that_becomes_nan_with_early_stopping(run: Outcome):
    assert "epoch 1/3" in run.result.stderr
    line = user_error(run, "at epoch 2", "diverged", "learning rate too high (model.optimizer.lr)")
    assert "val/loss" in line
    checkpoints = runs_of(run.cwd)[0] / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()  # saved after epoch 1, and kept


# -- 14-18: settings checked before anything is built, unsafe checkpoints, the run directory ----


@case(lambda cwd, _: [*on_table(cwd), "trainer.max_epochs=0"])
def test_max_epochs_zero(run: Outcome):
    line = user_error(run, "trainer.max_epochs=0", "an integer >= 1, or -1 for no limit")
    assert "checkpoint" not in line
    assert not run_records(run.cwd)  # caught before the run started


@case(lambda cwd, _: [*on_table(cwd), "trainer.max_epochs=-3"])
def test_negative_max_epochs(run: Outcome):
    line = user_error(run, "trainer.max_epochs=-3", "an integer >= 1, or -1 for no limit")
    assert "MisconfigurationException" not in line


@case(lambda cwd, _: [*on_table(cwd), "seed=abc"])
def test_seed_that_is_not_a_number(run: Outcome):
    line = user_error(run, "seed='abc': needs an integer", "e.g. seed=42")
    assert "data.seed" not in line  # the key the user wrote, not the copy the datamodule takes
    assert not run_records(run.cwd)


class _MakesADirectory:
    """Unpickling this would call os.mkdir(path): harmless, and visible if it ever ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def pickled_object_checkpoint(cwd: Path, _: Launcher) -> list[str]:
    import torch

    torch.save(
        {"state_dict": {}, "epoch": 0, "payload": _MakesADirectory(str(cwd / "it-ran"))}, cwd / "evil.ckpt"
    )
    return [*on_table(cwd), "resume=evil.ckpt"]


@case(pickled_object_checkpoint)
def test_resume_from_a_checkpoint_that_pickles_code(run: Outcome):
    user_error(
        run,
        "resume=evil.ckpt: checkpoint holds objects kiln will not unpickle (posix.mkdir)",
        "could run arbitrary code",
        "use a checkpoint saved by Lightning or kiln",
    )
    assert "weights_only" not in run.result.stderr  # torch's advice to unpickle it anyway is never passed on
    assert not (run.cwd / "it-ran").exists()


def output_dir_under_a_file(cwd: Path, _: Launcher) -> list[str]:
    (cwd / "a-file").write_text("not a directory\n")
    return [*on_table(cwd), f"paths.output_dir={cwd / 'a-file' / 'runs'}"]


@case(output_dir_under_a_file)
def test_output_dir_that_cannot_be_made(run: Outcome):
    user_error(
        run,
        f"paths.output_dir={run.cwd / 'a-file' / 'runs'}: cannot create the run directory",
        f"{run.cwd / 'a-file'} is a file, not a directory",
        "set paths.output_dir to a directory you can write to",
    )
