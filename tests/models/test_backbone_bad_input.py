"""Issue 23's bad input for timm backbones, run as a user runs it (`kiln train ...` through the CLI's
own entry point): one `kiln train: error:` line naming the setting or file and the fix, exit 2, and
no run that looks finished. torchvision missing is simulated in a child process whose imports of
it fail, as they do where it is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from kiln.models import backbones
from kilntest import read_run

ERROR = "kiln train: error: "


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir()
        for index in range(10):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def train_args(photos: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        "train",
        "data=image_folder",
        f"data.path={photos}",
        "data.image_size=16",
        "data.num_workers=0",
        "model=backbone",
        "trainer.max_epochs=1",
        f"run_dir={run_dir}",
        *overrides,
    ]


def the_error_line(stderr: str) -> str:
    """The one error line; anything else on stderr may only be kiln's own `kiln:` notes."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, stderr
    assert all(line.startswith("kiln") for line in stderr.splitlines() if line.strip()), stderr
    return errors[0].removeprefix(ERROR)


def assert_not_finished(run_dir: Path) -> None:
    assert not (run_dir / "model.onnx").exists()
    if (run_dir / "run.json").exists():
        assert read_run(run_dir)["status"] != "completed"


def state_dict_of(name: str) -> dict[str, torch.Tensor]:
    return timm.create_model(name, pretrained=False, num_classes=0).state_dict()


def bad_weights(folder: Path) -> dict[str, tuple[Path, str]]:
    """Weights files a user might pass by mistake, and what kiln's line says of each."""
    torch.save(state_dict_of("resnet34"), folder / "resnet34.pt")
    torch.save({"lr": 0.1, "epoch": 3}, folder / "settings.pt")
    (folder / "notes.pt").write_text("these are not weights\n")
    return {
        "another architecture": (
            folder / "resnet34.pt",
            "tensor layer1.2.conv1.weight (64, 64, 3, 3) in the file has no place in resnet18; these "
            "weights are for another architecture: set model.net.name to theirs",
        ),
        "not a state dict": (
            folder / "settings.pt",
            "not a state dict of tensors (its entry 'lr' is a float); give a state dict saved with "
            "torch.save(net.state_dict())",
        ),
        "a text file": (folder / "notes.pt", "a text file, not a state dict; give a state dict saved with"),
    }


def kiln_train(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], args: list[str]) -> str:
    from kilntest import kiln_in_process

    capfd.readouterr()
    code = kiln_in_process(monkeypatch, *args)
    stderr = capfd.readouterr().err
    assert code == 2, stderr
    return the_error_line(stderr)


def test_an_unknown_timm_name_is_one_line_with_near_matches(photos, tmp_path, monkeypatch, capfd):
    line = kiln_train(monkeypatch, capfd, train_args(photos, tmp_path / "run", "model.net.name=resnt18"))
    assert line.startswith("model.net.name=resnt18: not a timm model; did you mean resnet18")
    assert_not_finished(tmp_path / "run")


@pytest.mark.parametrize("case", ["another architecture", "not a state dict", "a text file"])
def test_weights_that_do_not_fit_are_one_line_naming_the_file(photos, tmp_path, monkeypatch, capfd, case):
    path, reason = bad_weights(tmp_path)[case]
    args = train_args(photos, tmp_path / "run", "model.net.name=resnet18", f"model.net.weights={path}")
    line = kiln_train(monkeypatch, capfd, args)
    assert line.startswith(f"model.net.weights={path}: {reason}"), line
    assert_not_finished(tmp_path / "run")


def test_an_interpolation_the_graph_cannot_repeat_is_one_line(photos, tmp_path, monkeypatch, capfd):
    line = kiln_train(monkeypatch, capfd, train_args(photos, tmp_path / "run", "data.interpolation=nearest"))
    assert line == (
        "data.interpolation=nearest: must be bilinear or bicubic (what the exported graph repeats), got 'nearest'"
    )


def test_timm_missing_is_one_line_with_the_install_command(photos, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(
        backbones, "_import_error", lambda library: "ModuleNotFoundError: No module named 'timm'"
    )
    line = kiln_train(monkeypatch, capfd, train_args(photos, tmp_path / "run"))
    assert line == (
        "model=backbone needs timm, and timm does not import here (ModuleNotFoundError: No module named "
        "'timm'); pip install timm torchvision (scripts/setup.sh installs both)"
    )
    assert_not_finished(tmp_path / "run")


# torchvision as where it is not installed: Python's path finder finds neither its package nor its
# metadata (Lightning asks the metadata before importing it; timm imports it)
NO_TORCHVISION = """
import sys
from importlib.machinery import PathFinder

find_spec, find_distributions = PathFinder.find_spec, PathFinder.find_distributions

def spec_but_torchvision(name, path=None, target=None):
    return None if name.split(".")[0] == "torchvision" else find_spec(name, path, target)

def distributions_but_torchvision(*args, **kwargs):
    return (d for d in find_distributions(*args, **kwargs) if d.metadata["Name"].lower() != "torchvision")

PathFinder.find_spec = staticmethod(spec_but_torchvision)
PathFinder.find_distributions = staticmethod(distributions_but_torchvision)
from kiln.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchvision_missing_is_one_line_with_the_install_command(photos, tmp_path):
    """The real CLI in a child process (a missing library cannot be simulated in one that imported it)."""
    args = train_args(photos, tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCHVISION, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr
    assert the_error_line(result.stderr) == (
        "model=backbone needs timm, and timm does not import here (ModuleNotFoundError: No module named "
        "'torchvision'); pip install timm torchvision (scripts/setup.sh installs both)"
    )
    assert_not_finished(tmp_path / "run")
