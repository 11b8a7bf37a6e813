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
