"""kiln.api: stages from Python, and run directories read back as data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kiln import api
from kiln.errors import KilnError
from kilntest import NO_COMPRESSION, QUICK, TINY_DIGITS, read_run

# -- reading run directories (fast) -----------------------------------------------------------


def fake_run(directory: Path, record: dict[str, object] | None = None) -> Path:
    """The two files that make a directory a run, as kiln train writes them."""
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "config.yaml").write_text(
        "seed: 42\ntrainer:\n  max_epochs: 3\nmonitor:\n  metric: val/loss\n"
        "callbacks:\n  ckpt:\n    dirpath: ${hydra:runtime.output_dir}/checkpoints\n    monitor: ${monitor.metric}\n"
    )
    (directory / "run.json").write_text(json.dumps(record or {"status": "running", "test_metrics": None}))
    return directory


def test_load_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(
        KilnError, match=r"not a kiln run directory \(run.json and .hydra/config.yaml missing\)"
    ):
        api.load(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(KilnError, match=r"\(.hydra/config.yaml missing\)"):
        api.load(tmp_path)
    with pytest.raises(KilnError, match="no such directory"):
        api.load(tmp_path / "nowhere")


def test_load_refuses_a_damaged_record(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    (run / "run.json").write_text('{"status": "comp')
    with pytest.raises(KilnError, match=r"run.json: unreadable"):
        api.load(run)


def test_load_of_an_unfinished_run(tmp_path: Path) -> None:
    run = api.load(fake_run(tmp_path / "run"))
    assert run.status == "running"
    assert run.test_metrics == {}
    assert run.best_checkpoint is None and run.model_path is None and run.report is None
    # Resolved outside Hydra: ${hydra:runtime.output_dir} is the run directory.
    assert run.config.callbacks.ckpt.dirpath == f"{tmp_path / 'run'}/checkpoints"
    assert run.config.callbacks.ckpt.monitor == "val/loss"


def test_load_finds_the_best_checkpoint_of_a_moved_run(tmp_path: Path) -> None:
    record = {"status": "completed", "best_checkpoint": {"path": "/gone/checkpoints/best.ckpt"}}
    run = fake_run(tmp_path / "run", record)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.ckpt").write_bytes(b"")
    assert api.load(run).best_checkpoint == run / "checkpoints" / "best.ckpt"


def test_the_error_is_the_stages_own_line() -> None:
    stderr = ["epoch 1/2  train/loss=1.0\n", "kiln train: error: data.path=x.csv: no such file\n", "\n"]
    assert api.error_line("train", stderr, 2) == "kiln train: error: data.path=x.csv: no such file"
    assert api.error_line("train", ["Traceback ...\n", "RuntimeError: boom\n"], 1) == (
        "kiln train failed (exit code 1): RuntimeError: boom"
    )


def test_sweeps_are_refused() -> None:
    with pytest.raises(KilnError, match="multirun"):
        api.train(["-m", "seed=1,2"])


def test_a_bad_override_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # Hydra composes before anything trains: about a second
    with pytest.raises(api.StageError) as raised:
        api.train(["trainer.max_epocs=5"], echo=False)
    message = str(raised.value)
    assert message.startswith("kiln train: error: trainer.max_epocs: no such config key")
    assert "\n" not in message and "Traceback" not in message
    assert raised.value.returncode == 2


def test_a_single_override_string_is_one_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`api.train("trainer.max_epochs=0")` reaches the stage as that one override (it was split into
    characters: "Error parsing override 't'"); the stage's own line about the value comes back."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(api.StageError) as raised:
        api.train("trainer.max_epochs=0", echo=False)
    assert str(raised.value).startswith("kiln train: error: trainer.max_epochs=0: nothing would be trained")
    assert raised.value.returncode == 2


def test_several_overrides_in_one_string_are_refused_before_any_stage_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(KilnError) as raised:
        api.train(f"data=digits paths.output_dir={runs}", echo=False)
    assert str(raised.value) == (
        f"overrides='data=digits paths.output_dir={runs}': give several overrides as a list, "
        f"e.g. ['data=digits', 'paths.output_dir={runs}']"
    )
    assert not isinstance(raised.value, api.StageError)  # refused here: no child process ran
    assert not runs.exists()
    with pytest.raises(
        KilnError, match=r"^overrides: 3 is not a string; each override is a 'key=value' string$"
    ):
        api.export(tmp_path, ["compress=none", 3])  # type: ignore[list-item]


# -- training through the API (slow) ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> api.RunResult:
    runs = tmp_path_factory.mktemp("api") / "runs"
    return api.train([*TINY_DIGITS, f"paths.output_dir={runs}"], echo=False)


@pytest.mark.slow
def test_train_returns_the_run(tiny_run: api.RunResult) -> None:
    run = tiny_run
    assert run.directory.parent.name == "train" and run.directory.parent.parent.name == "runs"
    record = read_run(run.directory)
    assert run.status == "completed"
    assert run.record == record
    assert run.test_metrics == record["test_metrics"]
    assert set(run.test_metrics) >= {"test/acc", "test/loss"}
    assert run.best_checkpoint == run.directory / "checkpoints" / "best.ckpt"
    assert run.best_checkpoint.is_file()
    assert run.model_path is None and run.report is None  # export.after_training=false
    assert run.config.trainer.max_epochs == 2
    assert run.config.model.net.hidden_sizes == [32]
    assert run.config.callbacks.model_checkpoint.dirpath == str(run.directory / "checkpoints")


@pytest.mark.slow
def test_load_reads_the_same_run(tiny_run: api.RunResult) -> None:
    assert api.load(tiny_run.directory) == tiny_run
    assert api.load(str(tiny_run.directory)).test_metrics == tiny_run.test_metrics


@pytest.mark.slow
def test_export_ships_a_model(tiny_run: api.RunResult, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_run.directory, tmp_path / "run"))
    exported = api.export(copy, QUICK, echo=False)
    assert exported.model_path == copy / "model.onnx" and exported.model_path.is_file()
    assert exported.report is not None and exported.report["shipped"] == "fp32"
    assert exported.test_metrics == tiny_run.test_metrics


@pytest.mark.slow
def test_a_failing_stage_raises_its_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(api.StageError) as raised:
        api.train([*TINY_DIGITS, "trainer.max_epochs=abc"], echo=False)
    message = str(raised.value)
    assert message.startswith("kiln train: error: ")
    assert "'abc'" in message and "expected an integer" in message
    assert "\n" not in message
    assert raised.value.returncode == 2


@pytest.mark.slow
def test_load_module_gives_back_the_trained_module(tiny_run: api.RunResult) -> None:
    import torch

    from kiln.data import DigitsDataModule
    from kiln.models import KilnModule

    module = api.load_module(tiny_run.directory)
    assert isinstance(module, KilnModule) and not module.training
    data = DigitsDataModule(seed=42)  # the run's data: data=digits with the default seed
    data.setup("fit")
    features, targets = data.split_tensors("test")
    with torch.no_grad():
        accuracy = (module(features).argmax(dim=1) == targets).float().mean().item()
    assert accuracy == pytest.approx(tiny_run.test_metrics["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_a_failed_gate_after_training_returns_the_completed_run(tmp_path: Path) -> None:
    """The training completed; the compression gate then failed. The result says both."""
    settings = [arg for arg in TINY_DIGITS if arg not in NO_COMPRESSION]
    run = api.train(
        [
            *settings,
            "compress=prune_structured",
            "compress.prune_structured.ratio=0.8",
            "compress.prune_structured.finetune_epochs=0",
            "compress.max_metric_drop=0",
            *QUICK,
            f"paths.output_dir={tmp_path / 'runs'}",
        ],
        echo=False,
    )
    assert run.status == "completed" and run.best_checkpoint is not None
    assert run.delivery is not None and run.delivery["status"] == "failed"
    assert "over compress.max_metric_drop=0" in run.delivery["reason"]
    assert run.model_path is None and run.report is not None and run.report["shipped"] is None


# -- a stage in this process -------------------------------------------------------------------


@pytest.mark.slow
def test_a_stage_in_this_process_trains_the_same_configured_run(
    tiny_run: api.RunResult, tmp_path: Path
) -> None:
    """in_process=True composes the config as the CLI does and runs the stage here: the run it
    leaves is the child's run (same resolved settings, same record fields), without a child."""
    run = api.train([*TINY_DIGITS, f"paths.output_dir={tmp_path / 'runs'}"], echo=False, in_process=True)
    assert run.status == "completed" and run.best_checkpoint.is_file()
    assert set(run.test_metrics) == set(tiny_run.test_metrics)
    ours = OmegaConf.to_container(run.config)
    theirs = OmegaConf.to_container(tiny_run.config)
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    for key in ("run_dir", "paths", "callbacks", "logger"):  # these name each run's own directory
        ours.pop(key), theirs.pop(key)
    assert ours == theirs
    exported = api.export(run.directory, QUICK, echo=False, in_process=True)
    assert exported.model_path == run.directory / "model.onnx" and exported.model_path.is_file()


def test_a_user_error_in_this_process_is_the_clis_one_line(tmp_path: Path) -> None:
    with pytest.raises(api.StageError) as raised:
        api.train(
            [*TINY_DIGITS, "trainer.max_epochs=abc", f"paths.output_dir={tmp_path}"],
            echo=False,
            in_process=True,
        )
    assert str(raised.value).startswith("kiln train: error: ")
    assert "'abc'" in str(raised.value) and "\n" not in str(raised.value)
    assert raised.value.returncode == 2
