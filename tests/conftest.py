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


# Fixtures that train a run or start a real server: a test that uses one is in the `slow` tier
# whatever its own marks say, so `-m "not slow"` (the fast loop) never pays for them.
SLOW_FIXTURES = frozenset(
    {
        "penguins_run",
        "digits_cnn_run",
        "tiny_run",  # test_api.py
        "image_run",  # test_images_e2e.py: a ResNet on image files
        "mlflow_server",
        "tracked",  # test_mlflow.py
        "completed_run",  # test_run_ownership.py
        "trained",  # test_targets.py
        "completed",  # test_recovery.py
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that need a trained run or a server are `slow`. The `gpu` tier runs only where CUDA
    is: elsewhere its tests are skipped, saying why."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in gpu_tests:
        item.add_marker(pytest.mark.skip(reason=GPU_SKIP))
