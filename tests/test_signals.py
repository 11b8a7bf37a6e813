"""Ctrl-C and `kill` during `kiln compress`, `kiln export` and `kiln predict` (training's own are in
test_run_ownership.py): one line saying what happened and how to redo it, exit 130 (SIGINT) or 143
(SIGTERM), nothing half-written left that looks finished, the interruption in run.json's
`delivery`, and everything saved before byte for byte as it was.

Each test starts the real CLI and sends the signal on an event it sees (a line the stage prints,
a file it creates), never after a sleep.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from kilntest import (
    QUICK,
    ROOT,
    TINY_DIGITS,
    Output,
    copy_run,
    kiln_cli,
    kiln_command,
    kiln_in_process,
    ok,
    read_run,
    wait_for,
)

pytestmark = pytest.mark.slow

F_GETPIPE_SZ = 1032  # fcntl's "size of this pipe" (Linux)
SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"), pytest.param(signal.SIGTERM, 143, id="SIGTERM")]
# What a stage may change in a run it was stopped in: its record, its lock and Hydra's log of it.
MAY_CHANGE = {"run.json", ".kiln.lock"}


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (but the record, the lock and logs) with a digest of its bytes."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name not in MAY_CHANGE and path.suffix != ".log"
    }


def leftovers(directory: Path) -> list[str]:
    """Temp files and staging folders (`*.tmp*`, `.export.tmp-*`, `.compress.tmp-*`, a swap's `.old-*`)."""
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if ".tmp" in path.name or ".old-" in path.name
    )


@pytest.fixture(scope="module")
def shipped(penguins_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The penguins run compressed (fp32 and dynamic int8) and exported: model.onnx shipped."""
    base = tmp_path_factory.mktemp("signals")
    run = copy_run(penguins_run, base)
    ok(
        kiln_cli(
            "compress",
            f"run={run}",
            "compress=quantize_dynamic",
            "compress.max_metric_drop=100",
            "++compress.metric_unit=points",  # 100 points: any loss passes (a loss budget is percent by default)
            *QUICK,
            cwd=base,
        )
    )
    assert (run / "model.onnx").is_file() and read_run(run)["delivery"]["status"] == "passed"
    return run


def start(args: list[str], cwd: Path) -> tuple[subprocess.Popen[str], Output, Output]:
    process = subprocess.Popen(
        kiln_command(*args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return process, Output(process.stdout), Output(process.stderr)


def start_held_at_first_line(args: list[str], cwd: Path) -> tuple[subprocess.Popen[str], int, Output]:
    """kiln with its stdout a pipe left a few bytes short of full: its first line waits in write()
    until the test reads (the kernel holds it, not a sleep), so a signal sent then lands exactly
    there, however quickly the rest of the stage would have gone. Returns the pipe's read end."""
    read_end, write_end = os.pipe()
    size = fcntl.fcntl(write_end, F_GETPIPE_SZ)
    os.write(write_end, b"\n" * (size - 16))  # any line kiln prints is longer than 16 bytes
    process = subprocess.Popen(
        kiln_command(*args), cwd=cwd, stdout=write_end, stderr=subprocess.PIPE, text=True
    )
    os.close(write_end)
    return process, read_end, Output(process.stderr)


def stop_held(
    process: subprocess.Popen[str], read_end: int, stderr: Output, signum: int
) -> tuple[int, list[str]]:
    """Send `signum` once the process waits to write its first line; the exit code, stderr's lines."""
    wchan = Path(f"/proc/{process.pid}/wchan")  # where in the kernel its main thread waits

    def waiting_to_write() -> bool:
        try:
            return "pipe_write" in wchan.read_text()  # pipe_write, or anon_pipe_write (Linux 6.x)
        except OSError:  # it has exited: wait_for says so, with its stderr
            return False

    try:
        wait_for(
            waiting_to_write,
            "kiln to print its first line",
            process=process,
            output=stderr,
        )
        process.send_signal(signum)
        stdout = Output(os.fdopen(read_end))  # drained from now on: the held line, then the rest
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stdout.finish()
    return code, stderr.finish().strip().splitlines()


def check_said_once(lines: list[str], stage: str, name: str) -> str:
    said = [line for line in lines if f"interrupted by {name}" in line]
    assert len(said) == 1 and said[0] == lines[-1], "\n".join(lines)
    assert not any(line.startswith("Traceback") for line in lines), "\n".join(lines)
    assert said[0].startswith(f"kiln {stage}: interrupted by {name} during ")
    return said[0]


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_a_signal_during_compress_keeps_the_shipped_model(
    shipped: Path, tmp_path: Path, signum: int, code: int
):
    run = tmp_path / "run"
    shutil.copytree(shipped, run)
    before = snapshot(run)
    args = [
        "compress",
        f"run={run}",
        "compress=prune_structured",
        "compress.prune_structured.finetune_epochs=5",
        *QUICK,
    ]
    # held at its first line, "exporting the uncompressed model": the staging folder exists
    process, stdout, stderr = start_held_at_first_line(args, tmp_path)
    exit_code, lines = stop_held(process, stdout, stderr, signum)
    name = signal.Signals(signum).name
    assert exit_code == code, "\n".join(lines)
    line = check_said_once(lines, "compress", name)
    assert "during compression and export" in line and "nothing half-written was left" in line
    assert line.endswith(f"redo it with: kiln {shlex.join(args)}")
    record = read_run(run)
    assert record["status"] == "completed"  # the training's own status is not the delivery's
    assert record["delivery"] == {"status": "interrupted", "reason": f"interrupted by {name}"}
    assert snapshot(run) == before  # best.ckpt, model.onnx, report, compress/, export/: as they were
    assert leftovers(run) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_a_signal_during_export_keeps_the_shipped_model(
    shipped: Path, tmp_path: Path, signum: int, code: int
):
    run = tmp_path / "run"
    shutil.copytree(shipped, run)
    before = snapshot(run)
    args = ["export", f"run={run}"]
    process, stdout, stderr = start_held_at_first_line(args, tmp_path)
    exit_code, lines = stop_held(process, stdout, stderr, signum)
    name = signal.Signals(signum).name
    assert exit_code == code, "\n".join(lines)
    line = check_said_once(lines, "export", name)
    assert line.endswith(f"redo it with: kiln {shlex.join(args)}")
    record = read_run(run)
    assert record["status"] == "completed"
    assert record["delivery"] == {"status": "interrupted", "reason": f"interrupted by {name}"}
    assert snapshot(run) == before
    assert leftovers(run) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough penguin rows that writing their predictions takes a while (a signal lands in it)."""
    import pandas as pd
    from palmerpenguins import load_penguins

    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    penguins = load_penguins()
    pd.concat([penguins] * (400_000 // len(penguins)), ignore_index=True).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_a_signal_during_predict_leaves_no_partial_predictions(
    shipped: Path, many_rows: Path, tmp_path: Path, signum: int, code: int
):
    model = shipped / "model.onnx"
    model_before = hashlib.sha256(model.read_bytes()).hexdigest()
    output = tmp_path / "predictions.csv"
    output.write_text("prediction\nfrom an earlier run\n")  # must stay as it was
    args = ["predict", f"model={model}", f"input={many_rows}", f"output={output}"]
    process, _, stderr = start(args, tmp_path)
    try:
        # the event: the predictions' temp file appears beside the output (kiln writes, then renames)
        wait_for(
            lambda: [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")],
            "the predictions' temp file",
            process=process,
            output=stderr,
            poll=0.01,
        )
        process.send_signal(signum)
        exit_code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = stderr.finish().strip().splitlines()
    name = signal.Signals(signum).name
    assert exit_code == code, "\n".join(lines)
    assert lines == [
        f"kiln predict: interrupted by {name} before the predictions were written: {output} was not "
        f"written (nor changed, if it existed); run it again: kiln {shlex.join(args)}"
    ]
    assert output.read_text() == "prediction\nfrom an earlier run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]  # no temp, no drift report
    assert hashlib.sha256(model.read_bytes()).hexdigest() == model_before


def test_a_model_that_cannot_be_loaded_is_recorded_and_one_line(penguins_run: Path, tmp_path: Path):
    run = copy_run(penguins_run, tmp_path)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"not a checkpoint")
    result = kiln_cli("export", f"run={run}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln export: error: "), result.stderr
    delivery = read_run(run)["delivery"]
    assert delivery["status"] == "failed" and delivery["reason"] in lines[0]


def test_the_stress_script_runs_one_iteration_and_says_it_was_consistent(tmp_path: Path):
    """scripts/stress.sh N: the fault cases in a loop; one quick iteration here (train, two writers,
    predict; the compress and export cases are the tests above), with a fixed seed."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "stress.sh"), "1", "--seed", "1", "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert result.stdout.strip().splitlines()[-1] == "iterations=1 consistent=1 lost=0", (
        result.stdout + result.stderr
    )
    assert result.returncode == 0


def test_a_signal_waits_for_renames_that_belong_together():
    """`interrupts.held`: a signal during the block is delivered after it, to the stage's handler."""
    import os

    from kiln.interrupts import Interrupted, held, raising

    steps = []
    with pytest.raises(Interrupted) as caught, raising():
        with held():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("first rename")
            steps.append("second rename")
        steps.append("after the block")  # never: the signal is raised as the block ends
    assert steps == ["first rename", "second rename"]
    assert caught.value.exit_code == 143


# -- the windows the stress script found ------------------------------------------------------------


class SignalAsTrainingEnds(L.Callback):
    """Sends SIGINT to its own process as the last epoch ends, after kiln's StopOnSignal has looked
    for a signal there: the moment a Ctrl-C used to be taken as 'test, export and exit 0'."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 == trainer.max_epochs:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_as_training_ends_stops_once_the_test_is_recorded(tmp_path: Path, monkeypatch):
    from kiln.config import compose
    from kiln.interrupts import Interrupted, raising
    from kiln.stages import train as train_stage

    run = tmp_path / "run"
    overrides = [
        *TINY_DIGITS,
        "export.after_training=true",  # stopping must skip it: the user asked to stop
        f"run_dir={run}",
        "+callbacks.signal_for_test={_target_:test_signals.SignalAsTrainingEnds}",
    ]
    with pytest.raises(Interrupted) as caught, raising():
        train_stage.main.call(compose("train", overrides))
    assert caught.value.exit_code == 130
    record = read_run(run)
    assert record["status"] == "completed" and record["epochs"] == 2
    assert set(record["test_metrics"]) >= {"test/acc", "test/loss"}  # tested whole, then stopped
    assert not (run / "model.onnx").exists() and "delivery" not in record
    printed = f"kiln export run={run}"
    assert caught.value.message == (
        "interrupted by SIGINT as training ended: the run is complete (tested and recorded in "
        f"{run}/run.json), not exported; export it with: {printed}"
    )
    # the command it prints finishes the run
    assert kiln_in_process(monkeypatch, *shlex.split(printed)[1:], *QUICK) == 0
    assert read_run(run)["delivery"]["status"] == "passed" and (run / "model.onnx").is_file()


class SignalDuringTheTest(L.Callback):
    """Sends SIGINT to its own process as the best checkpoint's test starts: every epoch is
    trained, nothing is tested or recorded yet."""

    def on_test_batch_start(self, *args: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_during_the_test_is_continued_by_the_line_it_prints(tmp_path: Path, monkeypatch):
    """All epochs trained, the test interrupted: the printed `resume=auto` trains nothing more and
    tests and records the run (before, it was refused: no epochs left)."""
    from kiln.config import compose
    from kiln.interrupts import Interrupted, raising
    from kiln.stages import train as train_stage

    run = tmp_path / "run"
    overrides = [
        *TINY_DIGITS,
        f"run_dir={run}",
        "+callbacks.signal_in_test={_target_:test_signals.SignalDuringTheTest}",
    ]
    with pytest.raises(Interrupted) as caught, raising():
        train_stage.main.call(compose("train", overrides))
    assert caught.value.exit_code == 130
    assert read_run(run)["status"] != "completed"
    printed = caught.value.message.split("continue it with: ", 1)[1]
    assert printed == f"kiln train run_dir={run} resume=auto"
    last = (run / "checkpoints" / "last.ckpt").read_bytes()
    # the saved overrides come back with the line, the test-time signal among them: drop it here
    assert kiln_in_process(monkeypatch, *shlex.split(printed)[1:], "~callbacks.signal_in_test") == 0
    record = read_run(run)
    assert record["status"] == "completed" and record["epochs"] == 2
    assert set(record["test_metrics"]) >= {"test/acc", "test/loss"}
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == last  # nothing more was trained


SIGNAL_AT_SHUTDOWN = """
import os, runpy, signal, sys

class SignalAtShutdown:  # a module's object, destroyed as the interpreter tears its modules down
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)

sys.modules["signal_at_shutdown"] = type(sys)("signal_at_shutdown")
sys.modules["signal_at_shutdown"].it = SignalAtShutdown()
sys.argv = ["kiln", "--version"]
runpy.run_module("kiln", run_name="__main__", alter_sys=True)
"""


def test_a_signal_after_kiln_finished_changes_nothing():
    """Once kiln has done its work and said so, a Ctrl-C (here: as the interpreter shuts down)
    leaves its exit code as it was: no death by signal, no second word."""
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_SHUTDOWN], capture_output=True, text=True, timeout=300
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "kiln 0.1.0\n", "")


SIGNAL_AT_START = """
import os, runpy, signal, sys

def send_once(event, args, sent=[]):
    if event == "import" and args[0] == "kiln.cli" and not sent:
        sent.append(1)
        os.kill(os.getpid(), {signum})  # while `python -m kiln` imports its command line

sys.addaudithook(send_once)
sys.argv = ["kiln", "predict", "--help"]
runpy.run_module("kiln", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(("signum", "code"), SIGNALS)
def test_a_signal_as_kiln_starts_is_one_line(tmp_path: Path, signum: int, code: int):
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_START.format(signum=int(signum))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    name = signal.Signals(signum).name
    printed = "python -m kiln predict --help"
    assert (result.returncode, result.stderr.splitlines()) == (
        code,
        [f"kiln: interrupted by {name} before it started; run it again: {printed}"],
    )
    again = subprocess.run(
        [sys.executable, *shlex.split(printed)[1:]], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert again.returncode == 0 and again.stdout.startswith("usage: kiln predict")
