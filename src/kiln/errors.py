"""User mistakes become one clear line on stderr and a non-zero exit; bugs keep their traceback.

Components raise `KilnError` (or `InvalidArgument` for a bad constructor argument) with a message
that names what is wrong and how to fix it. The CLI turns those, and Hydra's own composition
errors, into a single line. Anything else is a bug in kiln and keeps its full traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from types import FrameType
from typing import Any

EXIT_USER_ERROR = 2


class KilnError(Exception):
    """A problem the user can fix: a bad config value, a missing file, a diverging run."""


class SweepRefused(BaseException):
    """A sweep that must not start; its message is the one line for the user. Not an Exception:
    raised from a Hydra callback (on_multirun_start), only a BaseException stops Hydra before any
    job starts."""


class InvalidArgument(KilnError, ValueError):
    """A component got an argument it cannot work with.

    `argument` is the constructor parameter, so the stage can name the config key
    (`data.batch_size`) without the component knowing about configs.
    """

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message


def require(condition: bool, argument: str, message: str) -> None:
    """Raise InvalidArgument(argument, message) unless condition holds."""
    if not condition:
        raise InvalidArgument(argument, message)


def one_line(text: str) -> str:
    """Collapse a multi-line message into one line."""
    parts = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(parts)


def describe_user_error(exc: BaseException) -> str | None:
    """One line for a mistake the user can fix, or None for a bug (which keeps its traceback).
    The line holds no secret: a password in a value it quotes is masked (kiln.secrets)."""
    from kiln.secrets import without_credentials

    line = _user_error_line(exc)
    return None if line is None else without_credentials(line)


def _user_error_line(exc: BaseException) -> str | None:
    from hydra.errors import (
        ConfigCompositionException,
        InstantiationException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, KilnError):
        return one_line(str(exc))
    if isinstance(exc, MissingConfigException):
        missing = exc.missing_cfg_file or ""
        if "/" in missing and exc.options:
            group, _, choice = missing.rpartition("/")
            group_key = group.replace("/", ".")
            return (
                f"{group_key}={choice}: no such option in config group '{group}'; "
                # `_shared`: a part other options include (conf/data/_shared.yaml), not a choice
                f"available: {', '.join(sorted(o for o in exc.options if not o.startswith('_')))}"
            )
        return one_line(str(exc))
    if isinstance(exc, ConfigCompositionException):
        message = str(exc)
        if message.startswith("Could not override '"):
            key = message.split("'")[1]
            return (
                f"{key}: no such config key; check the spelling (`kiln <stage> --cfg job` prints every key), "
                f"or add a new key with +{key}=VALUE"
            )
        cause = exc.__cause__
        return one_line(f"{message} {cause}" if cause else message)
    if isinstance(exc, OverrideParseException):
        return one_line(f"could not parse the override: {exc}")
    if isinstance(exc, InstantiationException):
        cause = exc.__cause__
        if isinstance(cause, KilnError):
            return one_line(str(cause))
        return one_line(str(exc))
    if isinstance(exc, OmegaConfBaseException):
        return _describe_omegaconf_error(exc)
    if type(exc).__name__ == "UncompletedJobError":  # submitit: a SLURM job ended without a result
        return _describe_uncompleted_job(str(exc))
    resource_fault = describe_resource_fault(exc)
    if resource_fault is not None:
        return resource_fault
    directory_error = _run_directory_error(exc)
    if directory_error is not None:
        return directory_error
    if isinstance(exc, ValueError) and str(exc).startswith(
        "Config group override must be a string or a list"
    ):
        # Hydra's words for `logger=null` on the command line: a group is removed with ~group
        groups = [arg.split("=", 1)[0] for arg in sys.argv[1:] if arg.endswith("=null") and "." not in arg]
        group = groups[0] if groups else "GROUP"
        return (
            f"{group}=null: a config group cannot be set to null on the command line; "
            f"remove it with ~{group}, or pick one of its options with {group}=OPTION"
        )
    return None


def _describe_omegaconf_error(exc: BaseException) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    key = getattr(exc, "full_key", None)
    if isinstance(exc, MissingMandatoryValue) and key:
        return f"{key}: needs a value (it is ??? in the config); set it with {key}=VALUE"
    if isinstance(exc, ConfigAttributeError | ConfigKeyError) and key:
        return (
            f"{key}: not in the composed config, and this stage needs it; if an override removed it "
            f"(~{key}), set it instead (`kiln <stage> --cfg job` prints the composed config)"
        )
    return one_line(str(exc))


def _describe_uncompleted_job(message: str) -> str:
    """submitit says: "Job <id> (task: 0) with path <result file>\nhas not produced any output
    (state: CANCELLED by 0)\n<the job's stderr>"."""
    import re

    job = re.search(r"Job (\S+)", message)
    state = re.search(r"\(state: ([^)]*)\)", message)
    path = re.search(r"with path (\S+)", message)
    logs = f"; its logs: {path.group(1).rsplit('_result', 1)[0]}_log.out/.err" if path else ""
    return (
        f"SLURM job {job.group(1) if job else '?'} of the sweep ended without a result "
        f"(state: {state.group(1) if state else 'unknown'}){logs}; jobs still running go on, and "
        f"`kiln report dir=<sweep dir>` tables what finished"
    )


# -- resource faults: a full disk, a file size limit, a quota, memory -------------------------

RESOURCE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# What torch's C++ writer says when a write fails: it keeps no errno (see `write_failure`).
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter failed", "iostream error")
# kiln.runs.replacing writes `.<name>.<random>.tmp` beside the file it replaces.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


def describe_resource_fault(exc: BaseException) -> str | None:
    """One line for a full disk, a file size limit, a disk quota or memory running out, anywhere in
    `exc`'s chain (a fault while saving the failed run record is chained to the first one); None
    for anything else. Notes added on the way (run.json not updated) are said too."""
    fault = next((e for e in exception_chain(exc) if _is_resource_fault(e)), None)
    if fault is None:
        fault = next(
            (_torch_write_fault(e) for e in exception_chain(exc) if _is_torch_write_failure(e)), None
        )
    if fault is None:
        return None
    if isinstance(fault, MemoryError):
        line = (
            "out of memory (MemoryError); use a smaller batch (data.batch_size) or a smaller model, "
            "or give the process more memory (its memory limit, `ulimit -v`, or a larger machine)"
        )
    else:
        assert isinstance(fault, OSError)
        line = _describe_write_fault(fault.errno, _path_being_written(fault))
    notes = [note for e in exception_chain(exc) for note in getattr(e, "__notes__", [])]
    return one_line(" ".join([line, *notes]))


def write_failure(path: Path, exc: BaseException) -> OSError:
    """An OSError naming `path` for a write that failed inside torch's C++ writer (`torch.save`),
    whose RuntimeError keeps no errno: the cause is told from the process's file size limit and
    the free space left. Other errors are returned as they are, when already an OSError."""
    if isinstance(exc, OSError):
        return exc if exc.filename else OSError(exc.errno, exc.strerror, str(path))
    if _file_size_limit() is not None:
        code = errno.EFBIG
    elif _free_bytes(path) < LOW_SPACE:
        code = errno.ENOSPC
    else:
        code = errno.EIO
    return OSError(code, os.strerror(code), str(path))


LOW_SPACE = 64 * 2**20  # below this, a failed write is taken for a full disk


def _is_resource_fault(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


def _is_torch_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in TORCH_WRITE_FAILURES)


def _torch_write_fault(exc: BaseException) -> OSError:
    """torch.save's error, where no caller named the file: the file is its argument `f`."""
    frame = next(
        (f for f in reversed(_frames(exc)) if f.f_code.co_name == "save" and "f" in f.f_locals), None
    )
    target = frame.f_locals["f"] if frame is not None else None
    path = Path(os.fsdecode(target)) if isinstance(target, str | os.PathLike) else Path.cwd()
    return write_failure(path, exc)


def _describe_write_fault(code: int | None, path: Path | None) -> str:
    where = f"writing {path}" if path is not None else "writing its files"
    if code == errno.EFBIG:
        limit = _file_size_limit()
        said = f" of {limit} bytes" if limit is not None else ""
        return (
            f"a file grew past the file size limit{said} while {where}; raise the limit "
            "(`ulimit -f` in the shell that starts kiln) and run it again; files saved earlier are kept"
        )
    if code == errno.EDQUOT:
        return (
            f"disk quota exceeded while {where}; free space in your quota (or set paths.output_dir "
            "to a disk with room) and run it again; files saved earlier are kept"
        )
    return (
        f"no space left on the device while {where}; free space there (or set paths.output_dir "
        "to a disk with room) and run it again; files saved earlier are kept"
    )


def _path_being_written(exc: OSError) -> Path | None:
    """The file a failed write was for: the error's own filename, else a file open for writing in
    the innermost frame that holds one (`stream.write` raises without a filename). A temp file of
    kiln.runs.replacing is named by the file it was to replace."""
    name = os.fsdecode(exc.filename) if exc.filename else _open_file_in_traceback(exc)
    if name is None:
        return None
    path = Path(name)
    temp = _TEMP_NAME.match(path.name)
    return path.with_name(temp.group("name")) if temp else path


def _open_file_in_traceback(exc: BaseException) -> str | None:
    for frame in reversed(_frames(exc)):  # the innermost first
        for value in frame.f_locals.values():
            mode = getattr(value, "mode", None)
            name = getattr(value, "name", None)
            if isinstance(mode, str) and isinstance(name, str) and any(c in mode for c in "wax+"):
                return name
    return None


def _frames(exc: BaseException) -> list[FrameType]:
    frames = []
    traceback = exc.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    return frames


def _file_size_limit() -> int | None:
    """The process's file size limit in bytes (`ulimit -f`), None when unlimited."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _free_bytes(path: Path) -> int:
    import shutil

    for directory in [path, *path.parents]:
        if directory.is_dir():
            return shutil.disk_usage(directory).free
    return LOW_SPACE


# -- a run directory that cannot be made ------------------------------------------------------


def output_dir_error(exc: OSError, run_dir: str | os.PathLike[str], cfg: Any = None) -> str:
    """One line for a run directory that cannot be made (or written) under `paths.output_dir`,
    `run_dir` or `hydra.run.dir`, whichever placed it; `cfg` is the composed config, if known."""
    run_dir = Path(run_dir)
    failed = Path(os.fsdecode(exc.filename)) if exc.filename else run_dir
    key, value = _directory_key(cfg if cfg is not None else _running_config(), run_dir)
    if key == "run_dir":
        fix = "give run_dir=<an existing run directory you can write to>, or leave run_dir out for a new run"
    else:
        fix = f"set {key} to a directory you can write to, e.g. {key}=$HOME/kiln-runs"
    return f"{key}={value}: cannot create the run directory {run_dir} ({_why_not_made(exc, failed)}); {fix}"


def _directory_key(cfg: Any, run_dir: Path) -> tuple[str, str]:
    """Which key put the run directory where it is: run_dir=..., paths.output_dir=... or hydra.run.dir."""
    from omegaconf import OmegaConf

    def select(key: str) -> Any:
        try:
            return OmegaConf.select(cfg, key, throw_on_resolution_failure=False) if cfg is not None else None
        except Exception:
            return None

    requested = select("run_dir")
    if requested and _same_or_above(Path(str(requested)), run_dir):
        return "run_dir", str(requested)
    output_dir = select("paths.output_dir")
    if output_dir is not None and _same_or_above(Path(str(output_dir)), run_dir):
        return "paths.output_dir", str(output_dir)
    return "hydra.run.dir", str(run_dir)  # set directly, outside paths.output_dir


def _running_config() -> Any:
    """The whole config of the job Hydra (or kiln.config.compose) set up in this process, if any."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return _whole_config(HydraConfig.get())


def _same_or_above(path: Path, other: Path) -> bool:
    path, other = Path(os.path.abspath(path)), Path(os.path.abspath(other))
    return path == other or path in other.parents


def _why_not_made(exc: OSError, failed: Path) -> str:
    """In words: which part of the path is in the way, or what the system refused."""
    existing = next((p for p in [failed, *failed.parents] if os.path.lexists(p)), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if isinstance(exc, PermissionError):
        return f"permission denied: {failed}" + (
            f" ({existing} is not writable for this user)" if existing is not None else ""
        )
    return f"{exc.strerror or type(exc).__name__}: {failed}"


def _run_directory_error(exc: BaseException) -> str | None:
    """One line when Hydra could not make the run (or sweep) directory, or write its config or log
    file there, before the stage started; None for any other error (an OSError inside a stage is
    a bug, or is reported by the stage itself, and keeps its traceback)."""
    error = next((e for e in exception_chain(exc) if isinstance(e, OSError) and e.filename), None)
    if error is None or not _raised_in_hydra(exc):
        return None
    from omegaconf import OmegaConf

    config = _hydra_config_of(exc)
    if config is None:
        return None
    hydra: Any = config.hydra
    failed = Path(os.fsdecode(error.filename))
    for key in ("runtime.output_dir", "sweep.dir", "run.dir"):
        try:
            directory = OmegaConf.select(hydra, key, default=None, throw_on_missing=False)
        except Exception:  # a run dir that cannot be resolved here
            continue
        if not directory or directory == "???":
            continue
        directory = Path(os.path.abspath(str(directory)))
        # the directory itself, a parent that could not be made, or its .hydra/ and log file
        if _same_or_above(failed, directory) or _same_or_above(directory, failed):
            return one_line(output_dir_error(error, directory, config))
    return None


def _hydra_config_of(exc: BaseException) -> Any:
    """The composed config (with its hydra node) of the job Hydra was setting up when `exc` was
    raised. Hydra forgets it (HydraConfig is reset) before the error reaches the stage wrapper,
    so it is taken from the frame that held it: run_job's `config`, a launcher's `self.config`."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    frames = []
    traceback = exc.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):  # the innermost first
        if not str(frame.f_globals.get("__name__", "")).startswith(("hydra.", "hydra_plugins.")):
            continue
        for value in frame.f_locals.values():
            candidates = (
                [value] if isinstance(value, DictConfig) else [getattr(value, "__dict__", {}).get("config")]
            )
            for candidate in candidates:
                if isinstance(candidate, DictConfig) and "hydra" in candidate:
                    return candidate
    if HydraConfig.initialized():
        return _whole_config(HydraConfig.get())
    return None


def _whole_config(hydra_node: Any) -> Any:
    """The config whose `hydra` node HydraConfig holds. Hydra keeps only that node, linked to its
    parent, and has no public getter for the rest: OmegaConf's relative key `..` is one."""
    from omegaconf import OmegaConf

    return OmegaConf.select(hydra_node, "..")


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc`, then its cause or context, and theirs: each once."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _raised_in_hydra(exc: BaseException) -> bool:
    """Was `exc` raised by Hydra's own code (making directories, saving .hydra/, opening the log
    file), below any stage? The innermost frame outside the standard library tells."""
    innermost = None
    traceback = exc.__traceback__
    while traceback is not None:
        module = str(traceback.tb_frame.f_globals.get("__name__", ""))
        if module.split(".")[0] not in sys.stdlib_module_names:
            innermost = module
        traceback = traceback.tb_next
    if innermost is None or "instantiate" in innermost:  # hydra.utils.instantiate runs users' code
        return False
    return innermost.startswith(("hydra.", "hydra_plugins."))
