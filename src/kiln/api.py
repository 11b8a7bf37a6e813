"""kiln's stages from Python (a notebook, a script), with the run directory read back as data.

    from kiln import api

    run = api.train(["experiment=penguins_mlp", "trainer.max_epochs=5"])
    run.test_metrics, run.best_checkpoint, run.model_path, run.report
    run.delivery                                         # after training: shipped, or failed and why
    module = api.load_module(run.directory)              # the trained LightningModule (torch)
    again = api.load(run.directory)                      # any run directory, later
    api.compress(run.directory, ["compress=quantize_static"])
    api.predict(run.model_path, "rows.csv", "predictions.csv")

How a stage runs: as `python -m kiln <stage> <overrides>` in a child process, exactly the command
a user would type, after which the run directory it wrote is read back. This is on purpose, not
Hydra's compose API in this process: a stage changes process-wide state (Hydra's global
singletons and logging set-up, `HYDRA_FULL_ERROR`, torch's seeds and threads, Lightning's rank
and DDP re-launch of `sys.argv[0]`, which in a notebook would be the kernel). A child process
behaves like the CLI, can be called any number of times from one notebook, and a crash, a NaN
or a kill in it cannot take the caller down. The price is the child's start-up (importing torch
and Lightning: a few seconds).

`in_process=True` runs the stage in this process instead (`kiln.config.compose` + the stage's
`main.call`): no child start-up, for a script or a test that calls kiln many times and owns its
process. What it gives up is the list above: Hydra's logging set-up (no `<stage>.log` file), the
child's isolation from a crash, and DDP (one process, one device); a user error raises StageError
all the same.

`train` picks the run directory itself (`run_dir=<fresh path>` under `paths.output_dir`, default
`runs/`, relative to the current directory) unless the overrides name one, so it always knows
where the run went. Sweeps (`-m`) are for the CLI: one call, one run.

A failing stage raises `StageError` (a `KilnError`) whose message is the stage's one-line error
(the last `kiln <stage>: error: ...` line of its stderr); the whole stderr is kept on the
exception. One exception: `train` whose training completed but whose compression or export gate
failed returns the run, with `status` completed and `delivery` failed with the reason. `predict` runs in this process: it is onnxruntime and numpy only, no Hydra, no torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from kiln.errors import KilnError
from kiln.runs import RunDirectory, RunLayout, read_record

# Lines of a child's stderr kept for the error (a long run's progress lines are not all needed).
STDERR_LINES_KEPT = 400


class StageError(KilnError):
    """A stage run through the API failed: the message is its one-line error.

    `stage` is the stage's name, `returncode` its exit code (2 for a user's mistake, 1 for a bug),
    `stderr` the last lines of its stderr (a bug's traceback is there)."""

    def __init__(self, stage: str, returncode: int, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.returncode = returncode
        self.stderr = stderr


# A run directory read back: kiln.runs.RunDirectory (record, config, test metrics, best
# checkpoint, model.onnx, report, what happened after training), plus `load_module()` below.
RunResult = RunDirectory


# -- running stages ----------------------------------------------------------------------------


def train(
    overrides: Sequence[str] | str | None = None,
    *,
    config_dir: str | os.PathLike[str] | None = None,
    echo: bool = True,
    in_process: bool = False,
) -> RunResult:
    """`kiln train <overrides>`; returns the completed run. `config_dir` is the CLI's `--config-dir`
    (your own configs next to kiln's). `echo=False` keeps the stage's output quiet. `overrides` is
    a list of `key=value` strings; a single string is one override (`api.train("data=digits")`).
    `in_process=True`: in this process, see the module's docstring."""
    args = override_list(overrides)
    _refuse_sweeps(args)
    directory = _requested_run_dir(args)
    if directory is None:
        directory = _fresh_run_dir(_output_dir(args))
        args.append(f"run_dir={directory}")
    if config_dir is not None:
        config_path = Path(config_dir).expanduser().resolve()
        if not config_path.is_dir():
            raise KilnError(f"config_dir={config_dir}: no such directory")
        args = ["--config-dir", str(config_path), *args]
    try:
        run_stage("train", args, echo=echo, in_process=in_process)
    except StageError:
        # A compression gate that failed after a completed training: the result says both
        # (`status` completed, `delivery` failed with the reason); any other failure raises.
        if not RunLayout(directory).record.is_file() or read_record(directory).get("status") != "completed":
            raise
    result = load(directory)
    if result.status != "completed":  # the stage said it finished: the record must agree
        raise KilnError(
            f"{RunLayout(directory).record}: kiln train exited cleanly but the run's status is {result.status!r}"
        )
    return result


def compress(
    run_dir: str | os.PathLike[str],
    overrides: Sequence[str] | str | None = None,
    *,
    echo: bool = True,
    in_process: bool = False,
) -> RunResult:
    """`kiln compress run=<run_dir> <overrides>` (then export, unless export_after=false)."""
    return _run_on("compress", run_dir, overrides, echo, in_process)


def export(
    run_dir: str | os.PathLike[str],
    overrides: Sequence[str] | str | None = None,
    *,
    echo: bool = True,
    in_process: bool = False,
) -> RunResult:
    """`kiln export run=<run_dir> <overrides>`: re-export the last compress (or fp32), ship model.onnx."""
    return _run_on("export", run_dir, overrides, echo, in_process)


def predict(
    model: str | os.PathLike[str],
    rows: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
) -> Path:
    """`kiln predict model=... input=... output=...` in this process; returns the predictions CSV."""
    from kiln.stages import predict as predict_stage

    settings = predict_stage.read_settings([])
    settings.update(model=str(model), input=str(rows), output=str(output))
    if batch_size is not None:
        settings["batch_size"] = batch_size
    predict_stage.run(settings)
    return Path(output)


def _run_on(
    stage: str,
    run_dir: str | os.PathLike[str],
    overrides: Sequence[str] | str | None,
    echo: bool,
    in_process: bool,
) -> RunResult:
    args = override_list(overrides)
    directory = load(run_dir).directory  # a clear error before a child process starts
    _refuse_sweeps(args)
    if any(arg.split("=", 1)[0].lstrip("+") == "run" for arg in args):
        raise KilnError(
            f"run=...: give the run directory as api.{stage}'s first argument, not as an override"
        )
    run_stage(stage, [f"run={directory}", *args], echo=echo, in_process=in_process)
    return load(directory)


def run_stage(stage: str, args: Sequence[str], *, echo: bool = True, in_process: bool = False) -> None:
    """`python -m kiln <stage> <args>` in a child process, its output passed through as it comes
    (`echo`); raises StageError with the stage's one-line error if it fails. `in_process`: the
    same stage in this process (compose + main.call)."""
    if in_process:
        run_stage_here(stage, args)
        return
    command = [sys.executable, "-m", "kiln", stage, *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
        env=_child_environment(),
    )
    stderr_lines: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
    # Two readers, so that neither pipe fills up and blocks the child while the other is read.
    readers = [
        threading.Thread(
            target=_pump, args=(process.stdout, sys.stdout if echo else None, None), daemon=True
        ),
        threading.Thread(
            target=_pump, args=(process.stderr, sys.stderr if echo else None, stderr_lines), daemon=True
        ),
    ]
    for reader in readers:
        reader.start()
    try:
        returncode = process.wait()
    except BaseException:  # Ctrl-C or a notebook's interrupt: stop the child as Ctrl-C would
        _stop(process)
        raise
    finally:
        for reader in readers:
            reader.join(timeout=10)
    if returncode != 0:
        raise StageError(
            stage, returncode, error_line(stage, stderr_lines, returncode), "".join(stderr_lines)
        )


def run_stage_here(stage: str, args: Sequence[str]) -> None:
    """The stage's work in this process: the config composed as the CLI composes it (a leading
    `--config-dir DIR` included), then the stage's `main.call`. A user's mistake raises StageError
    with the line the CLI would print; a bug raises as it is."""
    import importlib

    from kiln.config import compose
    from kiln.errors import EXIT_USER_ERROR, describe_user_error

    arguments = list(args)
    extra_config_dir = None
    if arguments[:1] == ["--config-dir"]:
        extra_config_dir, arguments = arguments[1], arguments[2:]
    stage_module = importlib.import_module(f"kiln.stages.{stage}")
    try:
        stage_module.main.call(compose(stage, arguments, extra_config_dir=extra_config_dir))
    except Exception as exc:
        line = describe_user_error(exc)
        if line is None:
            raise
        message = f"kiln {stage}: error: {line}"
        raise StageError(stage, EXIT_USER_ERROR, message, message) from exc


def error_line(stage: str, stderr_lines: Iterable[str], returncode: int) -> str:
    """The stage's own one-line error, else stderr's last line (a bug's exception line)."""
    lines = [line.strip() for line in stderr_lines if line.strip()]
    marker = f"kiln {stage}: error:"
    errors = [line for line in lines if line.startswith(marker)]
    if errors:
        return errors[-1]
    if lines:
        return f"kiln {stage} failed (exit code {returncode}): {lines[-1]}"
    return f"kiln {stage} failed with exit code {returncode} and no message"


def _pump(stream: IO[str] | None, echo_to: IO[str] | None, keep: deque[str] | None) -> None:
    if stream is None:
        return
    for line in stream:
        if keep is not None:
            keep.append(line)
        if echo_to is not None:
            echo_to.write(line)
            echo_to.flush()
    stream.close()


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop the child the way Ctrl-C does, so that its run records itself as failed and keeps its
    checkpoints: from a terminal the child got the Ctrl-C too; a notebook's interrupt reaches only
    the kernel, so the child then gets a SIGINT of its own; kill is the last resort."""
    try:
        process.wait(timeout=5)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    except (subprocess.TimeoutExpired, OSError):
        process.kill()
        process.wait()


def _child_environment() -> dict[str, str]:
    """The caller's environment, with the kiln it imported first on the path (a checkout put on
    sys.path by hand must be the one the child runs), and unbuffered UTF-8 output."""
    environment = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    existing = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = package_root + (os.pathsep + existing if existing else "")
    environment["PYTHONUNBUFFERED"] = "1"  # progress shows as it happens, not when a pipe buffer fills
    environment.setdefault("PYTHONIOENCODING", "utf-8")  # decoded as UTF-8 here
    return environment


def override_list(overrides: Sequence[str] | str | None) -> list[str]:
    """The overrides as a list: a single string is one override (`"data=digits"`), not a list of
    characters; several in one string are refused, since a value may itself hold spaces."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        words = overrides.split()
        if len(words) > 1 and all("=" in word for word in words):
            listed = ", ".join(repr(word) for word in words)
            raise KilnError(f"overrides={overrides!r}: give several overrides as a list, e.g. [{listed}]")
        return [overrides]
    args = list(overrides)
    for arg in args:
        if not isinstance(arg, str):
            raise KilnError(f"overrides: {arg!r} is not a string; each override is a 'key=value' string")
    return args


def _refuse_sweeps(args: Sequence[str]) -> None:
    if any(arg in ("-m", "--multirun") for arg in args):
        raise KilnError("-m/--multirun: the API runs one job per call; run sweeps with `kiln train -m ...`")


def _override_value(args: Sequence[str], key: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in args if "=" in arg and arg.split("=", 1)[0].lstrip("+") == key]
    return values[-1] if values else None  # Hydra: the last override of a key wins


def _requested_run_dir(args: Sequence[str]) -> Path | None:
    value = _override_value(args, "run_dir")
    if value in (None, "", "null", "None"):
        return None
    return Path(str(value)).expanduser().resolve()


def _output_dir(args: Sequence[str]) -> Path:
    value = _override_value(args, "paths.output_dir")
    return Path(value if value not in (None, "", "null") else "runs").expanduser().resolve()


def _fresh_run_dir(output_dir: Path) -> Path:
    """Named like kiln's own runs (local time to the microsecond, then the pid), and never an
    existing directory: `run_dir=` of an existing one would continue that run."""
    while True:
        name = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f") + f"_{os.getpid()}"
        candidate = output_dir / "train" / name
        if not candidate.exists():
            return candidate


# -- reading a run directory -------------------------------------------------------------------


def load_module(run_dir: str | os.PathLike[str]) -> Any:
    """The trained LightningModule of a run directory (best checkpoint, eval mode): kiln's own or
    the one your config names, rebuilt from the run's saved config. Imports torch."""
    from kiln.export.from_run import load_trained, open_run

    _, module = load_trained(open_run(Path(run_dir)))
    return module


def load(run_dir: str | os.PathLike[str]) -> RunResult:
    """An existing run directory; KilnError naming what is missing if it is not one."""
    return RunDirectory.read(Path(run_dir).expanduser().resolve(), key="run_dir")
