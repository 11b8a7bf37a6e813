"""Fixtures shared by the whole suite (the helpers themselves live in kilntest.py)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from kilntest import TINY_DIGITS_CNN, TINY_PENGUINS, run_kiln, trained_run

# Nothing downloads at run time (no internet here); built-in data sets (data=digit_images) are
# written once per test session to a fresh cache, never to the user's ~/.cache/kiln.
os.environ.setdefault("KILN_CACHE_DIR", tempfile.mkdtemp(prefix="kiln-test-cache-"))


@pytest.fixture
def kiln(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`kiln("train", "data=digits", ...)` in tmp_path, with runs under tmp_path/runs."""

    def call(
        *args: str, env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        stage, *rest = args
        return run_kiln(
            [stage, f"paths.output_dir={tmp_path / 'runs'}", *rest], tmp_path, env=env, timeout=timeout
        )

    return call


@pytest.fixture(scope="session")
def penguins_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory, "penguins", TINY_PENGUINS)


@pytest.fixture(scope="session")
def digits_cnn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory, "digits_cnn", TINY_DIGITS_CNN)


GPU_SKIP = "needs a CUDA GPU (torch.cuda.is_available() is False): pytest -m gpu on a GPU machine runs it"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The `gpu` tier runs only where CUDA is: elsewhere its tests are skipped, saying why."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in gpu_tests:
        item.add_marker(pytest.mark.skip(reason=GPU_SKIP))
