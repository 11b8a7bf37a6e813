"""Shared helpers: run the real `kiln` CLI as a subprocess and find what it left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Small, fast settings for end-to-end runs on 2 cores.
TINY_DIGITS = ["data=digits", "model=mlp", "model.net.hidden_sizes=[32]", "trainer.max_epochs=2", "progress=lines"]


def kiln_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln", *args]


def run_kiln(
    args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    environment.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        kiln_command(*args), cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def run_dirs(output_dir: Path, task: str = "train") -> list[Path]:
    base = output_dir / task
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []


def read_run(run_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
    return record


@pytest.fixture
def kiln(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`kiln("train", "data=digits", ...)` in tmp_path, with runs under tmp_path/runs."""

    def call(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        stage, *rest = args
        return run_kiln([stage, f"paths.output_dir={tmp_path / 'runs'}", *rest], tmp_path, env=env, timeout=timeout)

    return call


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
