"""Recovery continues the SAME run: the command kiln prints after Ctrl-C or `kill` composes the
run's saved overrides (and keeps its saved config where the line sets nothing), a resume with
nothing left to do or with changed data is refused with nothing changed on disk, and a refused
resume into a new run_dir leaves no half-made run behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from kiln import runs
from kiln.config import compose
from kiln.errors import KilnError
from kiln.stages.train import main as train
from kilntest import (
    HOLD_ENV,
    NO_COMPRESSION,
    ONE_THREAD,
    WAIT_TIMEOUT,
    Output,
    kiln_command,
    read_run,
    wait_for,
)


class HoldUntilSignalled(L.Callback):
    """For the signal test's child `kiln train`: after training step `step` of epoch `epoch`, touch
    `marker` and wait until kiln's signal handler has noted the test's SIGTERM, so that the
    signal lands exactly there however fast the machine is. Harmless once resumed: that step
    lies before the saved position."""

    def __init__(self, marker: str, epoch: int, step: int = 0) -> None:
        self.marker, self.epoch, self.step = Path(marker), epoch, step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if (trainer.current_epoch, args[-1]) != (self.epoch, self.step):
            return
        stopper = next(c for c in trainer.callbacks if hasattr(c, "received"))  # kiln's StopOnSignal
        self.marker.touch()
        deadline = time.monotonic() + WAIT_TIMEOUT
        while stopper.received is None and time.monotonic() < deadline:
            threading.Event().wait(0.05)  # the signal's handler runs in this thread, between waits


def hold_until_signalled(marker: Path, epoch: int) -> str:
    return f"+callbacks.hold={{_target_:test_recovery.HoldUntilSignalled,marker:'{marker}',epoch:{epoch}}}"


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with a digest of its bytes (the lock file by its name only:
    it names whichever process held it last)."""
    return {
        str(path.relative_to(directory)): "lock"
        if path.name == runs.LOCK_FILE
        else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def saved_config(run_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    return config


def saved_overrides(run_dir: Path) -> list[str]:
    overrides: list[str] = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    return overrides


def epochs_in(checkpoint: Path) -> int:
    """The whole epochs a checkpoint has trained (Lightning's fit loop counts them)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    processed: int = state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    return processed


def optimizer_settings(checkpoint: Path) -> dict[str, Any]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    group: dict[str, Any] = state["optimizer_states"][0]["param_groups"][0]
    return group


# -- the printed recovery line, as a user runs it ------------------------------------------------


@pytest.mark.slow
def test_the_printed_recovery_line_continues_the_run_with_its_own_settings(tmp_path: Path):
    run_dir, held = tmp_path / "run", tmp_path / "held"
    original = [
        "data=digits",
        "model=mlp",  # not the default net (cnn): today's defaults would not fit its checkpoint
        "model.net.hidden_sizes=[16]",
        "model.optimizer.lr=0.02",
        "trainer.max_epochs=3",
        "callbacks.early_stopping=null",
        "progress=lines",
        *NO_COMPRESSION,
        f"run_dir={run_dir}",
    ]
    environment = {**os.environ, **HOLD_ENV, **ONE_THREAD}
    environment.pop("HYDRA_FULL_ERROR", None)
    process = subprocess.Popen(
        kiln_command("train", *original, hold_until_signalled(held, epoch=1)),
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = Output(process.stderr)
    try:
        wait_for(held.exists, "the run to hold in its second epoch", process=process, output=stderr)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT_TIMEOUT) == 143, stderr.finish()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    last = stderr.finish().strip().splitlines()[-1]
    printed = re.search(r"continue it with: (kiln train .*)$", last)
    assert printed, last
    assert read_run(run_dir)["status"] == "interrupted"
    overrides_before = saved_overrides(run_dir)

    command = shlex.split(printed.group(1))
    assert command == ["kiln", "train", f"run_dir={run_dir}", "resume=auto"]
    resumed = subprocess.run(
        kiln_command(*command[1:]), cwd=tmp_path, env=environment, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    said = [line for line in resumed.stderr.splitlines() if line.startswith(f"kiln: continuing {run_dir}")]
    assert said == [
        f"kiln: continuing {run_dir} with its saved overrides "
        f"{[o for o in overrides_before if not o.startswith('run_dir=')]}; changed on this line: []"
    ], resumed.stderr

    record = read_run(run_dir)
    assert record["status"] == "completed" and record["attempts"][-1]["status"] == "interrupted"
    assert record["resumed_from"] == str(run_dir / "checkpoints" / "preempted.ckpt")
    config = saved_config(run_dir)
    assert config["model"]["optimizer"]["lr"] == 0.02 and config["trainer"]["max_epochs"] == 3
    assert config["model"]["net"]["_target_"] == "kiln.models.nets.mlp"
    assert config["compress"]["recipe"] == "none" and config["export"]["after_training"] is False
    last_checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert optimizer_settings(last_checkpoint)["lr"] == pytest.approx(0.02)  # trained on at lr 0.02
    assert epochs_in(last_checkpoint) == 3  # not today's 20
    assert not {"compress", "export", "model.onnx", "report.json"} & {p.name for p in run_dir.iterdir()}
    assert "delivery" not in record
    # the saved overrides still hold the originals (and the resume that continued them)
    assert set(original) <= set(saved_overrides(run_dir)) and "resume=auto" in saved_overrides(run_dir)


# -- in-process: a small table run, trained once for the module ---------------------------------


def write_table(path: Path, rows: int = 90) -> None:
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=rows).round(3), rng.normal(size=rows).round(3)
    pd.DataFrame({"x1": x1, "x2": x2, "y": np.where(x1 + x2 > 0, "yes", "no")}).to_csv(path, index=False)


def table_run(directory: Path, *extra: str) -> list[str]:
    csv = directory / "data.csv"
    if not csv.exists():
        write_table(csv)
    return [
        "data=table",
        f"data.path={csv}",
        "data.target=y",
        "model.net.hidden_sizes=[8]",
        "trainer.max_epochs=2",
        "callbacks.early_stopping=null",
        "logger.log_graph=false",
        "progress=lines",
        *NO_COMPRESSION,
        f"run_dir={directory / 'run'}",
        *extra,
    ]


def train_call(overrides: list[str]) -> dict[str, float]:
    metrics: dict[str, float] = train.call(compose("train", overrides))  # type: ignore[attr-defined]
    return metrics


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("recovery")
    train_call(table_run(directory))
    assert read_run(directory / "run")["status"] == "completed"
    return directory / "run"


def refused(overrides: list[str]) -> str:
    with pytest.raises(KilnError) as raised:
        train_call(overrides)
    return str(raised.value)


def test_a_resume_with_nothing_left_to_train_is_refused_and_changes_nothing(completed: Path):
    before = snapshot(completed)
    events = sorted(p.name for p in (completed / "tensorboard").rglob("*"))
    message = refused(table_run(completed.parent, "resume=auto"))  # its own line, same trainer.max_epochs
    assert message == (
        f"trainer.max_epochs=2: {completed / 'checkpoints' / 'last.ckpt'} has trained 2 epochs already, "
        "nothing is left to train; to continue it, give a larger trainer.max_epochs, e.g. trainer.max_epochs=12"
    )
    assert snapshot(completed) == before  # run.json bytes, .hydra/, checkpoints, log: as they were
    assert sorted(p.name for p in (completed / "tensorboard").rglob("*")) == events


def test_a_resume_on_changed_data_is_refused_until_accepted(tmp_path: Path):
    train_call(table_run(tmp_path))
    run_dir = tmp_path / "run"
    fingerprint = read_run(run_dir)["data_fingerprint"]
    frame = pd.read_csv(tmp_path / "data.csv")
    pd.concat([frame, frame.head(4)]).to_csv(tmp_path / "data.csv", index=False)  # 4 rows more
    before = snapshot(run_dir)

    message = refused(table_run(tmp_path, "resume=auto", "trainer.max_epochs=3"))
    changed = re.search(r"data fingerprint (\w+) then, (\w+) now", message)
    assert changed and changed.group(1) == fingerprint and changed.group(2) != fingerprint, message
    assert message.startswith(f"data: data.path={tmp_path / 'data.csv'} has changed since ")
    assert message.endswith(
        "continue on the new data anyway with resume_data_changed=accept, or start a new run"
    )
    assert snapshot(run_dir) == before

    train_call([f"run_dir={run_dir}", "resume=auto", "trainer.max_epochs=3", "resume_data_changed=accept"])
    record = read_run(run_dir)
    assert record["status"] == "completed" and record["data_fingerprint"] == changed.group(2)
    assert epochs_in(run_dir / "checkpoints" / "last.ckpt") == 3


def test_a_refused_resume_into_a_new_run_dir_leaves_no_run_behind(completed: Path, tmp_path: Path):
    checkpoint = completed / "checkpoints" / "last.ckpt"
    new_run = tmp_path / "run"
    other_net = table_run(tmp_path, "model.net.hidden_sizes=[16]")
    message = refused([*other_net, f"resume={checkpoint}"])
    assert message.startswith(f"checkpoint {checkpoint} is from another model")
    assert not new_run.exists()  # no .hydra/, lock, or failed run.json for the retry to trip on

    train_call(other_net)  # the plain retry
    assert read_run(new_run)["status"] == "completed"


def test_a_continued_run_keeps_its_saved_values_where_the_line_sets_none(
    completed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir = tmp_path / "run"
    shutil.copytree(completed, run_dir)
    # As if kiln's default seed had changed since the run was trained (today's: 42): the data
    # splits and the batch order follow it, so a continuation must keep the run's own
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert config.count("\nseed: 42\n") == 1
    (run_dir / ".hydra" / "config.yaml").write_text(config.replace("\nseed: 42\n", "\nseed: 7\n"))
    overrides = run_dir / ".hydra" / "overrides.yaml"  # the copy's own directory
    overrides.write_text(overrides.read_text().replace(str(completed), str(run_dir)))

    train_call([f"run_dir={run_dir}", "resume=auto", "trainer.max_epochs=3"])
    err = capsys.readouterr().err
    carried = [o for o in saved_overrides(completed) if not o.startswith(("run_dir=", "trainer.max_epochs="))]
    assert (
        f"kiln: continuing {run_dir} with its saved overrides {carried}; changed on this line: ['trainer.max_epochs=3']"
        in err
    )
    assert (
        f"kiln: {run_dir}'s saved config differs from today's where this line sets nothing; continuing with "
        "the saved values: seed=7 (today: 42)"
    ) in err
    assert read_run(run_dir)["seed"] == 7 and saved_config(run_dir)["seed"] == 7
    assert saved_config(run_dir)["trainer"]["max_epochs"] == 3


# -- small pieces ------------------------------------------------------------------------------


def test_saved_overrides_are_carried_once_however_often_the_line_is_recomposed(tmp_path: Path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(["model=mlp", "model.optimizer.lr=0.02", "trainer.max_epochs=7", f"run_dir={run_dir}"])
    )
    line = [f"run_dir={run_dir}", "resume=auto", "trainer.max_epochs=9"]
    effective = runs.with_saved_overrides(line)
    assert effective == ["model=mlp", "model.optimizer.lr=0.02", *line]
    # the run then saves its effective overrides; a DDP rank re-launched from the effective
    # command line, or a requeued job, composes the same line again, nothing doubled
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(effective))
    assert runs.with_saved_overrides([*effective, "hydra.job.name=train_ddp_process_1"]) == [
        *effective,
        "hydra.job.name=train_ddp_process_1",
    ]
    assert runs.with_saved_overrides(line, requeued=True) == ["model=mlp", "model.optimizer.lr=0.02", *line]


def test_a_second_kiln_on_a_run_being_written_names_its_writer(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"status": "running", "stage": "train", "config_hash": "x"}))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('kiln (pid 4242 on elsewhere)\\n'); f.flush(); print('held', flush=True); sys.stdin.read()",
            str(run_dir / runs.LOCK_FILE),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(KilnError) as raised:
            runs.claim(run_dir, continuing=False)
    finally:
        holder.communicate("")
    assert str(raised.value) == (
        f"run_dir={run_dir}: kiln (pid 4242 on elsewhere) is writing this run now; wait for it to end, "
        "or choose another run_dir"
    )


def test_the_first_epoch_after_a_resume_inside_it_times_from_the_resumed_start():
    from kiln.training.callbacks import EpochLines

    stream = io.StringIO()
    lines = EpochLines(stream=stream)
    trainer = SimpleNamespace(callback_metrics={}, is_global_zero=True, current_epoch=2, max_epochs=5)
    started = time.perf_counter()
    lines.on_train_start(trainer, None)  # type: ignore[arg-type]
    # resumed inside epoch 3: Lightning calls no on_train_epoch_start for it
    lines.on_train_epoch_end(trainer, None)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    shown = float(re.search(r"\((\d+\.\d) s\)$", stream.getvalue().strip()).group(1))  # type: ignore[union-attr]
    assert stream.getvalue().startswith("epoch 3/5 ")
    assert shown <= round(elapsed, 1) + 0.1


def test_a_misspelt_resume_data_changed_is_refused_at_start_leaving_no_run(tmp_path: Path):
    message = refused(table_run(tmp_path, "resume_data_changed=acept"))
    assert message == "resume_data_changed=acept: must be refuse or accept, e.g. resume_data_changed=accept"
    assert not (tmp_path / "run").exists()


def test_a_resume_of_a_run_early_stopping_ended_is_refused_and_changes_nothing(tmp_path: Path):
    stopping = [
        *[o for o in table_run(tmp_path) if o != "callbacks.early_stopping=null"],
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=100",  # no epoch after the first improves by that much
        "trainer.max_epochs=6",
    ]
    train_call(stopping)
    run_dir = tmp_path / "run"
    assert (
        read_run(run_dir)["status"] == "completed" and epochs_in(run_dir / "checkpoints" / "last.ckpt") == 2
    )
    before = snapshot(run_dir)

    message = refused([*stopping, "resume=auto", "trainer.max_epochs=12"])
    assert message == (
        f"callbacks.early_stopping.patience=1: {run_dir / 'checkpoints' / 'last.ckpt'} was stopped early after "
        "2 epochs (1 without improvement), nothing is left to train; to continue it, give a larger patience, "
        "e.g. callbacks.early_stopping.patience=6"
    )
    assert snapshot(run_dir) == before
