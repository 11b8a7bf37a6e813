"""Checkpoints that are written whole or not at all, and read without unpickling objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kiln.errors import KilnError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temp file, then rename: a run killed mid-save keeps its previous last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, temp)
        os.replace(temp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, loaded with weights_only=True (no arbitrary objects are unpickled)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise KilnError(
            f"checkpoint {path} cannot be read ({reason}); it may be truncated or not a checkpoint: "
            "use another one (e.g. checkpoints/best.ckpt) or start fresh"
        ) from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise KilnError(
            f"checkpoint {path} has no model weights (no 'state_dict'); it is not a Lightning checkpoint"
        )
    return checkpoint


def check_fits(path: Path, checkpoint: dict[str, Any], model: torch.nn.Module) -> None:
    """The checkpoint's weights must have this model's names and shapes (else: name the first misfit)."""
    saved: dict[str, torch.Tensor] = checkpoint["state_dict"]
    expected = model.state_dict()
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    mismatched = [
        (name, tuple(saved[name].shape), tuple(tensor.shape))
        for name, tensor in expected.items()
        if name in saved and tuple(saved[name].shape) != tuple(tensor.shape)
    ]
    if mismatched:
        name, theirs, ours = mismatched[0]
        raise KilnError(
            f"checkpoint {path} is from another model: {name} has shape {theirs} there but {ours} here "
            f"({len(mismatched)} mismatched tensors); resume with the model and data config it was trained with"
        )
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        raise KilnError(
            f"checkpoint {path} is from another model: {'missing' if missing else 'unexpected'} weights "
            f"{', '.join(names)}; resume with the model and data config it was trained with"
        )
