"""DDP inside a Hydra multirun: ranks > 0 must run this one job, not the whole sweep again, and
each job must start its ranks afresh.

Lightning starts ranks > 0 of a DDP run by re-running the command line that started rank 0, with
`hydra.run.dir=<run.dir>` appended. In a multirun that command line is the sweep's (`-m` and every
swept value), so upstream each rank 1 re-runs the whole sweep (Lightning #11300). kiln rewrites
sys.argv to this job's own overrides, without `-m`, and points run.dir at this job's directory.

Lightning also leaves the process group and its launch variables (LOCAL_RANK, MASTER_PORT, ...)
behind in rank 0's process. The next job of the sweep would then believe an outside launcher made
its ranks and reuse a process group whose other ranks have exited: `one_distributed_job` undoes both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Hydra's command-line flags that take a value as the next argument.
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
_MULTIRUN_FLAGS = {"-m", "--multirun"}


def job_command_line(argv: list[str], job_overrides: list[str]) -> list[str]:
    """argv with the sweep replaced by one job: Hydra's flags kept, `-m` and overrides dropped."""
    kept: list[str] = []
    arguments = iter(argv[1:])
    for argument in arguments:
        if argument in _MULTIRUN_FLAGS:
            continue
        if argument in _FLAGS_WITH_VALUE:
            kept += [argument, next(arguments, "")]
        elif argument.startswith("-"):
            kept.append(argument)
        # anything else is an override of the sweep: replaced by the job's own below
    return [argv[0], *kept, *job_overrides]


def relaunch_ranks_as_this_job() -> None:
    """Call at the start of a stage, before the Trainer launches its ranks. No-op outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return
    sys.argv = job_command_line(sys.argv, list(hydra.overrides.task))
    with read_write(hydra):  # type: ignore[arg-type]  # HydraConf is a DictConfig at run time
        hydra.run.dir = hydra.runtime.output_dir


_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def one_distributed_job() -> Iterator[None]:
    """Run one job; afterwards the process is as it was before it: no process group, no launch variables."""
    saved = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}
    try:
        yield
    finally:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
