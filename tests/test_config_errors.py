"""Config mistakes caught before anything is built, and the model that follows the data.

Most tests run the stage in this process (`kiln.config.compose` + `main.call`), where a user's
mistake raises KilnError with the one line the CLI prints; a few drive the real CLI where the exit
code and the single stderr line are the point (the run directory is made by Hydra, before the stage).
"""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln.config import check_config, compose
from kiln.errors import KilnError, describe_user_error
from kilntest import kiln_cli

ERROR_PREFIX = "kiln train: error: "
# Quick in-process runs: a mistake is caught before training; none of these runs reaches the fit.
QUICK = ["debug=fast", "progress=lines", "logger.log_graph=false", "export.after_training=false"]


# A table with the MLP chosen explicitly: tests of other mistakes do not depend on the default model.
TABLE = ["data=table", "model=mlp"]


def composed(tmp_path: Path, *overrides: str) -> Any:
    return compose("train", [f"paths.output_dir={tmp_path / 'runs'}", *overrides])


def train_call(tmp_path: Path, *overrides: str) -> Any:
    from kiln.stages.train import main

    return main.call(composed(tmp_path, *overrides))  # type: ignore[attr-defined]


def nothing_ran(tmp_path: Path) -> bool:
    """No run record: the mistake was caught before the run started (no data loaded, nothing built)."""
    return not list((tmp_path / "runs").rglob("run.json"))


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    report = f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert result.returncode == 2, report
    assert "Traceback" not in result.stderr, report
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), report
    return lines[0].removeprefix(ERROR_PREFIX)


# -- 1. the model follows the data, unless the user chose one -------------------------------------


def net_of(cfg: Any) -> str:
    return str(cfg.model.net._target_).rsplit(".", 1)[-1]


@pytest.mark.parametrize(
    ("overrides", "net"),
    [
        (["data=table", "data.name=wine"], "mlp"),  # a table: rows of features
        (["data=table", "data.path=cars.csv", "data.target=Miles_per_Gallon"], "mlp"),
        (["data=synthetic"], "mlp"),  # flat feature vectors
        (["data=digits"], "cnn"),  # images
        (["data=digit_images"], "cnn"),
        ([], "cnn"),  # train.yaml's default data (digits)
    ],
)
@pytest.mark.slow
def test_the_default_model_follows_the_data(tmp_path: Path, overrides: list[str], net: str):
    assert net_of(composed(tmp_path, *overrides)) == net


@pytest.mark.slow
def test_a_model_chosen_on_the_command_line_wins_over_the_datas_default(tmp_path: Path):
    assert net_of(composed(tmp_path, "data=table", "model=cnn")) == "cnn"
    assert net_of(composed(tmp_path, "model=cnn", "data=table")) == "cnn"  # in either order
    assert net_of(composed(tmp_path, "data=digits", "model=mlp")) == "mlp"


@pytest.mark.parametrize(
    ("experiment", "net"),
    [
        ("penguins_mlp", "mlp"),
        ("diabetes_mlp", "mlp"),
        ("digits_cnn", "cnn"),
        ("images_resnet", "backbone"),
    ],
)
@pytest.mark.slow
def test_experiments_keep_their_model(tmp_path: Path, experiment: str, net: str):
    assert net_of(composed(tmp_path, f"experiment={experiment}")) == net


def test_an_experiments_model_wins_over_the_default_of_data_chosen_on_the_command_line(tmp_path: Path):
    # the experiment chose the model (a cnn); data=table only changes the data
    assert net_of(composed(tmp_path, "experiment=digits_cnn", "data=table")) == "cnn"


def test_mlp_settings_on_a_table_need_no_model_override(tmp_path: Path):
    cfg = composed(
        tmp_path, "data=table", "data.name=wine", "model.net.hidden_sizes=[128,64]", "data.scaling=minmax"
    )
    assert net_of(cfg) == "mlp" and list(cfg.model.net.hidden_sizes) == [128, 64]
    check_config(cfg)


def test_a_cnn_chosen_for_a_table_says_to_use_the_mlp(tmp_path: Path):
    with pytest.raises(KilnError) as caught:
        train_call(tmp_path, "data=table", "data.name=wine", "model=cnn", *QUICK)
    message = str(caught.value)
    assert message.startswith("model.net.input_shape: a CNN needs images"), message
    assert "flat feature vectors of 13 values" in message and "use model=mlp" in message


# -- 2. trainer.max_epochs ----------------------------------------------------------------------


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_max_epochs_below_one_names_the_key_and_what_is_allowed(tmp_path: Path, epochs: str):
    with pytest.raises(KilnError) as caught:
        train_call(tmp_path, *TABLE, "data.name=iris", f"trainer.max_epochs={epochs}", *QUICK)
    message = str(caught.value)
    assert message.startswith(f"trainer.max_epochs={epochs}: "), message
    assert "an integer >= 1, or -1 for no limit" in message and "e.g. trainer.max_epochs=20" in message
    assert "checkpoint" not in message and "MisconfigurationException" not in message
    assert nothing_ran(tmp_path)


def test_max_epochs_minus_one_needs_something_that_ends_the_run(tmp_path: Path):
    # debug=fast turns early stopping off: -1 would train forever
    with pytest.raises(
        KilnError, match=r"^trainer\.max_epochs=-1: no epoch limit, and nothing else would end"
    ):
        train_call(tmp_path, *TABLE, "trainer.max_epochs=-1", *QUICK)
    assert nothing_ran(tmp_path)
    # with early stopping on (the default), or a step limit, -1 is Lightning's "no epoch limit"
    check_config(composed(tmp_path, *TABLE, "trainer.max_epochs=-1"))
    check_config(composed(tmp_path, *TABLE, *QUICK, "trainer.max_epochs=-1", "+trainer.max_steps=50"))


def test_max_epochs_minus_one_is_refused_where_a_schedule_copies_it(tmp_path: Path):
    # the CNN's cosine schedule has T_max: ${trainer.max_epochs}; -1 would make it oscillate
    with pytest.raises(KilnError) as caught:
        check_config(composed(tmp_path, "data=digits", "model=cnn", "trainer.max_epochs=-1"))
    message = str(caught.value)
    assert message.startswith("trainer.max_epochs=-1: model.scheduler.T_max copies it"), message
    assert "model.scheduler.T_max=20" in message


# -- 3. seed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [["seed=abc"], ["data.seed=10", "seed=abc"]])
def test_a_bad_seed_names_the_top_level_key(tmp_path: Path, overrides: list[str]):
    with pytest.raises(KilnError) as caught:
        train_call(tmp_path, *TABLE, *overrides, *QUICK)
    message = str(caught.value)
    assert message.startswith("seed='abc': needs an integer"), message
    assert "e.g. seed=42" in message and "data.seed" not in message
    assert nothing_ran(tmp_path)


def test_a_seed_outside_what_numpy_accepts_is_refused(tmp_path: Path):
    with pytest.raises(KilnError, match=r"^seed=-1: needs an integer from 0 to 4294967295"):
        check_config(composed(tmp_path, *TABLE, "seed=-1"))


def test_a_bad_value_copied_by_interpolation_is_named_where_it_was_written(tmp_path: Path):
    with pytest.raises(KilnError) as caught:
        check_config(composed(tmp_path, *TABLE, "+rows=many", "data.batch_size=${rows}"))
    message = str(caught.value)
    assert message.startswith("rows='many': expected an integer (data.batch_size=${rows} is "), message
    assert "e.g. rows=10" in message


# -- 4. a GPU trainer without a GPU ---------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize(
    ("overrides", "named", "cpu_option"),
    [
        (["trainer=gpu"], "trainer.accelerator=gpu (trainer=gpu)", "trainer=cpu"),
        (["trainer=ddp"], "trainer.accelerator=gpu (trainer=ddp)", "trainer=ddp_cpu"),
        (["trainer.accelerator=cuda"], "trainer.accelerator=cuda:", "trainer=cpu"),
    ],
)
def test_a_gpu_trainer_without_a_gpu_names_the_key_and_the_fix(
    tmp_path: Path, overrides: list[str], named: str, cpu_option: str
):
    with pytest.raises(KilnError) as caught:
        train_call(tmp_path, *TABLE, *overrides, *QUICK)
    message = str(caught.value)
    assert message.startswith(named), message
    assert "no GPU is available here" in message
    assert f"train on the CPU with {cpu_option}" in message and "trainer.accelerator=auto" in message
    assert nothing_ran(tmp_path)


def test_more_gpus_than_the_machine_has_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    with pytest.raises(
        KilnError, match=r"^trainer\.devices=4: this machine has 1 GPU; set trainer\.devices=1"
    ):
        check_config(composed(tmp_path, *TABLE, "trainer=ddp", "trainer.devices=4"))
    check_config(composed(tmp_path, *TABLE, "trainer=gpu"))  # one GPU for trainer=gpu: fine


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_trainer_gpu_on_a_cpu_machine_is_one_line_and_exit_2(tmp_path: Path):
    result = kiln_cli("train", f"paths.output_dir={tmp_path / 'runs'}", *TABLE, "trainer=gpu", cwd=tmp_path)
    line = one_error_line(result)
    assert line.startswith("trainer.accelerator=gpu (trainer=gpu): no GPU is available here"), line
    assert "trainer=cpu" in line and "trainer.accelerator=auto" in line
    assert "No supported gpu backend" not in result.stderr


# -- 5. a checkpoint that would run code when unpickled ----------------------------------------------


class MakesADirectory:
    """Unpickling this calls os.mkdir(path): harmless, and visible if it ever ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def malicious_checkpoint(directory: Path, bare_pickle: bool) -> tuple[Path, Path]:
    marker = directory / "it-ran"
    path = directory / "evil.ckpt"
    contents = {"state_dict": {}, "epoch": 0, "payload": MakesADirectory(marker)}
    if bare_pickle:
        path.write_bytes(pickle.dumps(contents, protocol=4))
    else:
        torch.save(contents, path)
    return path, marker


@pytest.mark.parametrize("bare_pickle", [False, True], ids=["torch_zip", "bare_pickle"])
def test_a_checkpoint_holding_objects_is_refused_without_torchs_advice(tmp_path: Path, bare_pickle: bool):
    from kiln.training.checkpoints import load_checkpoint

    path, marker = malicious_checkpoint(tmp_path, bare_pickle)
    with pytest.raises(KilnError) as caught:
        load_checkpoint(path, key="resume")
    message = str(caught.value)
    assert message.startswith(f"resume={path}: checkpoint holds objects kiln will not unpickle ("), message
    assert "mkdir" in message  # what it would have called
    assert "could run arbitrary code" in message and "use a checkpoint saved by Lightning or kiln" in message
    assert "weights_only" not in message and "\n" not in message
    assert caught.value.__cause__ is None  # torch's advice does not ride along in the traceback either
    assert not marker.exists()


def test_resuming_from_a_checkpoint_holding_objects_stops_before_training(tmp_path: Path):
    path, marker = malicious_checkpoint(tmp_path, bare_pickle=False)
    with pytest.raises(KilnError) as caught:
        train_call(tmp_path, *TABLE, "data.name=iris", f"resume={path}", *QUICK)
    message = str(caught.value)
    assert message.startswith(f"resume={path}: checkpoint holds objects kiln will not unpickle"), message
    assert "weights_only" not in message
    assert not marker.exists()


def test_a_damaged_checkpoint_is_still_called_damaged(tmp_path: Path):
    from kiln.training.checkpoints import load_checkpoint

    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"\x80\x04" + os.urandom(3000))
    with pytest.raises(KilnError, match="cannot be read"):
        load_checkpoint(path)


# -- 6. an output directory that cannot be made ----------------------------------------------------


def under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a directory\n")
    return tmp_path / "a-file" / "runs"


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory this user cannot create directories in (permissions do not bind root, so root
    gets sysfs, where nobody can make a directory), or skip."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        return locked / "runs"
    probe = Path("/sys/kiln-probe")
    try:
        probe.mkdir()
    except PermissionError:
        return Path("/sys/kiln-runs")
    except OSError:
        pass
    else:
        probe.rmdir()
    pytest.skip("no directory here refuses a new directory to this user")


def test_compose_names_an_output_dir_under_a_file(tmp_path: Path):
    output_dir = under_a_file(tmp_path)
    with pytest.raises(KilnError) as caught:
        compose("train", [f"paths.output_dir={output_dir}"])
    message = str(caught.value)
    assert message.startswith(
        f"paths.output_dir={output_dir}: cannot create the run directory {output_dir}/train/"
    )
    assert f"{tmp_path / 'a-file'} is a file, not a directory" in message
    assert "set paths.output_dir to a directory you can write to" in message


@pytest.mark.slow
def test_an_output_dir_under_a_file_is_one_line_and_exit_2(tmp_path: Path):
    output_dir = under_a_file(tmp_path)
    result = kiln_cli("train", *TABLE, f"paths.output_dir={output_dir}", cwd=tmp_path)
    line = one_error_line(result)
    assert line.startswith(
        f"paths.output_dir={output_dir}: cannot create the run directory {output_dir}/train/"
    )
    assert f"{tmp_path / 'a-file'} is a file, not a directory" in line
    assert "paths.output_dir=$HOME/kiln-runs" in line


@pytest.mark.slow
def test_an_unwritable_output_dir_is_one_line_and_exit_2(tmp_path: Path):
    output_dir = unwritable_directory(tmp_path)
    result = kiln_cli("train", *TABLE, f"paths.output_dir={output_dir}", cwd=tmp_path)
    line = one_error_line(result)
    assert line.startswith(
        f"paths.output_dir={output_dir}: cannot create the run directory {output_dir}/train/"
    )
    assert "permission denied" in line and "set paths.output_dir to a directory you can write to" in line


@pytest.mark.slow
def test_a_run_dir_that_is_a_file_names_run_dir(tmp_path: Path):
    (tmp_path / "not-a-run").write_text("x\n")
    result = kiln_cli("train", *TABLE, f"run_dir={tmp_path / 'not-a-run'}", "resume=auto", cwd=tmp_path)
    line = one_error_line(result)
    assert line.startswith(f"run_dir={tmp_path / 'not-a-run'}: cannot create the run directory"), line


def test_other_os_errors_keep_their_traceback(tmp_path: Path):
    # an OSError from kiln's own code (or a library's) is a bug or the stage's to report, not Hydra's set-up
    output_dir = under_a_file(tmp_path)
    with pytest.raises(OSError) as caught:
        output_dir.mkdir(parents=True)
    assert describe_user_error(caught.value) is None
