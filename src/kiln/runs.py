"""The run directory: provenance, run.json, resume, and writing files so none looks finished early.

    <run_dir>/
      .hydra/            resolved config, overrides, Hydra's own config (written by Hydra)
      run.json           provenance, status, monitor, best checkpoint, test metrics
      checkpoints/       best.ckpt, last.ckpt
      tensorboard/       event files
      train.log          the log of the run

run.json is written when the run starts (status "running") and rewritten when it ends
("completed" or "failed" with the reason), always through a temp file and a rename.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

RUN_RECORD = "run.json"
CHECKPOINTS = "checkpoints"
TRACKED_PACKAGES = (
    "kiln",
    "torch",
    "lightning",
    "torchmetrics",
    "hydra-core",
    "omegaconf",
    "tensorboard",
    "scikit-learn",
    "numpy",
    "pandas",
    "onnx",
    "onnxruntime",
)


def write_atomically(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def git_state(directory: Path) -> dict[str, Any]:
    """The commit of the code that ran and whether it had uncommitted changes.

    Looks at the directory kiln was started in (the user's project) and, failing that, at kiln's
    own checkout; null outside git.
    """
    for candidate in (directory, Path(__file__).resolve().parent):
        state = _git_state(candidate)
        if state["commit"]:
            return state
    return {"commit": None, "dirty": None, "repository": None}


def _git_state(directory: Path) -> dict[str, Any]:

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "repository": git("rev-parse", "--show-toplevel"),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "repository": None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class Run:
    """One run directory and its run.json. Only rank 0 writes (`writer=False` on other ranks)."""

    def __init__(self, directory: Path, writer: bool = True) -> None:
        self.directory = directory
        self.writer = writer
        self.record: dict[str, Any] = {}

    @property
    def checkpoints(self) -> Path:
        return self.directory / CHECKPOINTS

    @property
    def tensorboard(self) -> Path:
        return self.directory / "tensorboard"

    def start(self, *, stage: str, seed: int, monitor: dict[str, str], config_hash: str) -> None:
        previous = self.read_record(self.directory) if (self.directory / RUN_RECORD).exists() else {}
        self.record = {
            "status": "running",
            "stage": stage,
            "started": _now(),
            "finished": None,
            "command": ["kiln", stage, *sys.argv[1:]],
            "cwd": os.getcwd(),
            "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "git": git_state(Path.cwd()),
            "versions": package_versions(),
            "seed": seed,
            "config_hash": config_hash,
            "monitor": monitor,
            "data_fingerprint": None,
            "resumed_from": None,
            "best_checkpoint": None,
            "throughput": None,
            "test_metrics": {},
            "error": None,
        }
        if previous:  # continuing a run: keep what the earlier attempts recorded
            self.record["attempts"] = [*previous.get("attempts", []), _summary(previous)]
        self.save()

    def update(self, **fields: Any) -> None:
        if fields.get("status") == "completed":
            check_finite_results(fields, self.record.get("monitor") or {}, self.directory)
        self.record.update(fields)
        self.save()

    def save(self) -> None:
        if self.writer:
            write_atomically(
                self.directory / RUN_RECORD, json.dumps(self.record, indent=2, default=str) + "\n"
            )

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Mark the run failed, with the reason, if anything escapes; completed is set by the stage."""
        try:
            yield
        except BaseException as exc:
            self.update(status="failed", finished=_now(), error=f"{type(exc).__name__}: {exc}")
            raise

    @staticmethod
    def read_record(directory: Path) -> dict[str, Any]:
        path = directory / RUN_RECORD
        if not path.exists():
            raise KilnError(f"{directory}: not a kiln run directory (no {RUN_RECORD})")
        try:
            record: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise KilnError(f"{path}: unreadable ({exc}); the run record is damaged") from exc
        return record


def resume_checkpoint(
    resume: str | None,
    run_dir_given: bool,
    run: Run,
    check: Callable[[Path, dict[str, Any]], None] | None = None,
) -> Path | None:
    """The checkpoint to resume from, said out loud once it is known to be usable; None starts fresh.

    `resume=auto` continues the run in `run_dir=...` from its last checkpoint and starts fresh only
    when that directory truly has none. `resume=<file>` resumes from that file. The file must be a
    readable checkpoint, and `check(path, checkpoint)` (e.g. `check_fits` with the model) may
    raise if it does not fit: nothing is announced before those pass.
    """
    if resume is None:
        return None
    if str(resume) == "auto":
        if not run_dir_given:
            raise KilnError("resume=auto continues an existing run: add run_dir=<that run's directory>")
        # The newest of the epoch-end checkpoint and a preemption checkpoint saved inside an epoch.
        saved = [p for p in (run.checkpoints / "last.ckpt", run.checkpoints / "preempted.ckpt") if p.exists()]
        path = max(saved, key=lambda p: p.stat().st_mtime_ns) if saved else run.checkpoints / "last.ckpt"
        if not saved:
            print(f"kiln: resume=auto: no checkpoint in {run.checkpoints}, starting fresh", file=sys.stderr)
            return None
    else:
        path = Path(resume)
        if not path.is_file():
            raise KilnError(
                f"resume={resume}: no such checkpoint file; give a .ckpt file or resume=auto with run_dir=..."
            )
    from kiln.training.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(path, key="resume")
    if check is not None:
        check(path, checkpoint)
    print(f"kiln: resuming from {path}", file=sys.stderr)
    return path


def check_finite_results(fields: dict[str, Any], monitor: dict[str, Any], directory: Path) -> None:
    """A run whose best score or test metrics are NaN or infinite diverged: it did not complete.

    Early stopping ends a run quietly when the monitored metric stops being finite, and the best
    checkpoint is then one of NaN weights; this is where that becomes an error, not "completed".
    """
    best = fields.get("best_checkpoint") or {}
    score = best.get("score")
    tests = fields.get("test_metrics") or {}
    bad_tests = {name: value for name, value in tests.items() if not _finite(value)}
    if _finite(score) and not bad_tests:
        return
    metric = monitor.get("metric", "the monitored metric")
    if not _finite(score):
        epoch = best.get("epoch")
        what = f"{metric} was NaN or infinite from epoch {epoch if epoch is not None else '?'} on"
    else:
        name, value = next(iter(bad_tests.items()))
        what = f"the best checkpoint (epoch {best.get('epoch', '?')}) gives {name}={value}"
    raise KilnError(
        f"the run diverged: {what}; likely causes: a learning rate too high (model.optimizer.lr), "
        "unscaled inputs, or overflow in low precision; lower the learning rate or set "
        f"model.gradient_clip_val=1.0. Checkpoints saved so far are kept in {directory / CHECKPOINTS}"
    )


def _finite(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and math.isfinite(value))


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record.get(key) for key in ("started", "finished", "status", "error", "command")}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
