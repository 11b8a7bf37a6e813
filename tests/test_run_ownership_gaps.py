"""The gaps a review found in run ownership: names inside one SLURM allocation, lock errors and
forked children, a completed cross-validation run, and a log written before the claim."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kiln import config, runs
from kiln.errors import KilnError
from kilntest import ROOT, TINY_DIGITS, kiln_cli


@pytest.fixture
def fresh_names(monkeypatch):
    """Each call of `draw` is a new `kiln <stage>` process: its own name cache and environment."""
    monkeypatch.delenv(config.RUN_NAME_VARIABLE, raising=False)
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)

    def draw(base: Path, *argv: str) -> str:
        config._run_names.clear()
        os.environ.pop(config.RUN_NAME_VARIABLE, None)
        monkeypatch.setattr(sys, "argv", ["kiln", *argv])
        return Path(config.run_dir(None, str(base))).name

    yield draw
    config._run_names.clear()
    os.environ.pop(config.RUN_NAME_VARIABLE, None)


def finish(directory: Path, *argv: str, status: str = "completed") -> None:
    """What `kiln train` leaves: a claimed directory and its record naming the command."""
    runs.claim(directory, continuing=False)
    record = {"status": status, "stage": "train", "config_hash": "x", "command": ["kiln", "train", *argv]}
    (directory / "run.json").write_text(json.dumps(record))
    runs.release(directory)


def test_each_kiln_train_of_one_slurm_job_gets_its_own_run_again_after_a_requeue(
    tmp_path, fresh_names, monkeypatch
):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first, second = ("data=digits", "seed=1"), ("data=digits", "seed=2")
    assert fresh_names(tmp_path, *first) == "slurm-4242"
    finish(tmp_path / "slurm-4242", *first)
    # the allocation's next `kiln train` is not refused: the name is taken, the next one is free
    assert fresh_names(tmp_path, *second) == "slurm-4242.2"
    finish(tmp_path / "slurm-4242.2", *second, status="running")
    # the same command again in the same job (not a requeue) is a new run, not the completed one
    assert fresh_names(tmp_path, *first) == "slurm-4242.3"
    # a directory another process is writing is passed over
    runs.lock((tmp_path / "slurm-4242.3").resolve()) if (tmp_path / "slurm-4242.3").mkdir() is None else None
    try:
        assert fresh_names(tmp_path, "seed=3") == "slurm-4242.4"
    finally:
        runs.release(tmp_path / "slurm-4242.3")
    # requeued: the job runs its commands again, and each finds its own run to resume
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert fresh_names(tmp_path, *second) == "slurm-4242.2"
    assert fresh_names(tmp_path, *first) == "slurm-4242"
    # an array task keeps its task in the name
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert fresh_names(tmp_path, *first) == "slurm-77_3"


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EIO, errno.EBADF])
def test_a_lock_error_is_its_own_line_not_another_writer(tmp_path, monkeypatch, code):
    def failing(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", failing)
    with pytest.raises(KilnError) as raised:
        runs.claim(tmp_path / "run", continuing=False)
    message = str(raised.value)
    assert f"cannot lock {(tmp_path / 'run').resolve()}/.kiln.lock ({errno.errorcode[code]}:" in message
    assert "is writing this run" not in message and "\n" not in message
    assert (tmp_path / "run").resolve() not in runs._locks


def lockable(run: Path) -> bool:
    try:
        runs.lock(run)
    except KilnError:
        return False
    runs.release(run)
    return True


FORKS = r"""
import os, sys
from pathlib import Path
from kiln import runs
runs.lock(Path(sys.argv[1]))
child = os.fork()
if child == 0:
    os.write(1, f"child {os.getpid()}\n".encode())  # one write: the two processes share the pipe
    sys.stdin.read()  # lives on until the test closes its stdin
    os._exit(0)
os.write(1, f"parent {os.getpid()}\n".encode())
sys.stdin.read()
"""


def test_a_forked_child_does_not_keep_the_run_locked_after_its_parent_is_killed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    parent = subprocess.Popen(
        [sys.executable, "-c", FORKS, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert parent.stdout is not None and parent.stdin is not None
    pids = dict(parent.stdout.readline().split() for _ in range(2))
    child = int(pids["child"])
    try:
        assert not lockable(run)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        os.kill(child, 0)  # the forked child still runs...
        assert lockable(run)  # ...and the run is free
        os.kill(child, 0)
    finally:
        parent.stdin.close()  # the child reads EOF and ends
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_completed_cross_validation_run_is_not_trained_over_without_resume(tmp_path):
    run = tmp_path / "cv"
    (run / "fold_0").mkdir(parents=True)
    (run / "cv.json").write_text(json.dumps({"status": "completed", "folds": 2, "runs": [], "mean": {}}))
    (run / "fold_0" / "run.json").write_text(
        json.dumps({"status": "completed", "stage": "train", "config_hash": "x"})
    )
    before = sorted(path.name for path in run.rglob("*"))
    with pytest.raises(
        KilnError, match=r"holds a completed cross-validation run \(cv.json\); kiln does not train over it"
    ):
        runs.claim(run, continuing=False)
    assert sorted(path.name for path in run.rglob("*")) == before  # not even a lock file
    (run / "cv.json").write_text(json.dumps({"status": "failed", "folds": 2}))
    with pytest.raises(
        KilnError, match=r"holds an earlier cross-validation run \(cv.json\) \(status failed\)"
    ):
        runs.claim(run, continuing=False)
    runs.claim(run, continuing=True)  # resume=...: continued
    runs.release(run)


@pytest.mark.slow
def test_a_refused_run_dir_gets_no_log_file(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    result = kiln_cli("train", *TINY_DIGITS, f"run_dir={folder}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "holds files kiln did not make (notes.txt)" in result.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt"]  # no train.log, nothing else
    assert (folder / "notes.txt").read_text() == "my notes"
