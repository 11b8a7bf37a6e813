"""The run directory, its one owner: the layout (`RunLayout`: every path, named only here), the
record (`RunRecord`, run.json: written by `Run`, read by `RunDirectory` and `read_record`), the saved config, the best checkpoint, and writing files so none looks finished
early (`replacing`, `write_atomically`, `swap_in`). No torch import: `kiln report`, the API and
`kiln predict` read runs through it without loading a model.

    <run_dir>/
      .hydra/            resolved config, overrides, Hydra's own config (written by kiln, below)
      .kiln.lock         held (flock) by the one process writing the run
      run.json           provenance, status, monitor, best checkpoint, test metrics, delivery
      checkpoints/       best.ckpt, last.ckpt
      tensorboard/       event files
      train.log          the log of the run
      compress/ export/  the variants; model.onnx and report.{json,md,png}: the shipped model

run.json is written when the run starts (status "running") and rewritten when it ends
("completed", "failed" with the reason, or "interrupted" by a signal), always through a temp file
and a rename.

Ownership (`claim`): one process writes a run at a time, through a lock that dies with it (kill -9
leaves none behind); kiln writes only into a new or empty directory or a kiln run, and continues
a kiln run only when asked to (`resume=`). Hydra's own `.hydra/` writing is off
(`hydra.output_subdir: null`): kiln saves the config once the run is claimed and, for a resumed
run, only once the resume is accepted, so a refused resume changes nothing on disk.

Ownership goes further: the lock belongs to the process that took it (not to its forked
children), a file system that cannot lock is an error of its own, a completed cross-validation run
(cv.json) is a completed run, and the run's log file (`RunLogFile`) is not written into a directory
before the run is claimed. Inside one SLURM allocation each `kiln train` gets its own name
(`job_run_name`: slurm-<job>, slurm-<job>.2, ...), found again after a requeue.

Nothing kiln writes holds a credential: a password in a URL (`mysql://user:PASSWORD@host/db`) is
masked in every text file written here (`without_credentials`), in the log, and in what Lightning
writes from hyperparameters (`mask_secrets`); a sweep hands its jobs `${oc.env:KILN_SECRET_<KEY>}`
instead of the password (`secrets_to_environment`), and a later stage that needs a masked
password takes it from that variable (`RunDirectory.saved_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, TypedDict, cast

from kiln.errors import KilnError, exception_chain
from kiln.secrets import (  # noqa: F401  (re-exported: kiln.runs was their home)
    MASK,
    SECRET_PREFIX,
    mask_secrets,
    secret_variable,
    secrets_to_environment,
    without_credentials,
)


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Every path of a run directory, named in this one place: a file renamed here is renamed for
    every stage, the report, the API and the trackers, which ask for paths here and never join
    file names themselves. A pure description: nothing is read or created.

        RunLayout(run_dir).best_checkpoint   # <run_dir>/checkpoints/best.ckpt
    """

    root: Path

    # The names, as class attributes (one place to change, or to patch in a test).
    RECORD: ClassVar[str] = "run.json"
    CV_RECORD: ClassVar[str] = "cv.json"  # a cross-validation run's record (its folds have run.json)
    SEARCH_RECORD: ClassVar[str] = "search.json"  # a search's record (its trials have run.json)
    STUDY: ClassVar[str] = "study.db"  # a search's Optuna study
    LOCK: ClassVar[str] = ".kiln.lock"
    HYDRA: ClassVar[str] = ".hydra"
    SAVED_CONFIG: ClassVar[str] = "config.yaml"
    OVERRIDES: ClassVar[str] = "overrides.yaml"
    HYDRA_CONFIG: ClassVar[str] = "hydra.yaml"
    CHECKPOINTS: ClassVar[str] = "checkpoints"
    BEST_CHECKPOINT: ClassVar[str] = "best.ckpt"
    LAST_CHECKPOINT: ClassVar[str] = "last.ckpt"
    PREEMPTED_CHECKPOINT: ClassVar[str] = "preempted.ckpt"
    TENSORBOARD: ClassVar[str] = "tensorboard"
    COMPRESS: ClassVar[str] = "compress"  # the variants' nets and weights
    MANIFEST: ClassVar[str] = "manifest.json"  # in compress/: what each variant is
    EXPORT: ClassVar[str] = "export"  # the variants' deployable ONNX files
    MODEL: ClassVar[str] = "model.onnx"
    REPORT: ClassVar[str] = "report.json"
    REPORT_MARKDOWN: ClassVar[str] = "report.md"
    REPORT_PLOT: ClassVar[str] = "report.png"
    FOLD: ClassVar[str] = "fold_{}"
    TRIAL: ClassVar[str] = "trial_{:03d}"

    # -- the record and the saved config ---------------------------------------------------------

    @property
    def record(self) -> Path:
        return self.root / self.RECORD

    @property
    def cv_record(self) -> Path:
        return self.root / self.CV_RECORD

    @property
    def search_record(self) -> Path:
        return self.root / self.SEARCH_RECORD

    @property
    def study(self) -> Path:
        return self.root / self.STUDY

    @property
    def records(self) -> tuple[Path, ...]:
        """What makes a directory a kiln run: its run.json, or a cross-validation run's cv.json."""
        return (self.record, self.cv_record)

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    @property
    def hydra(self) -> Path:
        return self.root / self.HYDRA

    @property
    def saved_config(self) -> Path:
        return self.hydra / self.SAVED_CONFIG

    @property
    def overrides(self) -> Path:
        return self.hydra / self.OVERRIDES

    @property
    def hydra_config(self) -> Path:
        return self.hydra / self.HYDRA_CONFIG

    def log(self, stage: str) -> Path:
        """The stage's log file (conf/hydra/job_logging/kiln.yaml writes it)."""
        return self.root / f"{stage}.log"

    # -- training --------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint(self.BEST_CHECKPOINT)

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint(self.LAST_CHECKPOINT)

    @property
    def preempted_checkpoint(self) -> Path:
        return self.checkpoint(self.PREEMPTED_CHECKPOINT)

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    def fold(self, index: int) -> RunLayout:
        """Fold `index` of a cross-validation run: a run directory of its own."""
        return RunLayout(self.root / self.FOLD.format(index))

    def trial(self, number: int) -> RunLayout:
        """Trial `number` of a search: a run directory of its own."""
        return RunLayout(self.root / self.TRIAL.format(number))

    # -- delivery --------------------------------------------------------------------------------

    @property
    def compress(self) -> Path:
        return self.root / self.COMPRESS

    @property
    def manifest(self) -> Path:
        return self.compress / self.MANIFEST

    @property
    def export(self) -> Path:
        return self.root / self.EXPORT

    def exported(self, variant: str) -> Path:
        """A variant's deployable file in export/."""
        return self.export / f"{variant}.onnx"

    @property
    def model(self) -> Path:
        return self.root / self.MODEL

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    @property
    def report_markdown(self) -> Path:
        return self.root / self.REPORT_MARKDOWN

    @property
    def report_plot(self) -> Path:
        return self.root / self.REPORT_PLOT

    @property
    def shipped(self) -> tuple[Path, ...]:
        """What export ships together: the model and its report."""
        return (self.model, self.report, self.report_markdown, self.report_plot)

    @property
    def artifacts(self) -> tuple[Path, ...]:
        """What a finished run hands its trackers, where it holds them."""
        return (self.record, self.cv_record, *self.shipped)

    def relative(self, path: Path) -> str:
        """`path` as written inside the run's own files (`export/int8.onnx`): relative to the root."""
        return path.relative_to(self.root).as_posix()


class RunRecord(TypedDict, total=False):
    """run.json: what kiln writes there (`Run`) and reads back (`RunDirectory`, `read_record`).
    A stage may add fields of its own (`Run.update`); these are the ones kiln relies on."""

    status: str  # running, completed, failed, interrupted; pruned (a search trial)
    stage: str
    started: str
    finished: str | None
    command: list[str]
    cwd: str
    host: str
    slurm_job_id: str | None
    git: dict[str, Any]
    versions: dict[str, str | None]
    seed: int
    config_hash: str
    monitor: dict[str, str]
    data_fingerprint: Any
    resumed_from: str | None
    best_checkpoint: dict[str, Any] | None  # {path, score, epoch}
    throughput: dict[str, Any] | None
    test_metrics: dict[str, Any]
    error: str | None
    epochs: int  # trained, when training ended
    drift_baseline: Any  # the training data's statistics kiln predict compares with
    attempts: list[dict[str, Any]]  # earlier attempts of a continued run
    delivery: dict[str, Any]  # {status, shipped, reason}, after compression and export
    mlflow: dict[str, Any]
    feature_importance: list[Any]
    feature_importance_measure: str
    group_metrics: Any


def run_path(what: str, root: str = "") -> str:
    """The config's way to the layout (resolver `kiln_run_path`): the path `what` names (a
    property of `RunLayout`, e.g. checkpoints) below `root`, or relative to the run directory
    without one: `dirpath: ${kiln_run_path:checkpoints,${hydra:runtime.output_dir}}`."""
    path = getattr(RunLayout(Path(root or ".")), what, None)
    if not isinstance(path, Path):
        layout = RunLayout(Path("."))
        names = sorted(name for name in vars(RunLayout) if isinstance(getattr(layout, name, None), Path))
        raise KilnError(
            f"${{kiln_run_path:{what}}}: not a path of a run directory; one of {', '.join(names)}"
        )
    return str(path) if root else RunLayout(Path(".")).relative(path)


def run_path_stem(what: str) -> str:
    """`run_path` without its directory and suffix (resolver `kiln_run_stem`): what Lightning's
    ModelCheckpoint takes as `filename` (it adds .ckpt)."""
    return Path(run_path(what)).stem


def register_layout_resolvers() -> None:
    """`${kiln_run_path:...}` and `${kiln_run_stem:...}`: conf/ names run-directory paths through
    the layout, never by hand (registered by kiln.config, and here for a saved config read back)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("kiln_run_path"):
        OmegaConf.register_new_resolver("kiln_run_path", run_path)
    if not OmegaConf.has_resolver("kiln_run_stem"):
        OmegaConf.register_new_resolver("kiln_run_stem", run_path_stem)


def read_record(directory: Path) -> RunRecord:
    """A run's run.json, or one KilnError naming it when it is missing or damaged."""
    path = RunLayout(directory).record
    if not path.is_file():
        raise KilnError(f"{directory}: not a kiln run directory (no {path.name})")
    return cast(RunRecord, read_json(path))


def write_record(directory: Path, record: Mapping[str, Any]) -> None:
    """Write a run's run.json (credentials masked, through a temp file and a rename)."""
    write_atomically(RunLayout(directory).record, json.dumps(record, indent=2, default=str) + "\n")


# Today's names of the layout's files, for the modules that imported them from here.
RUN_RECORD = RunLayout.RECORD
LOCK_FILE = RunLayout.LOCK


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


@contextmanager
def replacing(path: Path, prefix: str | None = None) -> Iterator[Path]:
    """A temp path beside `path` to write (named `<prefix><random>.tmp`, by default
    `.<name>.<random>.tmp`); renamed onto `path` when the block ends without error, removed
    otherwise. Readers see the old file or the new one, never half of one. The file gets the mode
    of the one it replaces, or what the user's umask gives a new file (mkstemp's 0600 would make
    a shared file private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name is chosen before the file exists, so that Ctrl-C or SIGTERM raising at any point
    # (Python checks for signals between any two steps) finds it known to the `finally` below.
    temp = path.parent / f"{prefix or f'.{path.name}.'}{secrets.token_hex(8)}.tmp"
    try:
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # refuses an existing file
        yield temp
        os.chmod(temp, file_mode(path))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def file_mode(path: Path) -> int:
    """The permission bits a new version of `path` gets: those of the file it replaces, else
    0666 less the umask (what `open()` would give a new file)."""
    import stat

    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:  # no file there yet
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask, read from /proc where it can be: setting it to read it back (the only
    portable way) would, for a moment, give files that other threads create mode 0666."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_MASKED_OR_REFERENCE = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*):(?:\*\*\*|\$\{oc\.env:(?P<variable>"
    + SECRET_PREFIX
    + r"\w+)\})@"
)


def _with_secrets(cfg: Any, directory: Path) -> Any:
    """The saved config with each masked URL password (`user:***@`) given back from its
    environment variable (`secret_variable`), where that is set. A masked one the data or the
    model needs (`data.*`, `model.*`), with no variable set, is one KilnError saying how to give it:
    a connection would otherwise fail with the masked URL."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=False)
    missing: list[tuple[str, str, str]] = []
    for key, text in _strings(plain, ""):
        if not _MASKED_OR_REFERENCE.search(text):
            continue
        own = secret_variable(key)

        def fill(match: re.Match[str], key: str = key, own: str = own) -> str:
            name = match["variable"] or own
            if name in os.environ:
                return f"{match['head']}:{os.environ[name]}@" if not match["variable"] else match.group(0)
            if key.split(".")[0] in ("data", "model"):
                missing.append((key, name, f"{match['head']}:{MASK}@"))
            return match.group(0)

        filled = _MASKED_OR_REFERENCE.sub(fill, text)
        if filled != text:
            OmegaConf.update(cfg, key, filled, merge=False, force_add=True)
    if missing:
        key, name, url = missing[0]
        raise KilnError(
            f"{key}: the run's saved config ({RunLayout(directory).saved_config}) holds this URL without its "
            f"password ({url}...): kiln never saves passwords; give it in the environment variable "
            f"{name}, e.g. `export {name}=...` and run the command again"
        )
    return cfg


def _strings(node: Any, key: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for child, value in node.items():
            yield from _strings(value, f"{key}.{child}" if key else str(child))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{key}.{index}")
    elif isinstance(node, str):
        yield key, node


def write_atomically(path: Path, text: str) -> None:
    """Write `text` (credentials masked) to a temp file beside `path`, then rename."""
    with replacing(path) as temp, temp.open("w") as stream:
        stream.write(without_credentials(text))
        stream.flush()
        os.fsync(stream.fileno())


def copy_atomically(source: Path, target: Path) -> None:
    """Copy to a temp name beside `target`, then rename: `target` is whole or absent."""
    with replacing(target) as temp:
        shutil.copyfile(source, temp)


def swap_in(staging: Path, target: Path) -> None:
    """Replace the directory `target` by the finished `staging` directory: whole or not at all
    (a signal waits for both renames)."""
    from kiln.interrupts import held

    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    with held():
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or one KilnError naming the damaged file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KilnError(f"{path}: unreadable ({exc}); the file is damaged") from exc
    if not isinstance(value, dict):
        raise KilnError(f"{path}: expected a JSON object, found {type(value).__name__}; the file is damaged")
    return value


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
        self.layout = RunLayout(directory)
        self.writer = writer
        self.record: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}  # fields given before the record started (see train_once)

    @property
    def checkpoints(self) -> Path:
        return self.layout.checkpoints

    @property
    def tensorboard(self) -> Path:
        return self.layout.tensorboard

    def start(self, *, stage: str, seed: int, monitor: dict[str, str], config_hash: str) -> None:
        previous = read_record(self.directory) if self.layout.record.exists() else {}
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
        self.record.update(self._pending)
        self._pending.clear()
        self.save()

    def update(self, **fields: Any) -> None:
        if not self.record:  # a resume still being checked: the old record stays as it is until then
            self._pending.update(fields)
            return
        if fields.get("status") == "completed":
            check_finite_results(fields, self.record.get("monitor") or {}, self.directory)
        self.record.update(fields)
        self.save()

    def save(self) -> None:
        if self.writer:
            write_record(self.directory, self.record)

    def has_record(self) -> bool:
        return self.layout.record.is_file()

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Mark the run failed, with the reason, if anything escapes (interrupted, for a signal);
        completed is set by the stage. A run whose record has not started yet (a resume still being
        checked) is left as it was."""
        from kiln.interrupts import Interrupted

        try:
            yield
        except BaseException as exc:
            if not self.record:
                raise
            if isinstance(exc, Interrupted):
                self.update(status="interrupted", finished=_now(), error=str(exc))
            else:
                self.record_failure(exc)
            raise

    def record_failure(self, exc: BaseException) -> None:
        """status failed, with the reason (a full disk or memory said as the user reads it)."""
        from kiln.errors import describe_resource_fault

        reason = describe_resource_fault(exc) or f"{type(exc).__name__}: {exc}"
        self.update_after(exc, status="failed", finished=_now(), error=reason)

    def update_after(self, exc: BaseException, **fields: Any) -> None:
        """`update(**fields)` to record that `exc` happened, when `exc` may have been a full disk
        that refuses run.json too: the space the failed write still holds is let go and the
        record saved again; failing that, it is written over the old record's bytes if it fits
        in them. Else the old record stays whole, and `exc` notes that it was not updated."""
        import traceback

        from kiln.errors import describe_resource_fault

        try:
            self.update(**fields)
            return
        except OSError as unsaved:
            if describe_resource_fault(unsaved) is None:
                raise
            why = unsaved.strerror
        for failed in exception_chain(exc):  # the frames of the failed write hold its open file
            traceback.clear_frames(failed.__traceback__)
        try:
            self.save()
        except OSError:
            if not self._overwrite_record_in_place():
                exc.add_note(
                    f"({self.layout.RECORD} could not be updated, {why}: it says what it said before)"
                )

    def _overwrite_record_in_place(self) -> bool:
        """Write the record, compact, over the bytes run.json already has on disk: no new block is
        needed, so a full disk takes it. Only when it fits (else nothing is written)."""
        path = self.layout.record
        compact = json.dumps(self.record, separators=(",", ":"), default=str)
        data = (without_credentials(compact) + "\n").encode()
        try:
            if not self.writer or len(data) > os.stat(path).st_blocks * 512:
                return False
            with path.open("r+b") as stream:
                stream.write(data)
                stream.truncate()
                stream.flush()
                os.fsync(stream.fileno())
        except OSError:
            return False
        return True

    @staticmethod
    def read_record(directory: Path) -> dict[str, Any]:
        return dict(read_record(directory))

    @classmethod
    def reopen(cls, directory: Path) -> Run:
        """An existing run, to add to its record (e.g. what happened after training)."""
        run = cls(directory)
        run.record = cls.read_record(directory)
        return run


@dataclasses.dataclass(frozen=True)
class RunDirectory:
    """A run directory, read once: its record, its saved config and what it holds. A view, never
    a writer (that is `Run`). What the stages after training, `kiln report` and `kiln.api` see.

    `record` is run.json as written; `test_metrics` its flat `name -> value` test results;
    `best_checkpoint` the tested checkpoint (None until training finished); `model_path` the
    shipped model.onnx and `report` the parsed report.json (None unless export ran).
    """

    directory: Path
    record: dict[str, Any] = dataclasses.field(repr=False)
    name: str = ""  # how a table names it (its path below the directory a report was asked for)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.directory)

    @classmethod
    def read(cls, path: str | os.PathLike[str], key: str = "run") -> RunDirectory:
        """The run at `path`, or one KilnError naming what is missing."""
        if path is None or str(path) in ("", "None"):
            raise KilnError(
                f"{key}: give the run directory written by kiln train, e.g. {key}=runs/train/<run>"
            )
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise KilnError(
                f"{key}={path}: no such directory; give a run directory written by kiln train (runs/train/<run>)"
            )
        layout = RunLayout(directory)
        missing = [layout.relative(p) for p in (layout.record, layout.saved_config) if not p.is_file()]
        if missing:
            raise KilnError(
                f"{key}={path}: not a kiln run directory ({' and '.join(missing)} missing); "
                "give a directory written by kiln train (runs/train/<run>)"
            )
        return cls(directory, dict(read_record(directory)), directory.name)

    # -- the record ------------------------------------------------------------------------------

    @property
    def status(self) -> str | None:
        """The training's status: completed, running or failed (not the export's: see `delivery`)."""
        status = self.record.get("status")
        return str(status) if status is not None else None

    @property
    def delivery(self) -> dict[str, Any] | None:
        """What happened after training: `{status: passed|failed, shipped, reason}`; None when
        compression and export did not run. A failed gate leaves `status` completed."""
        delivery = self.record.get("delivery")
        return dict(delivery) if isinstance(delivery, dict) else None

    @property
    def monitor(self) -> dict[str, str]:
        recorded = self.record.get("monitor")
        if isinstance(recorded, dict) and recorded.get("metric"):
            return {"metric": str(recorded["metric"]), "mode": str(recorded.get("mode", "min"))}
        saved = self.saved_config().get("monitor") or {}
        return {"metric": str(saved.get("metric", "val/loss")), "mode": str(saved.get("mode", "min"))}

    @property
    def config_hash(self) -> str:
        import hashlib

        recorded = self.record.get("config_hash")
        return (
            str(recorded)
            if recorded
            else hashlib.sha256(self.layout.saved_config.read_bytes()).hexdigest()[:16]
        )

    @property
    def test_metrics(self) -> dict[str, float]:
        metrics = self.record.get("test_metrics") or {}
        return {
            str(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }

    @property
    def best_score(self) -> float | None:
        score = (self.record.get("best_checkpoint") or {}).get("score")
        return float(score) if isinstance(score, int | float) and not isinstance(score, bool) else None

    @property
    def error(self) -> str | None:
        error = self.record.get("error")
        return str(error) if error else None

    # -- what it holds ---------------------------------------------------------------------------

    @property
    def best_checkpoint(self) -> Path | None:
        """The tested checkpoint, inside this directory (a run may have been moved or copied: the
        path run.json recorded is only used for its file name); None until training finished."""
        best = self.record.get("best_checkpoint")
        name = Path(str(best["path"])).name if isinstance(best, dict) and best.get("path") else None
        if name is None and self.status != "completed":
            return None
        path = self.layout.checkpoint(name) if name else self.layout.best_checkpoint
        return path if path.is_file() else None

    def require_best_checkpoint(self, key: str = "run") -> Path:
        path = self.best_checkpoint
        if path is None:
            raise KilnError(
                f"{key}={self.directory}: no best checkpoint ({self.layout.relative(self.layout.best_checkpoint)} missing; the run's status is "
                f"{self.status!r}); finish training first: kiln train run_dir={self.directory} resume=auto"
            )
        return path

    @property
    def model_path(self) -> Path | None:
        path = self.layout.model
        return path if path.is_file() else None

    @property
    def report(self) -> dict[str, Any] | None:
        path = self.layout.report
        return read_json(path) if path.is_file() else None

    def saved_config(self) -> Any:
        """`.hydra/config.yaml` as saved (an OmegaConf DictConfig, interpolations unresolved), URL
        passwords given back from the environment (`_with_secrets`)."""
        from omegaconf import OmegaConf

        path = self.layout.saved_config
        try:
            saved = OmegaConf.load(path)
        except Exception as exc:
            raise KilnError(f"{path}: unreadable ({exc}); the run's saved config is damaged") from exc
        return _with_secrets(saved, self.directory)  # passwords were masked: from the environment

    @property
    def config(self) -> Any:
        """The saved config, resolved. Outside Hydra `${hydra:...}` has no resolver, so those are
        filled in first: runtime.output_dir is the run directory, anything else comes from
        `.hydra/hydra.yaml`. A config that still does not resolve is returned as saved."""
        return _resolved(self.directory, self.saved_config())

    @functools.cached_property
    def overrides(self) -> dict[str, str]:
        """`.hydra/overrides.yaml` as key -> value (`+key=v` and `key=v` alike; `~key` as `~`)."""
        import yaml  # PyYAML comes with Hydra/OmegaConf; imported here to keep --help instant

        path = self.layout.overrides
        if not path.is_file():
            return {}
        try:
            items = yaml.safe_load(path.read_text()) or []
        except yaml.YAMLError:
            return {}
        overrides: dict[str, str] = {}
        for item in items if isinstance(items, list) else []:
            text = str(item)
            if text.startswith("~"):
                overrides[text[1:].split("=", 1)[0]] = "~"
                continue
            key, _, value = text.partition("=")
            overrides[key.lstrip("+")] = value
        return overrides


def open_run(path: str | os.PathLike[str] | None, key: str = "run") -> RunDirectory:
    """A trained run for the stages after training: a run directory with a best checkpoint."""
    run = RunDirectory.read(path, key=key)  # type: ignore[arg-type]
    cfg = run.saved_config()
    if not hasattr(cfg, "keys") or "data" not in cfg or "model" not in cfg:
        raise KilnError(
            f"{run.layout.saved_config}: has no data or model config; it is not a kiln train config"
        )
    run.require_best_checkpoint(key)
    return run


# -- ownership -----------------------------------------------------------------------------------

_locks: dict[Path, Any] = {}  # run directory -> the open lock file, held until this process ends


def lock(directory: Path, key: str = "run_dir") -> bool:
    """Hold `directory`'s lock until `release` or the end of this process, or refuse in one line
    naming the process that holds it; False when this process holds it already. flock: the
    kernel lets go when the process ends, however it ends (kill -9 leaves no stale lock).

    The lock belongs to this process alone: its file is closed on exec (subprocesses) and in
    forked children (DataLoader workers, os.fork) at once, so a child that outlives a killed
    parent does not keep the run locked. A file system that cannot lock is a one-line error, not
    "another process holds it"."""
    import fcntl

    directory = directory.resolve()
    if directory in _locks:
        return False
    path = RunLayout(directory).lock
    try:
        # O_CLOEXEC (Python's default for open()): a subprocess never inherits the lock
        handle = open(path, "a+")  # noqa: SIM115  # held open: closing it would unlock
    except OSError as exc:
        raise KilnError(f"{key}={directory}: cannot open {path} ({_os_error(exc)}); {_LOCK_FIX}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if not _held_elsewhere(exc):
            raise KilnError(
                f"{key}={directory}: cannot lock {path} ({_os_error(exc)}); {_LOCK_FIX}"
            ) from None
        raise KilnError(
            f"{key}={directory}: {_holder(path)} is writing this run now; wait for it to end, or "
            f"choose another {key}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"kiln (pid {os.getpid()} on {socket.gethostname()})\n")
    handle.flush()
    _locks[directory] = handle
    _open_run_logs(directory)
    return True


_LOCK_FIX = "kiln needs a file lock there to keep the run to one writer: choose a run directory on a local disk, or on a file system with locking"


def _held_elsewhere(exc: OSError) -> bool:
    """flock's answer for a lock another open file holds (EWOULDBLOCK, which is EAGAIN; EACCES
    where locks are emulated with fcntl, as on NFS); any other error is the file system's."""
    import errno

    return isinstance(exc, BlockingIOError) or exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _os_error(exc: OSError) -> str:
    import errno

    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{name}: {exc.strerror or exc}"


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except (OSError, UnicodeDecodeError):
        return "another process"


def is_locked(directory: Path) -> bool:
    """True while some process (this one included) holds `directory`'s lock. Only looks: creates
    nothing and takes nothing (a shared probe on the existing lock file, let go at once)."""
    import fcntl

    if directory.resolve() in _locks:
        return True
    path = RunLayout(directory).lock
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return _held_elsewhere(exc)
    finally:
        os.close(fd)  # flock: closing this descriptor lets go of the probe only
    return False


def _forget_locks_in_child() -> None:
    """In a forked child: close its copies of the lock files. flock belongs to the open file, which
    the child shares; closed here, the lock lives exactly as long as the process that took it."""
    for handle in _locks.values():
        with suppress(OSError):
            handle.close()
    _locks.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


@contextmanager
def locked(directory: Path, key: str = "run") -> Iterator[None]:
    """`directory`'s lock for the block (kept, if this process held it before)."""
    acquired = lock(directory, key)
    try:
        yield
    finally:
        if acquired:
            release(directory)


def release(directory: Path) -> None:
    """Let go of `directory`'s lock before the process ends (a run trained in-process)."""
    handle = _locks.pop(directory.resolve(), None)
    if handle is not None:
        handle.close()


def claim(directory: Path, *, continuing: bool, key: str = "run_dir") -> None:
    """Take `directory` for a run of this process, or refuse in one line before anything is
    written: a file; a directory holding files kiln did not make (its own run.json included); a
    kiln run, unless `continuing` (resume=...): a completed run is never trained over; a run
    another process is writing."""
    if directory.exists() and not directory.is_dir():
        raise KilnError(f"{key}={directory}: a file, not a directory; give a directory for the run")
    if directory.is_dir():
        _check_is_kiln_run_or_new(directory, key)
        _check_not_held(directory, key)  # a run being written: name its writer, whatever its record says
        _check_may_continue(directory, continuing, key)  # before the lock: a refusal writes nothing
    _entries_before_claim[directory.resolve()] = (
        {entry.name for entry in directory.iterdir()} if directory.is_dir() else set()
    )
    directory.mkdir(parents=True, exist_ok=True)
    lock(directory, key)
    _check_may_continue(directory, continuing, key)  # again: the holder may have just finished it


_entries_before_claim: dict[Path, set[str]] = {}  # what a claimed directory held before the claim
_new_run_dirs: set[Path] = set()  # run_dir=... given on this process's command line, not there before


def remember_new_run_dir(arguments: list[str]) -> None:
    """Note a `run_dir=...` of `arguments` that does not exist yet (before Hydra makes it): a start
    refused there removes the directory again (`undo_refused_start`)."""
    _new_run_dirs.clear()
    for argument in arguments:
        if _is_override(argument) and override_key(argument) == "run_dir" and "=" in argument:
            requested = _unquoted(argument.split("=", 1)[1])
            if requested not in ("", "null", "None") and not Path(requested).expanduser().exists():
                _new_run_dirs.add(Path(requested).expanduser().resolve())


def remember_new_directory(directory: Path) -> None:
    """`directory` is new to this run (a run name drawn now): `undo_refused_start` may remove it."""
    _new_run_dirs.add(directory.resolve())


def undo_refused_start(directory: Path) -> None:
    """A run refused before its record started (a resume that does not fit, a bad setting) leaves
    `directory` as it found it, so that the plain retry is not refused for a half-made run: the
    lock, config and log this start wrote are removed, and the directory too if this command
    made it. Nothing is touched once anything else was written there."""
    resolved = directory.resolve()
    release(directory)
    before = _entries_before_claim.pop(resolved, None)
    if before is None or not directory.is_dir():
        return
    now = {entry.name for entry in directory.iterdir()}
    made = now - before
    if not all(_is_start_file(name) for name in made) or any(
        path.name in now for path in RunLayout(directory).records
    ):
        return
    if resolved in _new_run_dirs and all(_is_start_file(name) for name in now):
        shutil.rmtree(directory, ignore_errors=True)
        return
    for name in made:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _is_start_file(name: str) -> bool:
    """What may sit in a directory before kiln claims it: Hydra's log of this very command, and
    kiln's own lock and config (a run whose start failed before its record was written)."""
    return name in (RunLayout.HYDRA, RunLayout.LOCK) or name.endswith(".log")


def _check_not_held(directory: Path, key: str) -> None:
    if directory.resolve() not in _locks and is_locked(directory):
        raise KilnError(
            f"{key}={directory}: {_holder(RunLayout(directory).lock)} is writing this run now; wait for it "
            f"to end, or choose another {key}"
        )


def _check_may_continue(directory: Path, continuing: bool, key: str) -> None:
    # run.json, or for a cross-validation run (which has none of its own) cv.json: same rules
    found = next((path for path in RunLayout(directory).records if path.is_file()), None)
    if found is None or continuing:
        return
    record = read_json(found)
    status = record.get("status")
    what = "run" if found == RunLayout(directory).record else f"cross-validation run ({found.name})"
    if status == "completed":
        finished = f" (finished {record['finished']})" if record.get("finished") else ""
        raise KilnError(
            f"{key}={directory}: holds a completed {what}{finished}; kiln does "
            f"not train over it: continue its training with resume=auto (e.g. with a larger "
            f"trainer.max_epochs), or leave {key} out for a new run"
        )
    raise KilnError(
        f"{key}={directory}: holds an earlier {what} (status {status}); continue it with resume=auto, "
        f"or leave {key} out for a new run"
    )


def _check_is_kiln_run_or_new(directory: Path, key: str) -> None:
    entries = {entry.name for entry in directory.iterdir()}
    record = RunLayout(directory).record
    if record.is_file():
        try:
            value = json.loads(record.read_text())
        except (OSError, ValueError):
            value = None
        if not (isinstance(value, dict) and {"status", "stage", "config_hash"} <= set(value)):
            raise KilnError(
                f"{key}={directory}: holds a run.json that kiln did not write; kiln writes only into a "
                f"new or empty directory or a kiln run: choose another {key}"
            )
        return
    if any(path.is_file() for path in RunLayout(directory).records):
        return
    foreign = sorted(name for name in entries if not _is_start_file(name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise KilnError(
            f"{key}={directory}: holds files kiln did not make ({shown}); kiln writes only into a new "
            f"or empty directory or a kiln run: choose another {key}"
        )


def job_run_name(base: Path, stem: str, *, requeued: bool) -> str:
    """A run name for a `kiln train` inside a SLURM job: `stem` (slurm-<job id>), or `stem.2`,
    `stem.3`, ... for the second, third `kiln train` of the same allocation; readable, and the
    same again after a requeue.

    The first name under `base` that is free (no directory, or one without a record whose lock
    nobody holds), or, in a requeued job, that holds this very command's run: the requeued job
    runs its commands again and each finds its own run (run.json records the command) to resume.
    A run of another command, a run someone is writing, and, outside a requeue, any earlier run
    of the job (completed or not) are passed over, so no `kiln train` of a job is refused for a
    name another one took."""
    command = [without_credentials(argument) for argument in sys.argv[1:]]
    number = 1
    while True:
        name = stem if number == 1 else f"{stem}.{number}"
        number += 1
        directory = base / name
        if not directory.is_dir():
            return name
        if is_locked(directory):
            continue
        record = _first_record(directory)
        if record is None:
            return name  # empty, or a start that failed before its record: nothing to lose
        if requeued and list(record.get("command") or [])[2:] == command:
            return name


def _first_record(directory: Path) -> dict[str, Any] | None:
    """run.json, or for a cross-validation run its first fold's (the command is the same)."""
    layout = RunLayout(directory)
    for path in (layout.record, layout.fold(0).record, layout.cv_record):
        if path.is_file():
            try:
                value = json.loads(path.read_text())
            except (OSError, ValueError):
                return {}
            return value if isinstance(value, dict) else {}
    return None


# -- the run's log file --------------------------------------------------------------------------

_run_logs: list[RunLogFile] = []


class RunLogFile(logging.FileHandler):
    """The run's log (`<run_dir>/<stage>.log`, conf/hydra/job_logging/kiln.yaml), written only once
    this process owns the run directory (`claim`, `lock`): Hydra configures logging before kiln
    has looked at the directory, and a refused `run_dir=` (a user's folder, a completed run, a run
    another process writes) must not get a new or longer log. In a directory that held anything
    already, records wait in memory until the lock is taken; a refused run's records never
    reach the file. Passwords in
    URLs are masked (`without_credentials`)."""

    _LIMIT = 10_000  # records kept while waiting: a log is not a buffer without end

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = "utf-8") -> None:
        super().__init__(filename, mode, encoding=encoding, delay=True)
        self._waiting: list[logging.LogRecord] = []
        # A directory Hydra has just made (empty, or not there yet) has nothing to protect: the log
        # starts at once (a stage that never claims its directory, like kiln search, keeps its log).
        directory = Path(filename).parent
        self._owned = filename == os.devnull or not directory.is_dir() or not any(directory.iterdir())
        _run_logs.append(self)

    @property
    def directory(self) -> Path:
        return Path(self.baseFilename).parent

    def format(self, record: logging.LogRecord) -> str:
        return without_credentials(super().format(record))

    def emit(self, record: logging.LogRecord) -> None:
        if not self._owned and self.directory.resolve() not in _locks:
            if len(self._waiting) < self._LIMIT:
                self._waiting.append(record)
            return
        self._owned = True  # once owned, kept: the log goes on after an in-process release
        waiting, self._waiting = self._waiting, []
        for earlier in waiting:
            super().emit(earlier)
        super().emit(record)

    def open_now(self) -> None:
        """The run is claimed: write what waited."""
        self._owned = True
        waiting, self._waiting = self._waiting, []
        for earlier in waiting:
            super().emit(earlier)
        self.flush()

    def close(self) -> None:
        if self in _run_logs:
            _run_logs.remove(self)
        super().close()


def _open_run_logs(directory: Path) -> None:
    for handler in list(_run_logs):
        if not handler._owned and handler.directory.resolve() == directory:
            handler.open_now()


def save_run_config(directory: Path, cfg: Any, overrides: list[str], hydra: Any = None) -> None:
    """`.hydra/config.yaml`, `overrides.yaml` and (given Hydra's node) `hydra.yaml`, as Hydra
    would write them, credentials masked (write_atomically)."""
    import yaml
    from omegaconf import OmegaConf

    layout = RunLayout(directory)
    write_atomically(layout.saved_config, OmegaConf.to_yaml(cfg))
    write_atomically(layout.overrides, yaml.safe_dump(list(overrides), default_flow_style=False))
    if hydra is not None:
        write_atomically(layout.hydra_config, OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra})))


def find_runs(root: Path) -> list[Path]:
    """Every directory at or below `root` holding a run.json."""
    return sorted(path.parent for path in root.rglob(RunLayout.RECORD) if path.is_file())


_HYDRA_INTERPOLATION = re.compile(r"\$\{hydra:([A-Za-z0-9_.]+)\}")


def _resolved(directory: Path, saved: Any) -> Any:
    from omegaconf import OmegaConf

    register_layout_resolvers()
    hydra_file = RunLayout(directory).hydra_config
    hydra_cfg = OmegaConf.load(hydra_file) if hydra_file.is_file() else None

    def hydra_value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key == "runtime.output_dir":
            return str(directory)
        try:
            value = OmegaConf.select(hydra_cfg, f"hydra.{key}") if hydra_cfg is not None else None
        except Exception:  # itself an interpolation of a resolver registered only inside kiln's stages
            value = None
        return str(value) if isinstance(value, str | int | float) else match.group(0)

    def fill(node: Any) -> Any:
        if isinstance(node, str):
            return _HYDRA_INTERPOLATION.sub(hydra_value, node)
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(value) for value in node]
        return node

    filled = OmegaConf.create(fill(OmegaConf.to_container(saved, resolve=False)))
    try:
        OmegaConf.resolve(filled)
    except Exception:
        return saved  # an interpolation only the run's own resolvers knew: keep it as written
    return filled


# -- continuing a run: its own overrides and config, never today's defaults ----------------------

# Keys a continuation takes from its own command line only, never from the run's saved overrides.
LINE_ONLY_KEYS = frozenset({"run_dir", "resume", "resume_data_changed"})


@dataclasses.dataclass(frozen=True)
class Continuation:
    """`kiln train run_dir=R resume=auto ...` of a run that saved its overrides: the overrides
    carried over from R, and what this command line sets besides run_dir and resume."""

    directory: Path
    carried: tuple[str, ...]
    changed: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"kiln: continuing {self.directory} with its saved overrides {list(self.carried)}; "
            f"changed on this line: {list(self.changed)}"
        )


_continuations: list[Continuation] = []  # the one composed by this process, if any


def override_key(override: str) -> str:
    """The config key or group an override sets: `+a.b=1`, `++a.b=1`, `~a.b`, `a.b=1` -> a.b."""
    return override.split("=", 1)[0].lstrip("+~")


def _is_override(argument: str) -> bool:
    return not argument.startswith("-") and ("=" in argument or argument.startswith("~"))


def _is_carried(key: str) -> bool:
    return key not in LINE_ONLY_KEYS and not key.startswith("hydra")


def with_saved_overrides(arguments: list[str], *, requeued: bool = False) -> list[str]:
    """`arguments` (a command line's overrides and Hydra flags) with, for a continued run
    (`run_dir=R resume=auto`, or a requeued SLURM job), R's saved overrides that the line does
    not set put first: the run goes on with its own settings, and only what the line sets
    changes. Idempotent: a line that holds all of R's overrides (a DDP rank re-launched from
    the effective command line, a requeued job) gets nothing added."""
    _continuations.clear()
    overrides = [argument for argument in arguments if _is_override(argument)]
    values = {override_key(o): _unquoted(o.split("=", 1)[1]) for o in overrides if "=" in o}
    requested = values.get("run_dir", "")
    if requested in ("", "null", "None") or not (values.get("resume") == "auto" or requeued):
        return list(arguments)
    directory = Path(requested).expanduser()
    saved = _saved_overrides(directory)
    if saved is None:
        return list(arguments)
    on_line = {override_key(o) for o in overrides}
    carried = tuple(o for o in saved if _is_carried(override_key(o)) and override_key(o) not in on_line)
    changed = tuple(o for o in overrides if _is_carried(override_key(o)))
    _continuations.append(Continuation(directory.resolve(), carried, changed))
    # `~key` on the line for a key the run itself added (`+key=...`): not carrying it removes it;
    # Hydra would refuse to delete a key today's config does not have
    added = {override_key(o) for o in saved if o.startswith("+") and not o.startswith("++")}
    kept = [a for a in arguments if not (a.startswith("~") and override_key(a) in added)]
    return [*carried, *kept]


def continuation(directory: Path) -> Continuation | None:
    """The continuation composed in this process for `directory` (with_saved_overrides), if any."""
    found = [c for c in _continuations if c.directory == directory.resolve()]
    return found[0] if found else None


def _unquoted(value: str) -> str:
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def _saved_overrides(directory: Path) -> list[str] | None:
    """A run's `.hydra/overrides.yaml`: None when it has none, one KilnError when it is damaged."""
    import yaml

    path = RunLayout(directory).overrides
    if not path.is_file():
        return None
    try:
        items = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        items = exc
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise KilnError(
            f"{path}: unreadable as a list of overrides; the run's saved overrides are damaged: "
            f"restore the file, or continue its checkpoint in a new run: "
            f"kiln train resume={RunLayout(directory).last_checkpoint} <its overrides>"
        )
    return items


def keep_saved_values(cfg: Any, directory: Path, line_keys: frozenset[str] | None) -> list[str]:
    """Continuing the run in `directory`: every value of `cfg` (composed now) that differs from
    the run's saved config, at a key that none of `line_keys` (the new command line's keys; None:
    none) sets, takes its saved value, so a kiln upgrade that changed a default does not change a
    run halfway. Returns `key=saved (today: new)` for each value taken."""
    from omegaconf import OmegaConf

    path = RunLayout(directory).saved_config
    if not path.is_file():
        return []
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:
        raise KilnError(f"{path}: unreadable ({exc}); the run's saved config is damaged") from exc
    today = OmegaConf.to_container(cfg, resolve=False)
    touched = line_keys or frozenset()
    if not isinstance(today, dict) or any("." not in key and key not in today for key in touched):
        return []  # a group of global settings on the line (experiment=...): it may set any key
    kept = []
    for key, old, new in _differences(saved, today, ""):
        if key in LINE_ONLY_KEYS or any(key == k or key.startswith(f"{k}.") for k in touched):
            continue
        if isinstance(old, str) and ("***@" in old or "${oc.env:" in old):
            continue  # a masked password: the value given now is the real one
        OmegaConf.update(cfg, key, old, merge=False)
        kept.append(f"{key}={old!r} (today: {new!r})")
    return kept


def _differences(saved: Any, today: Any, key: str) -> Iterator[tuple[str, Any, Any]]:
    """(key, saved value, today's value) where both configs hold the key and the values differ."""
    if isinstance(saved, dict) and isinstance(today, dict):
        for child in saved.keys() & today.keys():
            yield from _differences(saved[child], today[child], f"{key}.{child}" if key else str(child))
    elif saved != today:
        yield key, saved, today


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
        f"model.gradient_clip_val=1.0. Checkpoints saved so far are kept in {RunLayout(directory).checkpoints}"
    )


def _finite(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and math.isfinite(value))


def _summary(record: Mapping[str, Any]) -> dict[str, Any]:
    return {key: record.get(key) for key in ("started", "finished", "status", "error", "command")}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
