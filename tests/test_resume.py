"""Resume: a run killed with SIGKILL mid-epoch continues from its last checkpoint and ends exactly
where an uninterrupted run with the same seed ends (deterministic mode)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from kilntest import NO_COMPRESSION, Output, assert_ok, kiln_command, read_run, run_kiln, wait_for

pytestmark = pytest.mark.slow

EPOCHS = 5
SETTINGS = [
    "data=synthetic",
    "data.num_samples=160000",
    "data.num_features=16",
    "model=mlp",
    "model.net.hidden_sizes=[64]",
    "model.net.dropout=0.1",  # randomness in every step must replay identically
    "model.scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,_partial_:true,T_max:5}",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.deterministic=true",
    "callbacks.early_stopping=null",
    "progress=lines",
    *NO_COMPRESSION,
]


def last_epoch_and_step(run_dir: Path) -> tuple[int, int]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint["epoch"], checkpoint["global_step"]


def saved_epoch(run_dir: Path) -> int | None:
    """The epoch (0-based) of last.ckpt so far; None before the first. kiln saves a checkpoint to a
    temporary name and renames it: a last.ckpt that exists is whole."""
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return None
    return last_epoch_and_step(run_dir)[0]


def test_killed_mid_epoch_then_resumed_matches_an_uninterrupted_run(tmp_path: Path):
    straight_dir, broken_dir = tmp_path / "straight", tmp_path / "broken"
    assert_ok(run_kiln(["train", f"run_dir={straight_dir}", *SETTINGS], tmp_path))

    # Start the same run and SIGKILL it inside its third epoch: once it has printed its second
    # epoch's line and saved that epoch's last.ckpt, with three epochs still to train. Both are
    # events the test sees, so the kill lands mid-training however slow the machine.
    process = subprocess.Popen(
        kiln_command("train", f"run_dir={broken_dir}", *SETTINGS),
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    stderr = Output(process.stderr)
    try:
        wait_for(
            lambda: stderr.search(r"^epoch 2/\d+ "),
            "the run's line for its second epoch",
            timeout=600,  # as long as run_kiln gives a whole run
            process=process,
            output=stderr,
        )
        wait_for(
            lambda: (saved_epoch(broken_dir) or 0) >= 1,
            "last.ckpt of the second epoch",
            process=process,
            output=stderr,
        )
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, stderr.finish()
    killed_at, _ = last_epoch_and_step(broken_dir)
    assert 1 <= killed_at < EPOCHS - 1, "the kill must land after epoch 2 was saved and before the run ended"
    assert read_run(broken_dir)["status"] == "running", "a killed run never claims to be finished"

    resumed = run_kiln(["train", f"run_dir={broken_dir}", "resume=auto", *SETTINGS], tmp_path)
    assert_ok(resumed)
    assert f"resuming from {broken_dir / 'checkpoints' / 'last.ckpt'}" in resumed.stderr

    straight, broken = read_run(straight_dir), read_run(broken_dir)
    assert broken["status"] == "completed"
    assert broken["resumed_from"] == str(broken_dir / "checkpoints" / "last.ckpt")
    assert [attempt["status"] for attempt in broken["attempts"]] == ["running"]
    assert last_epoch_and_step(broken_dir) == last_epoch_and_step(straight_dir)
    assert broken["best_checkpoint"]["epoch"] == straight["best_checkpoint"]["epoch"]
    for name, value in straight["test_metrics"].items():
        assert broken["test_metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_resume_auto_needs_the_run_to_continue(kiln):
    result = kiln("train", "resume=auto", "trainer.max_epochs=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "kiln train: error: resume=auto continues an existing run: add run_dir=<that run's directory>"
    )


def test_resume_auto_in_a_directory_without_checkpoints_says_it_starts_fresh(kiln, tmp_path: Path):
    run_dir = tmp_path / "fresh"
    result = kiln(
        "train", f"run_dir={run_dir}", "resume=auto", "model=mlp", "trainer.max_epochs=1", "progress=lines"
    )
    assert_ok(result)
    assert f"no checkpoint in {run_dir / 'checkpoints'}, starting fresh" in result.stderr
    assert read_run(run_dir)["status"] == "completed"
