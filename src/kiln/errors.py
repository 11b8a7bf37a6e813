"""User mistakes become one clear line on stderr and a non-zero exit; bugs keep their traceback.

Components raise `KilnError` (or `InvalidArgument` for a bad constructor argument) with a message
that names what is wrong and how to fix it. The CLI turns those, and Hydra's own composition
errors, into a single line. Anything else is a bug in kiln and keeps its full traceback.
"""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2


class KilnError(Exception):
    """A problem the user can fix: a bad config value, a missing file, a diverging run."""


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
    """One line for a mistake the user can fix, or None for a bug (which keeps its traceback)."""
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
                f"available: {', '.join(sorted(exc.options))}"
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
