"""Choosing accelerator and precision from the hardware that is there."""

from __future__ import annotations

import torch


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """`auto`: bf16-mixed on a GPU that supports it, 32-true everywhere else."""
    if str(precision) != "auto":
        return precision
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def with_resolved_precision(trainer_config: dict) -> dict:
    """The trainer config with `precision: auto` replaced by the choice for this hardware."""
    accelerator = str(trainer_config.get("accelerator", "auto"))
    return {
        **trainer_config,
        "precision": resolve_precision(trainer_config.get("precision", "auto"), accelerator),
    }


GPU_ACCELERATORS = ("gpu", "cuda")
# A trainer config of conf/trainer/ that runs on the CPU, for each one that needs a GPU.
CPU_TWIN = {"gpu": "cpu", "ddp": "ddp_cpu"}


def check_accelerator(trainer_config: dict, choice: str | None = None) -> None:
    """A GPU trainer (`trainer=gpu`, `trainer=ddp`, `trainer.accelerator=gpu`) where torch sees no
    GPU, or more GPUs than there are, is refused before anything is built, with the fix; Lightning
    says "No supported gpu backend found!" without naming the key. `choice` is the trainer group
    option (gpu, ddp, ...), for the message."""
    from kiln.errors import KilnError

    accelerator = trainer_config.get("accelerator")
    if not isinstance(accelerator, str):
        return  # auto is fine everywhere; an Accelerator object is the user's own choice
    accelerator = accelerator.lower()
    chosen = f" (trainer={choice})" if choice and choice != "default" else ""
    if accelerator == "mps" and not _mps_available():
        raise KilnError(
            f"trainer.accelerator=mps{chosen}: Apple's MPS is not available on this machine; "
            "train on the CPU with trainer=cpu, or let kiln choose with trainer.accelerator=auto"
        )
    if accelerator not in GPU_ACCELERATORS:
        return
    if not torch.cuda.is_available():
        if accelerator == "gpu" and _mps_available():
            return  # Lightning's gpu means MPS on Apple silicon
        why = (
            "this torch is a CPU-only build"
            if torch.version.cuda is None
            else "torch.cuda.is_available() is False"
        )
        cpu_option = CPU_TWIN.get(choice or "", "cpu")
        raise KilnError(
            f"trainer.accelerator={accelerator}{chosen}: no GPU is available here ({why}); train on the CPU with "
            f"trainer={cpu_option}, or let kiln choose with trainer.accelerator=auto (a GPU where there is one)"
        )
    devices = trainer_config.get("devices")
    count = torch.cuda.device_count()
    wanted = devices if isinstance(devices, int) and not isinstance(devices, bool) else None
    if isinstance(devices, list) and devices and all(isinstance(d, int) for d in devices):
        wanted = max(devices) + 1  # device indices
    if wanted is not None and wanted > count:
        raise KilnError(
            f"trainer.devices={devices}: this machine has {count} GPU{'s' if count != 1 else ''}; "
            f"set trainer.devices={count}, or trainer.devices=-1 for all of them"
        )


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
