"""The `kiln` command line as users meet it: help, Hydra's flags, sweeps, a config directory of
their own, and kiln installed from a wheel rather than this checkout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kilntest import NO_COMPRESSION, ROOT, TINY_DIGITS, assert_ok, read_run, run_kiln

STAGES = ("train", "compress", "export", "predict", "tensorboard")


def test_help_lists_the_stages_without_importing_torch(tmp_path):
    # -X importtime would be noisy to parse; ask the interpreter which modules the CLI loaded.
    probe = "import sys; from kiln.cli import main; main(['--help']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert_ok(result)
    *usage, torch_loaded = result.stdout.strip().splitlines()
    assert torch_loaded == "False"
    for name in STAGES:
        assert any(line.strip().startswith(name) for line in usage), name


def test_an_unknown_stage_is_one_line_and_exit_2(tmp_path):
    result = run_kiln(["trian"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "kiln: error: unknown stage 'trian'; stages: train, search, compress, export, predict, report, tensorboard (kiln --help)"
    )


def test_train_help_shows_the_config_groups(tmp_path):
    result = run_kiln(["train", "--help"], tmp_path)
    assert_ok(result)
    for group in ("data", "model", "trainer", "callbacks", "logger", "compress", "experiment"):
        assert f"{group}:" in result.stdout, group
    assert "digits_cnn" in result.stdout and "penguins_mlp" in result.stdout


def test_cfg_job_prints_the_composed_config_with_overrides(tmp_path):
    import yaml

    result = run_kiln(["train", "--cfg", "job", "experiment=penguins_mlp", "trainer.max_epochs=7"], tmp_path)
    assert_ok(result)
    config = yaml.safe_load(result.stdout)
    assert config["data"]["_target_"] == "kiln.data.TableDataModule"
    assert config["data"]["name"] == "penguins"
    assert config["trainer"]["max_epochs"] == 7
    assert not (tmp_path / "runs").exists() and not list(tmp_path.iterdir())  # nothing was run


def test_info_shows_the_config_search_path(tmp_path):
    result = run_kiln(["train", "--info", "searchpath"], tmp_path)
    assert_ok(result)
    from kiln.config import config_dir

    assert "Config search path" in result.stdout
    assert f"file://{config_dir()}" in result.stdout  # kiln's own configs are the main search path


@pytest.mark.slow
def test_multirun_sweeps_two_jobs_into_two_run_directories(tmp_path):
    result = run_kiln(
        [
            "train",
            "-m",
            f"paths.output_dir={tmp_path / 'runs'}",
            *TINY_DIGITS,
            "trainer.max_epochs=1",
            "model.net.hidden_sizes=[8],[16]",
        ],
        tmp_path,
    )
    assert_ok(result)
    (sweep,) = (tmp_path / "runs" / "train_multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    widths = []
    for job in jobs:
        record = read_run(job)
        assert record["status"] == "completed" and "test/acc" in record["test_metrics"]
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        widths.append(("[8]" in overrides and 8) or ("[16]" in overrides and 16))
    assert widths == [8, 16]


USER_NET = '''
"""A user's own network, outside kiln."""
from torch import nn


class TinyNet(nn.Sequential):
    def __init__(self, input_shape, num_outputs, width: int = 4):
        features = 1
        for size in input_shape:
            features *= size
        super().__init__(nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_outputs))
'''

USER_MODEL_CONFIG = """
# the user's model: kiln's LightningModule around their own net
_target_: kiln.models.KilnModule
net:
  _target_: user_nets.TinyNet
  width: 6
optimizer:
  _target_: torch.optim.AdamW
  _partial_: true
  lr: 0.003
"""


@pytest.mark.slow
def test_a_users_config_dir_and_module_train_without_forking_kiln(tmp_path):
    code = tmp_path / "code"
    (code).mkdir()
    (code / "user_nets.py").write_text(USER_NET)
    configs = tmp_path / "my_configs"
    (configs / "model").mkdir(parents=True)
    (configs / "model" / "my_net.yaml").write_text(USER_MODEL_CONFIG)
    result = run_kiln(
        [
            "train",
            "--config-dir",
            str(configs),
            "model=my_net",
            f"paths.output_dir={tmp_path / 'runs'}",
            *[setting for setting in TINY_DIGITS if not setting.startswith("model")],
        ],
        tmp_path,
        env={"PYTHONPATH": str(code)},
    )
    assert_ok(result)
    (run_dir,) = (tmp_path / "runs" / "train").iterdir()
    record = read_run(run_dir)
    assert record["status"] == "completed"
    import torch

    weights = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in weights["state_dict"].items()}
    assert shapes["net.1.weight"] == (6, 64) and shapes["net.3.weight"] == (10, 6)


@pytest.mark.slow
def test_an_installed_wheel_ships_its_configs_and_trains(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert_ok(build)
    (wheel,) = wheels.glob("kiln-*.whl")
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert_ok(install)
    assert (site / "kiln" / "conf" / "train.yaml").is_file()

    work = tmp_path / "elsewhere"  # not the checkout: nothing can come from its conf/
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("HYDRA_FULL_ERROR", None)
    where = subprocess.run(
        [sys.executable, "-c", "import kiln; print(kiln.__file__)"],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
    )
    assert_ok(where)
    assert where.stdout.strip().startswith(str(site))
    trained = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln",
            "train",
            f"paths.output_dir={work / 'runs'}",
            *TINY_DIGITS,
            "trainer.max_epochs=1",
        ],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
    )
    assert_ok(trained)
    (run_dir,) = (work / "runs" / "train").iterdir()
    assert read_run(run_dir)["status"] == "completed"
    assert str(site / "kiln" / "conf") in (run_dir / ".hydra" / "hydra.yaml").read_text()


def test_no_compression_settings_are_valid(tmp_path):
    assert_ok(run_kiln(["train", "--cfg", "job", *NO_COMPRESSION], tmp_path))


@pytest.mark.slow
def test_a_bad_value_is_reported_under_the_key_the_user_wrote(tmp_path):
    # digits_cnn's scheduler copies trainer.max_epochs (T_max: ${trainer.max_epochs}): the error must
    # still name trainer.max_epochs, not the copy.
    result = run_kiln(["train", "experiment=digits_cnn", "trainer.max_epochs=abc"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "kiln train: error: trainer.max_epochs='abc': expected an integer or null (Trainer's 'max_epochs'); "
        "fix the value, e.g. trainer.max_epochs=10"
    ]


SWALLOWING_STAGE = """
import os, signal, sys


def main():
    try:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, while a library's code runs ...
    except BaseException as exc:  # ... which takes it for an error of its own
        print(f"kiln swallow: error: {type(exc).__name__}", file=sys.stderr)
        return 2
    return 0
"""


def test_a_signal_a_library_swallowed_still_exits_as_a_signal(tmp_path, monkeypatch, capsys):
    from kiln import cli

    (tmp_path / "swallowing_stage.py").write_text(SWALLOWING_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.STAGES, "swallow", ("swallowing_stage", "a stage whose library swallows Ctrl-C"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the stage's own, while it runs
    main_module = sys.modules["__main__"]
    monkeypatch.setattr(main_module, "__spec__", getattr(main_module, "__spec__", None), raising=False)
    assert cli.main(["swallow", "x=1"]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "kiln swallow: error: Interrupted",
        "kiln swallow: interrupted by SIGINT (what it said above is the signal's doing); "
        "run it again: kiln swallow x=1",
    ]
