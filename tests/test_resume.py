"""Resume: a run killed with SIGKILL mid-epoch continues from its last checkpoint and ends exactly
where an uninterrupted run with the same seed ends (deterministic mode)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from kilntest import (
    HOLD_ENV,
    NO_COMPRESSION,
    ONE_THREAD,
    Output,
    assert_ok,
    hold_at,
    kiln_command,
    read_run,
    run_kiln,
    wait_for,
)

pytestmark = pytest.mark.slow

EPOCHS = 5
SETTINGS = [
    "data=synthetic",
    "data.num_samples=10000",  # 7,000 training rows: 28 mini-batches an epoch, in two chunks (16, 12)
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


def test_killed_mid_epoch_then_resumed_matches_an_uninterrupted_run(tmp_path: Path):
    straight_dir, broken_dir = tmp_path / "straight", tmp_path / "broken"
    assert_ok(run_kiln(["train", f"run_dir={straight_dir}", *SETTINGS], tmp_path, env=ONE_THREAD))

    # Start the same run and SIGKILL it inside its third epoch, after its first training step there
    # (epoch 2's last.ckpt saved, three epochs still to train): the run holds at that point
    # (kilntest.HoldAt) until it is killed, so the kill lands there however fast or slow the machine.
    held = tmp_path / "held"
    process = subprocess.Popen(
        kiln_command("train", f"run_dir={broken_dir}", *SETTINGS, hold_at(held, epoch=2, step=0)),
        cwd=tmp_path,
        env={**os.environ, **HOLD_ENV, **ONE_THREAD},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    stderr = Output(process.stderr)
    try:
        wait_for(
            held.exists,
            "the run to hold after the first step of its third epoch",
            timeout=600,  # as long as run_kiln gives a whole run
            process=process,
            output=stderr,
        )
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    printed = stderr.finish()
    assert process.returncode == -signal.SIGKILL, printed
    # it printed its second epoch's line and never its third's: killed inside the third epoch
    assert re.search(rf"^epoch 2/{EPOCHS} ", printed, re.M) and not re.search(r"^epoch 3/", printed, re.M), (
        printed
    )
    killed_at, _ = last_epoch_and_step(broken_dir)
    assert killed_at == 1, "the kill must land after epoch 2 was saved and before epoch 3 ended"
    assert read_run(broken_dir)["status"] == "running", "a killed run never claims to be finished"

    # resume=auto carries the run's saved overrides, the test's hold among them: the line drops it,
    # as a user drops a debugging callback
    resumed = run_kiln(
        ["train", f"run_dir={broken_dir}", "resume=auto", *SETTINGS, "~callbacks.hold_for_test"],
        tmp_path,
        env=ONE_THREAD,
    )
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
        "train",
        f"run_dir={run_dir}",
        "resume=auto",
        "model=mlp",
        "trainer.max_epochs=1",
        "progress=lines",
        *NO_COMPRESSION,  # what is tested is the start, not the delivery after it
        env=ONE_THREAD,
    )
    assert_ok(result)
    assert f"no checkpoint in {run_dir / 'checkpoints'}, starting fresh" in result.stderr
    assert read_run(run_dir)["status"] == "completed"
