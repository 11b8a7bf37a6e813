"""The `gpu` tier: what only a CUDA GPU can check, skipped elsewhere (tests/conftest.py says why).
`pytest -m gpu` (scripts/gpu_check.sh runs it) on a GPU machine: bf16-mixed training of a timm
ResNet-18 on image files, torch.compile, DDP on one GPU, and the export of a CUDA-trained checkpoint
with its parity checked on the CPU in onnxruntime. The CPU fallback of scripts/gpu_check.sh stays in
tests/test_gpu_check.py; the tier's skip is tested here on any machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kilntest import ROOT, kiln_cli, ok, read_run, run_dirs
from test_images_e2e import colour_folder

# a ResNet-18 from timm on 32x32 colour images: seconds on a GPU
IMAGES = [
    "data=image_folder",
    "data.image_size=32",
    "data.num_workers=1",
    "data.batch_size=16",
    "model=backbone",
    "model.net.name=resnet18",
    "model.optimizer.lr=0.003",
    "trainer.max_epochs=3",
    "compress=none",
    "export.latency_repeats=3",
    "progress=lines",
]


def train_in_process(tmp_path: Path, *overrides: str) -> dict:
    from kiln.config import compose
    from kiln.stages import train as train_stage

    folder = colour_folder(tmp_path / "photos")
    run_dir = tmp_path / "run"
    cfg = compose("train", [*IMAGES, f"data.path={folder}", *overrides, f"run_dir={run_dir}"])
    train_stage.main.call(cfg)
    return read_run(run_dir)


def assert_trained_and_shipped(record: dict) -> None:
    assert record["status"] == "completed"
    assert record["test_metrics"]["test/acc"] >= 0.9  # colours: an easy task
    delivery = record.get("delivery") or {}
    assert delivery.get("status") == "passed", delivery  # the ONNX parity check, on the CPU


@pytest.mark.gpu
def test_bf16_mixed_training_of_a_resnet_on_the_gpu_exports_with_parity_on_the_cpu(tmp_path: Path):
    record = train_in_process(tmp_path, "trainer=gpu", "trainer.precision=bf16-mixed")
    assert_trained_and_shipped(record)


@pytest.mark.gpu
def test_torch_compile_on_the_gpu(tmp_path: Path):
    record = train_in_process(tmp_path, "trainer=gpu", "model.compile=true")
    assert_trained_and_shipped(record)


@pytest.mark.gpu
def test_ddp_on_one_gpu_through_the_cli(tmp_path: Path):
    folder = colour_folder(tmp_path / "photos")
    ok(
        kiln_cli(
            "train",
            *IMAGES,
            f"data.path={folder}",
            "trainer=ddp",
            "trainer.devices=1",
            f"paths.output_dir={tmp_path / 'runs'}",
            cwd=tmp_path,
        )
    )
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert_trained_and_shipped(read_run(run_dir))


@pytest.mark.slow
def test_the_gpu_tier_is_skipped_without_cuda_and_says_why(tmp_path: Path):
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine with one
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(Path(__file__)),
            "-m",
            "gpu",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 skipped, 1 deselected" in result.stdout, result.stdout[-3000:]
    reason = "needs a CUDA GPU (torch.cuda.is_available() is False): pytest -m gpu on a GPU machine runs it"
    assert result.stdout.count(reason) == 3, result.stdout[-3000:]
