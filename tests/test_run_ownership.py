"""A run directory has one writer, a completed run is never trained over, a refused resume changes
nothing, kiln writes only into its own directories, Ctrl-C and `kill` stop a run the way shells
expect (130, 143) with a line saying how to continue, and no password reaches a file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from kilntest import NO_COMPRESSION, ONE_THREAD, TINY_DIGITS, kiln_cli, kiln_command, ok, read_run

LONG_DIGITS = [  # trains until it is stopped
    "data=digits",
    "model=mlp",
    "model.net.hidden_sizes=[32]",
    "trainer.max_epochs=100000",
    "callbacks.early_stopping.patience=100000",
    "progress=lines",
    *NO_COMPRESSION,
]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` by its relative path, with a digest of its bytes; the lock
    file only by its name (it names whichever process held it last)."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        if path.name != ".kiln.lock"
        else "lock"
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("owned") / "run"
    ok(kiln_cli("train", *TINY_DIGITS, f"run_dir={run_dir}", cwd=run_dir.parent))
    assert read_run(run_dir)["status"] == "completed"
    return run_dir


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("kiln train:")]
    assert lines, result.stderr
    return lines[-1]


@pytest.mark.slow
def test_a_completed_run_is_not_trained_over_without_resume(completed_run):
    before = snapshot(completed_run)
    result = kiln_cli("train", *TINY_DIGITS, f"run_dir={completed_run}", cwd=completed_run.parent)
    assert result.returncode == 2
    assert error_line(result) == (
        f"kiln train: error: run_dir={completed_run}: holds a completed run (finished "
        f"{read_run(completed_run)['finished']}); kiln does not train over it: continue its training with "
        "resume=auto (e.g. with a larger trainer.max_epochs), or leave run_dir out for a new run"
    )
    assert snapshot(completed_run) == before


@pytest.mark.slow
def test_a_refused_resume_changes_nothing_on_disk(completed_run):
    before = snapshot(completed_run)
    result = kiln_cli(
        "train",
        *TINY_DIGITS,
        "model.net.hidden_sizes=[16]",  # another net than the checkpoint's
        f"run_dir={completed_run}",
        "resume=auto",
        cwd=completed_run.parent,
    )
    assert result.returncode == 2
    assert "last.ckpt is from another model" in error_line(result)
    assert snapshot(completed_run) == before  # run.json still completed, .hydra/ still the run's own
    record = read_run(completed_run)
    assert record["status"] == "completed" and record["best_checkpoint"]["path"]
    assert "hidden_sizes:\n    - 32\n" in (completed_run / ".hydra" / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("contents", "says"),
    [
        ({"notes.txt": "my notes"}, "holds files kiln did not make (notes.txt)"),
        ({"run.json": '{"experiment": "mine"}'}, "holds a run.json that kiln did not write"),
    ],
)
@pytest.mark.slow
def test_kiln_writes_only_into_a_new_or_empty_directory_or_its_own_run(tmp_path, contents, says):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    result = kiln_cli("train", *TINY_DIGITS, f"run_dir={folder}", cwd=tmp_path)
    assert result.returncode == 2
    assert says in error_line(result) and "choose another run_dir" in error_line(result)
    for name, text in contents.items():
        assert (folder / name).read_text() == text
    assert not {".hydra", ".kiln.lock", "checkpoints", "tensorboard"} & {p.name for p in folder.iterdir()}


def start_training(run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        kiln_command("train", *LONG_DIGITS, f"run_dir={run_dir}", *extra),
        cwd=run_dir.parent,
        env={**os.environ, **ONE_THREAD},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def wait_for_line(process: subprocess.Popen[str], prefix: str) -> list[str]:
    """Read the process's stderr until a line starts with `prefix` (the event waited for)."""
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise AssertionError(
        f"the process ended (exit {process.wait()}) before printing {prefix!r}:\n{''.join(seen)}"
    )


@pytest.mark.parametrize(
    ("signum", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")]
)
@pytest.mark.slow
def test_a_signal_saves_says_how_to_continue_and_exits_as_shells_do(tmp_path, signum, code, name):
    run_dir = tmp_path / "run"
    training = start_training(run_dir)
    wait_for_line(training, "epoch 2/")
    # Which signal stops the run makes no difference to the two refusals checked with SIGTERM
    # (another kiln while this one writes; a resume without epochs left): each is a whole `kiln`
    # start, so SIGINT's case checks what differs, its exit, line and record, and its resume.
    refusals = signum == signal.SIGTERM
    if refusals:
        # a second kiln on the same directory, while the first writes it: refused, nothing touched
        second = kiln_cli("train", *TINY_DIGITS, f"run_dir={run_dir}", "resume=auto", cwd=tmp_path)
        assert second.returncode == 2
        assert "is writing this run now; wait for it to end, or choose another run_dir" in error_line(second)
    training.send_signal(signum)
    assert training.stderr is not None
    rest = training.stderr.read()
    assert training.wait() == code
    last = rest.strip().splitlines()[-1]
    assert re.match(f"kiln train: interrupted by {name} (at epoch|at the end of epoch) ", last)
    assert last.endswith(
        f"saved {run_dir}/checkpoints/preempted.ckpt; continue it with: kiln train run_dir={run_dir} resume=auto"
    )
    record = read_run(run_dir)
    assert record["status"] == "interrupted" and record["error"].startswith(f"interrupted by {name}")
    # following the advice finishes the run from where it stopped (one epoch more)
    epoch = int(re.search(r"epoch (\d+)", last).group(1))
    if refusals:
        too_few = kiln_cli("train", *TINY_DIGITS, f"run_dir={run_dir}", "resume=auto", cwd=tmp_path)
        assert too_few.returncode == 2 and "give a larger trainer.max_epochs" in error_line(too_few)
        assert read_run(run_dir)["status"] == "interrupted"  # the refused resume changed nothing
    more = f"trainer.max_epochs={epoch + 1}"
    resumed = ok(
        kiln_cli(
            "train", *TINY_DIGITS, more, f"run_dir={run_dir}", "resume=auto", cwd=tmp_path, env=ONE_THREAD
        )
    )
    assert "resuming from" in resumed.stderr
    record = read_run(run_dir)
    assert record["status"] == "completed" and record["attempts"][-1]["status"] == "interrupted"


@pytest.mark.slow
def test_kill_9_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    training = start_training(run_dir)
    wait_for_line(training, "epoch 2/")
    training.kill()
    assert training.stderr is not None
    epochs = [int(line.split("/")[0].split()[1]) for line in training.stderr if line.startswith("epoch ")]
    training.wait()
    assert read_run(run_dir)["status"] == "running"  # it never got to say otherwise
    more = f"trainer.max_epochs={max([2, *epochs]) + 2}"  # a little past where it was killed
    ok(
        kiln_cli(
            "train", *TINY_DIGITS, more, f"run_dir={run_dir}", "resume=auto", cwd=tmp_path, env=ONE_THREAD
        )
    )
    assert read_run(run_dir)["status"] == "completed"


@pytest.mark.slow
def test_no_password_from_a_url_reaches_any_file_or_the_terminal(tmp_path):
    marker = "Pa55w0rdMarker"
    run_dir = tmp_path / "run"
    result = ok(
        kiln_cli(
            "train",
            *TINY_DIGITS,
            f"+notes.source=mysql+pymysql://kiln:{marker}@db.example.com:3306/runs",
            f"run_dir={run_dir}",
            cwd=tmp_path,
        )
    )
    assert marker not in result.stdout + result.stderr
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(files) > 8  # run.json, .hydra/*, checkpoints, TensorBoard events, the log
    leaking = [str(path) for path in files if marker.encode() in path.read_bytes()]
    assert leaking == []
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "mysql+pymysql://kiln:***@db.example.com:3306/runs" in saved  # what it was, minus the secret
    assert any("kiln:***@" in part for part in json.loads((run_dir / "run.json").read_text())["command"])
