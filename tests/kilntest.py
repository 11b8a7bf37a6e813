"""Helpers shared by the test suite: run the real `kiln` CLI as a subprocess, find what it left
behind, and train the small runs that the compress, export and predict tests start from."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import IO, Any, TypeVar

import lightning as L
import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (scripts/ is not a package), registered under its name so
    that dataclasses and pickling inside it find it."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Small, fast settings for end-to-end runs on 2 cores (compression and export switched off: the
# tests of those stages run them explicitly).
NO_COMPRESSION = ["compress=none", "export.after_training=false"]
TINY_DIGITS = [
    "data=digits",
    "model=mlp",
    "model.net.hidden_sizes=[32]",
    "trainer.max_epochs=2",
    "progress=lines",
    *NO_COMPRESSION,
]
TINY_PENGUINS = ["experiment=penguins_mlp", "trainer.max_epochs=3"]
TINY_DIGITS_CNN = [
    "data=digits",
    "model=cnn",
    "model.net.channels=[4,8]",
    "model.net.hidden_size=16",
    "trainer.max_epochs=2",
    "monitor.metric=val/acc",
    "monitor.mode=max",
]
# Fewer latency repeats: the tests check the stages' behaviour, not their timings.
QUICK = ["export.latency_repeats=3"]
# One torch thread, for the children of the tests that train longest. On a busy 2-core machine
# (CI, beside another CPU-heavy process) torch's default of a thread per core makes a small
# model's every step wait for whichever thread is not running: a 5-epoch MLP fitted in 7 s there
# with the default and in 0.4 s with one thread, the demo CNN in 67 s and 7 s, with the same
# test metrics. How many threads torch uses is not something any of these tests checks.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def kiln_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln", *args]


def run_kiln(
    args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    environment.pop("HYDRA_FULL_ERROR", None)  # users see kiln's one-line errors, so do the tests
    return subprocess.run(
        kiln_command(*args), cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def kiln_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return run_kiln(list(args), cwd, env=env, timeout=timeout)


def kiln_in_process(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """`kiln <args>` through the CLI's own entry point in this process, for tests of what the
    command line says and returns where a child process would only add seconds of imports. The
    stage's Hydra app reads (and kiln rewrites) sys.argv and __main__'s spec: both are restored."""
    from kiln import cli

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    main_module = sys.modules["__main__"]
    monkeypatch.setattr(main_module, "__spec__", getattr(main_module, "__spec__", None), raising=False)
    return cli.main(list(args))


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert_ok(result)
    return result


def run_dirs(output_dir: Path, task: str = "train") -> list[Path]:
    base = output_dir / task
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []


def read_run(run_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
    return record


def trained_run(factory: pytest.TempPathFactory, name: str, overrides: list[str]) -> Path:
    """A run trained once per test session and reused by every test that asks for it by name."""
    base = factory.getbasetemp() / "kiln-shared-runs" / name
    runs = base / "runs" / "train"
    existing = sorted(runs.glob("*/checkpoints/best.ckpt")) if runs.exists() else []
    if existing:
        return existing[0].parent.parent
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    ok(
        kiln_cli(
            "train",
            *overrides,
            "progress=lines",
            *NO_COMPRESSION,
            f"paths.output_dir={base / 'runs'}",
            cwd=base,
        )
    )
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def copy_run(run: Path, destination: Path) -> Path:
    """A private copy, so that tests writing model.onnx and reports never see each other's files."""
    target = destination / run.name
    shutil.copytree(
        run, target, ignore=shutil.ignore_patterns("compress", "export", "model.onnx", "report.*")
    )
    return target


class PreemptAt(L.Callback):
    """Plays SLURM: SIGTERM reaches the Preemption callback (kiln.training.preemption) after a given
    step of a given epoch."""

    def __init__(self, preemption: Any, epoch: int, chunk: int) -> None:
        self.preemption, self.epoch, self.chunk = preemption, epoch, chunk

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if (trainer.current_epoch, args[-1]) == (self.epoch, self.chunk):
            self.preemption.received = signal.SIGTERM


class HoldAt(L.Callback):
    """For a test that kills a child `kiln` at a known point of its training: after training step
    `step` (0-based) of epoch `epoch` (0-based), in a run directory named `run` (any run if ""),
    touch `marker` and wait there to be killed, so that the kill lands exactly there however fast
    or slow the machine is. The child finds this module through HOLD_ENV; `hold_at` is the
    override that adds it. A stateless callback: it leaves nothing in checkpoints."""

    def __init__(self, marker: str, epoch: int, step: int = 0, run: str = "") -> None:
        self.marker, self.epoch, self.step, self.run = Path(marker), epoch, step, run

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if (trainer.current_epoch, args[-1]) != (self.epoch, self.step):
            return
        checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)
        if self.run and (checkpoints is None or Path(checkpoints).parent.name != self.run):
            return
        self.marker.touch()
        threading.Event().wait(WAIT_TIMEOUT)  # the test kills this process; a deadline if it never does
        raise RuntimeError(f"nothing killed this process within {WAIT_TIMEOUT:.0f} s of {self.marker}")


# The environment a child `kiln` needs to import HoldAt from this module.
HOLD_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}


def hold_at(marker: Path, epoch: int, step: int = 0, run: str = "") -> str:
    """The override that makes a child `kiln` hold at a point of its training (HoldAt)."""
    return (
        f"+callbacks.hold_for_test={{_target_:kilntest.HoldAt,marker:'{marker}',"
        f"epoch:{epoch},step:{step},run:'{run}'}}"
    )


# -- waiting for events ------------------------------------------------------------------------
# Tests wait for what they need to see (a line printed, a file written), never for a fixed time:
# the suite runs on busy 2-core machines, where any delay that "is usually enough" is not.

# Generous: a deadline is there to end a test that would otherwise hang, not to pace it.
WAIT_TIMEOUT = 300.0
T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    what: str,
    *,
    timeout: float = WAIT_TIMEOUT,
    process: subprocess.Popen[Any] | None = None,
    output: Output | list[str] | None = None,
    poll: float = 0.2,
) -> T:
    """Wait until `condition()` returns something true, and return it.

    `poll` is how often to look, not a delay standing in for the event. Fails (AssertionError,
    naming `what`) after `timeout` seconds, or as soon as `process`, the child expected to make
    the event happen, has ended without it; `output`, that child's output (an Output, or its
    lines), is shown then."""
    deadline = time.monotonic() + timeout
    while True:
        ended = process.poll() if process is not None else None
        value = condition()  # after poll(): an event just before the child exited still counts
        if value:
            return value
        shown = ""
        if output is not None:
            shown = ":\n" + (output.text if isinstance(output, Output) else "".join(output))
        if ended is not None:
            raise AssertionError(f"the process ended (exit {ended}) before {what}{shown}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{shown}")
        time.sleep(poll)


class Output:
    """What a child process writes to one of its pipes, read by a thread as it comes (so the pipe
    never fills and stalls the child), for `wait_for(lambda: output.search(...), ...)`."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None, "start the process with this stream as subprocess.PIPE, text=True"
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def search(self, pattern: str) -> re.Match[str] | None:
        """The first line so far in which `pattern` matches (re.search), or None."""
        for line in list(self.lines):
            match = re.search(pattern, line)
            if match:
                return match
        return None

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 60) -> str:
        """All of it, once the process has exited and its pipe is closed."""
        self._thread.join(timeout)
        return self.text


def image_preprocessing(image: dict[str, Any], channels: int, size: Any) -> Any:
    """An onnxruntime session of the preprocessing kiln assembles (kiln.export.graphs) in front of a
    'net' that returns its input: what the graph makes of uint8 images, (batch, channels, *size)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from kiln.export.graphs import assemble

    shape = ["batch", channels, *size]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
    )
    net = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model = assemble(net, task=None, class_names=[], image=image)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
