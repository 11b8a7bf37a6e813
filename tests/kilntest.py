"""Helpers shared by the test suite: run the real `kiln` CLI as a subprocess, find what it left
behind, and train the small runs that the compress, export and predict tests start from."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Small, fast settings for end-to-end runs on 2 cores (compression and export switched off: the
# tests of those stages run them explicitly).
NO_COMPRESSION = ["compress=none", "export.after_training=false"]
TINY_DIGITS = [
    "data=digits",
    "model=mlp",
    "model.net.hidden_sizes=[32]",
    "trainer.max_epochs=2",
    "progress=lines",
    *NO_COMPRESSION,
]
TINY_PENGUINS = ["experiment=penguins_mlp", "trainer.max_epochs=3"]
TINY_DIGITS_CNN = [
    "data=digits",
    "model=cnn",
    "model.net.channels=[4,8]",
    "model.net.hidden_size=16",
    "trainer.max_epochs=2",
    "monitor.metric=val/acc",
    "monitor.mode=max",
]
# Fewer latency repeats: the tests check the stages' behaviour, not their timings.
QUICK = ["export.latency_repeats=3"]


def kiln_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln", *args]


def run_kiln(
    args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    environment.pop("HYDRA_FULL_ERROR", None)  # users see kiln's one-line errors, so do the tests
    return subprocess.run(
        kiln_command(*args), cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def kiln_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return run_kiln(list(args), cwd, env=env, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert_ok(result)
    return result


def run_dirs(output_dir: Path, task: str = "train") -> list[Path]:
    base = output_dir / task
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []


def read_run(run_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
    return record


def trained_run(factory: pytest.TempPathFactory, name: str, overrides: list[str]) -> Path:
    """A run trained once per test session and reused by every test that asks for it by name."""
    base = factory.getbasetemp() / "kiln-shared-runs" / name
    runs = base / "runs" / "train"
    existing = sorted(runs.glob("*/checkpoints/best.ckpt")) if runs.exists() else []
    if existing:
        return existing[0].parent.parent
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    ok(
        kiln_cli(
            "train",
            *overrides,
            "progress=lines",
            *NO_COMPRESSION,
            f"paths.output_dir={base / 'runs'}",
            cwd=base,
        )
    )
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def copy_run(run: Path, destination: Path) -> Path:
    """A private copy, so that tests writing model.onnx and reports never see each other's files."""
    target = destination / run.name
    shutil.copytree(
        run, target, ignore=shutil.ignore_patterns("compress", "export", "model.onnx", "report.*")
    )
    return target


class PreemptAt(L.Callback):
    """Plays SLURM: SIGTERM reaches the Preemption callback (kiln.training.preemption) after a given
    step of a given epoch."""

    def __init__(self, preemption: Any, epoch: int, chunk: int) -> None:
        self.preemption, self.epoch, self.chunk = preemption, epoch, chunk

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if (trainer.current_epoch, args[-1]) == (self.epoch, self.chunk):
            self.preemption.received = signal.SIGTERM
