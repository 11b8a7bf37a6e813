"""scripts/gpu_check.sh where there is no GPU: its CPU fallback runs the same three steps, tiny."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kilntest import ROOT, assert_ok

STEPS = ("images", "digits", "ddp")


def run_gpu_check(tmp_path: Path, knobs: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "PYTHON": sys.executable,
        "KILN_CACHE_DIR": str(tmp_path / "cache"),
        "CUDA_VISIBLE_DEVICES": "",  # the fallback even on a machine with a GPU
        "GPU_CHECK_OUT": str(tmp_path / "out"),
        **knobs,
    }
    environment.pop("HYDRA_FULL_ERROR", None)  # kiln's one-line errors, as users see them
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_fallback(tmp_path: Path) -> None:
    # the smallest run: 1 epoch of 1 training batch, no sanity check, no export: on 2 busy cores
    # each step is mostly kiln's start-up (about 20 s), and an export with its parity check adds
    # 20 s (digits) to 60 s (ResNet-18) a step. `bash scripts/gpu_check.sh` without knobs exports.
    result = run_gpu_check(
        tmp_path,
        {
            "GPU_CHECK_EPOCHS": "1",
            "GPU_CHECK_TINY": "1",
            "GPU_CHECK_BATCHES": "1",
            "GPU_CHECK_EXPORT": "0",
            "GPU_CHECK_TIMEOUT": "150",
        },
        timeout=540,
    )
    assert_ok(result)
    assert "gpu_check: no GPU: CPU fallback" in result.stdout
    for step in STEPS:
        summary = re.search(
            rf"^gpu_check: summary {step}: ok wall_s=(\d+\.\d+) images_per_s=(\d+\.\d+) ",
            result.stdout,
            re.MULTILINE,
        )
        assert summary, f"no summary line for step {step}:\n{result.stdout[-3000:]}"
        wall, images_per_second = (float(value) for value in summary.groups())
        assert wall > 0 and images_per_second > 0, summary.group(0)
    assert "gpu_check: all steps passed" in result.stdout
