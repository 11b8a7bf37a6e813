"""SLURM: submitting sweeps as jobs, checking they fit before submission, and knowing we are in one.

    kiln train -m hydra/launcher=slurm experiment=digits_cnn seed=1,2,3

Submission is hydra-submitit-launcher's (conf/hydra/launcher/slurm.yaml): one job array per sweep.
kiln adds what users otherwise trip over:

- The launcher asks for as many tasks per node as the trainer has devices (Lightning's
  SLURMEnvironment turns each task into one rank), and GPUs to match on a GPU trainer.
  `check_launcher_fits` refuses settings that cannot fit before anything is submitted
  (called by kiln.sweep.SweepCallback).
- A job's run directory is stable across requeues: the sweep directory is named once, in the
  submitting process, and travels to the jobs in KILN_RUN_NAME (config.py). A `kiln train`
  started inside an allocation is named slurm-<job id>, the allocation's next ones slurm-<job
  id>.2, .3, ...; after a requeue each command finds its own run again (kiln.runs.job_run_name).
- A URL password in the config reaches the jobs in the environment (KILN_SECRET_<KEY>, exported
  by sbatch), never in the pickles under .submitit/ (kiln.sweep.hide_secrets).
- kiln alone owns preemption and requeue (training/preemption.py): submitit's USR2 handler and
  Lightning's auto-requeue are both switched off inside a job, so the two never fight.
"""

from __future__ import annotations

import os
from typing import Any

from kiln.errors import KilnError

_INTERACTIVE_JOB_NAMES = ("bash", "interactive")


def in_slurm_job() -> bool:
    """True inside a batch job's task (srun or sbatch), not in an interactive allocation's shell."""
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in _INTERACTIVE_JOB_NAMES


def job_id() -> str:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array task, else the job id."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else os.environ["SLURM_JOB_ID"]


def is_requeued() -> bool:
    """SLURM counts restarts of a requeued job in SLURM_RESTART_COUNT."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def tasks_for(devices: Any) -> int:
    """Tasks per node for a trainer's `devices`: an int, a list of device ids, or auto / -1 (one)."""
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        return tasks_for(int(devices))
    return 1


def gpus_for(accelerator: Any, devices: Any) -> int | None:
    """GPUs per node to request: one per task on a GPU trainer, none on a CPU one."""
    return tasks_for(devices) if str(accelerator) in ("gpu", "cuda") else None


def job_devices(devices: Any) -> Any:
    """Inside a job, `devices: auto` (or -1) means one device per task SLURM started on this node."""
    if devices in ("auto", -1, "-1") and in_slurm_job():
        return int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    return devices


def job_threads() -> int | None:
    """The CPUs SLURM gave each task. Without task affinity (cgroups) torch would start one thread
    per core of the node in every job, and jobs sharing a node slow each other down many times."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(cpus) if cpus and cpus.isdigit() and in_slurm_job() else None


def check_launcher_fits(launcher: Any, trainer: Any) -> None:
    """Settings that cannot run, refused before submission, each with the fix."""
    tasks = launcher.get("tasks_per_node")
    gpus = launcher.get("gpus_per_node")
    devices, accelerator = trainer.get("devices"), str(trainer.get("accelerator"))
    explicit_devices = tasks_for(devices) if devices not in ("auto", -1, "-1") else None
    if not isinstance(tasks, int) or tasks < 1:
        raise KilnError(
            f"hydra.launcher.tasks_per_node={tasks}: must be a positive number (one task per device)"
        )
    if explicit_devices is not None and tasks != explicit_devices:
        raise KilnError(
            f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}: Lightning runs one rank per "
            f"SLURM task, so they must be equal; drop the tasks_per_node override (it follows trainer.devices)"
        )
    if accelerator in ("gpu", "cuda"):
        if not gpus:
            raise KilnError(
                f"hydra.launcher.gpus_per_node={gpus} on a GPU trainer (trainer.accelerator={accelerator}): "
                f"request the GPUs, e.g. hydra.launcher.gpus_per_node={tasks}"
            )
        if gpus < tasks:
            raise KilnError(
                f"trainer wants {tasks} GPUs per node but hydra.launcher.gpus_per_node={gpus}: "
                f"set hydra.launcher.gpus_per_node={tasks} or lower trainer.devices"
            )
    nodes = launcher.get("nodes")
    num_nodes = trainer.get("num_nodes", 1)
    if isinstance(nodes, int) and nodes != num_nodes:
        raise KilnError(
            f"hydra.launcher.nodes={nodes} but trainer.num_nodes={num_nodes}: they must be equal; "
            f"set both, e.g. hydra.launcher.nodes={nodes} +trainer.num_nodes={nodes}"
        )
