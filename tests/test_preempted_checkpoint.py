"""A preempted.ckpt that a resumed run has trained past is removed when that training completes;
one that is still the newest (or one saved by this very training) stays."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kiln.training.preemption import StopOnSignal, drop_superseded


def checkpoints(tmp_path: Path, preempted_newer: bool) -> tuple[Path, Path]:
    preempted, last = tmp_path / "preempted.ckpt", tmp_path / "last.ckpt"
    preempted.write_bytes(b"saved at the signal")
    last.write_bytes(b"saved at an epoch's end")
    older, newer = (last, preempted) if preempted_newer else (preempted, last)
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    os.utime(newer, ns=(2_000_000_000, 2_000_000_000))
    return preempted, last


def test_a_preempted_checkpoint_older_than_last_is_dropped(tmp_path: Path) -> None:
    preempted, last = checkpoints(tmp_path, preempted_newer=False)
    drop_superseded(preempted)
    assert not preempted.exists() and last.read_bytes() == b"saved at an epoch's end"


def test_a_preempted_checkpoint_newer_than_last_is_kept(tmp_path: Path) -> None:
    preempted, _ = checkpoints(tmp_path, preempted_newer=True)
    drop_superseded(preempted)
    assert preempted.read_bytes() == b"saved at the signal"  # the newest: resume=auto continues from it
    (tmp_path / "last.ckpt").unlink()
    drop_superseded(preempted)
    assert preempted.exists()  # nothing supersedes it


def end_of_training(callback: StopOnSignal, global_zero: bool = True) -> None:
    trainer: Any = SimpleNamespace(is_global_zero=global_zero)
    callback.on_train_end(trainer, None)  # type: ignore[arg-type]


def test_the_end_of_a_completed_training_drops_it_but_not_after_a_signal_or_on_other_ranks(
    tmp_path: Path,
) -> None:
    preempted, _ = checkpoints(tmp_path, preempted_newer=False)
    interrupted = StopOnSignal(tmp_path)
    interrupted.received = 15  # this training was stopped by SIGTERM: its own save must stay
    end_of_training(interrupted)
    assert preempted.exists()
    end_of_training(StopOnSignal(tmp_path), global_zero=False)
    assert preempted.exists()  # rank zero alone touches the shared directory
    end_of_training(StopOnSignal(tmp_path))
    assert not preempted.exists()
