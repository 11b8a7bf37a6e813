"""Trackers as observers (kiln.tracking): a new tracker is one file and one config, several run at
once (`logger=[tensorboard,<yours>]`), and each is called start -> metrics -> artifacts -> finish
with the run's values. Trained in this process on tiny digits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kilntest import TINY_DIGITS, read_run

# A user's tracker, written the way the README's "Add a tracker" tells: one module...
TRACKER_MODULE = """
import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class JsonLinesTracker:
    def __init__(self, path: str, run_dir: str, note: str = "") -> None:
        self.path = Path(path)
        self.run_dir = run_dir
        self.note = note

    def write(self, **line):
        with self.path.open("a") as out:
            out.write(json.dumps(line) + "\\n")

    def start(self, run):
        self.write(call="start", directory=str(run.directory), run_dir=self.run_dir, note=self.note,
                   seed=run.params["seed"], stage=run.record["stage"])
        run.update_record(jsonl={"lines": str(self.path)})

    def log_metrics(self, metrics, step):
        self.write(call="log_metrics", metrics=dict(metrics), step=step)

    def log_artifacts(self, paths):
        self.write(call="log_artifacts", paths=[str(p) for p in paths])

    def finish(self, status):
        self.write(call="finish", status=status)


class LosesItsServer:
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def start(self, run):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifacts(self, paths):
        raise ConnectionError("the server went away\\nsecond line")

    def finish(self, status):
        pass


class NotATracker:
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir


class FailInSecondEpoch(Callback):
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 1:
            raise RuntimeError("the second epoch failed")
"""
# ...and one config in a --config-dir's logger/ group.
TRACKER_CONFIG = """
trackers:
  jsonl:
    _target_: kiln_jsonl_tracker.JsonLinesTracker
    path: ${hydra:runtime.output_dir}/tracked.jsonl
note: from the logger config
"""


@pytest.fixture
def jsonl_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tracker's module on the import path and its config dir: the config dir."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "kiln_jsonl_tracker.py").write_text(TRACKER_MODULE)
    monkeypatch.syspath_prepend(str(code))
    config_dir = tmp_path / "conf"
    (config_dir / "logger").mkdir(parents=True)
    (config_dir / "logger" / "jsonl.yaml").write_text(TRACKER_CONFIG)
    (config_dir / "logger" / "remote.yaml").write_text(
        "trackers:\n  remote:\n    _target_: kiln_jsonl_tracker.LosesItsServer\n"
    )
    return config_dir


def train(tmp_path: Path, config_dir: Path | None, *overrides: str) -> Path:
    from hydra.core.hydra_config import HydraConfig

    from kiln.config import compose
    from kiln.stages import train as train_stage

    cfg = compose(
        "train",
        [*TINY_DIGITS, f"paths.output_dir={tmp_path / 'runs'}", *overrides],
        extra_config_dir=str(config_dir) if config_dir else None,
    )
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    train_stage.main.call(cfg)  # type: ignore[attr-defined]
    return run_dir


def calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_tracker_added_by_config_alone_sees_start_metrics_artifacts_and_finish(
    tmp_path: Path, jsonl_tracker: Path
) -> None:
    run_dir = train(tmp_path, jsonl_tracker, "logger=[tensorboard,jsonl]", "seed=7")

    lines = calls(run_dir / "tracked.jsonl")
    record = read_run(run_dir)
    assert [line["call"] for line in lines[:1] + lines[-2:]] == ["start", "log_artifacts", "finish"]
    start = lines[0]
    assert start["directory"] == start["run_dir"] == str(run_dir)
    assert (start["seed"], start["stage"], start["note"]) == ("7", "train", "from the logger config")
    assert record["jsonl"] == {"lines": str(run_dir / "tracked.jsonl")}  # start could name its run

    metrics = [line for line in lines if line["call"] == "log_metrics"]
    epochs = [m["metrics"] for m in metrics if "val/loss" in m["metrics"]]
    assert [m["epoch"] for m in epochs] == [0.0, 1.0]  # both epochs of trainer.max_epochs=2
    tested = [m["metrics"] for m in metrics if any(key.startswith("test/") for key in m["metrics"])]
    assert len(tested) == 1
    for name, value in record["test_metrics"].items():
        assert tested[0][name] == pytest.approx(value)  # what run.json records is what it was handed

    assert lines[-2]["paths"] == [str(run_dir / "run.json")]  # export is off: the record alone
    assert lines[-1]["status"] == "completed" == record["status"]
    # TensorBoard beside it, as with logger=tensorboard alone
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_a_run_that_fails_while_training_finishes_its_trackers_as_failed(
    tmp_path: Path, jsonl_tracker: Path
) -> None:
    failing = "+callbacks.fail._target_=kiln_jsonl_tracker.FailInSecondEpoch"
    with pytest.raises(RuntimeError, match="the second epoch failed"):
        train(tmp_path, jsonl_tracker, "logger=jsonl", failing)
    (run_dir,) = [path.parent for path in (tmp_path / "runs").rglob("tracked.jsonl")]
    lines = calls(run_dir / "tracked.jsonl")
    assert [line["call"] for line in lines if line["call"] != "log_metrics"] == [
        "start",
        "log_artifacts",
        "finish",
    ]
    assert [line["metrics"]["epoch"] for line in lines if "val/loss" in line.get("metrics", {})] == [0.0]
    assert lines[-1]["status"] == "failed" == read_run(run_dir)["status"]
    assert not (run_dir / "tensorboard").exists()  # logger=jsonl alone: no TensorBoard


def test_a_tracker_failing_after_a_completed_run_is_one_line_and_the_others_still_finish(
    tmp_path: Path, jsonl_tracker: Path
) -> None:
    from kiln.errors import KilnError

    with pytest.raises(KilnError) as raised:
        train(tmp_path, jsonl_tracker, "logger=[remote,jsonl]")  # the failing one first
    (run_dir,) = [path.parent for path in (tmp_path / "runs").rglob("tracked.jsonl")]
    assert str(raised.value) == (
        "logger.trackers.remote: could not finish its run (ConnectionError: the server went away); "
        f"the run itself is complete in {run_dir}"
    )
    lines = calls(run_dir / "tracked.jsonl")
    assert lines[-1] == {"call": "finish", "status": "completed"}  # the tracker beside it finished
    assert read_run(run_dir)["status"] == "completed"
    assert not (run_dir / "tensorboard").exists()  # logger=jsonl alone: no TensorBoard, and no error


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ([], ["tensorboard"]),
        (["logger=mlflow"], ["tensorboard", "mlflow"]),
        (["logger=[tensorboard,mlflow]"], ["tensorboard", "mlflow"]),
        (["logger=[mlflow,tensorboard]"], ["tensorboard", "mlflow"]),
    ],
)
def test_logger_choices_compose_to_their_trackers(
    tmp_path: Path, choice: list[str], expected: list[str]
) -> None:
    """`logger=mlflow` keeps TensorBoard beside it; a list names several; settings stay flat
    (`logger.tracking_uri`, as documented). Built, TensorBoard's Lightning logger comes first."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    from kiln import tracking
    from kiln.config import compose

    uri = [f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if choice else []
    cfg = compose("train", [*choice, f"paths.output_dir={tmp_path}", *uri])
    built = tracking.build_trackers(cfg, tmp_path / "run", {})
    assert [name for name, _ in built.trackers] == expected
    assert isinstance(built.loggers, list)
    assert isinstance(built.loggers[0], TensorBoardLogger)
    assert sum(isinstance(logger, MLFlowLogger) for logger in built.loggers) == ("mlflow" in expected)


def test_a_tracker_that_is_not_one_is_named_in_one_line(tmp_path: Path, jsonl_tracker: Path) -> None:
    from kiln import tracking
    from kiln.config import compose
    from kiln.errors import KilnError

    cfg = compose(
        "train",
        [f"paths.output_dir={tmp_path}", "+logger.trackers.odd._target_=kiln_jsonl_tracker.NotATracker"],
        extra_config_dir=str(jsonl_tracker),
    )
    with pytest.raises(
        KilnError, match=r"^logger\.trackers\.odd\._target_=kiln_jsonl_tracker\.NotATracker: not a"
    ):
        tracking.build_trackers(cfg, tmp_path / "run", {})
