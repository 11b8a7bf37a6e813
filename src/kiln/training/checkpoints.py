"""Checkpoints that are written whole or not at all, and read without unpickling objects."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kiln.errors import KilnError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temp file, then rename: a run killed mid-save keeps its previous last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        from kiln.runs import replacing

        path = Path(path)
        check_finite_weights(checkpoint, path)
        with replacing(path) as temp:
            torch.save(checkpoint, temp)


def check_finite_weights(checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse to save NaN or infinite weights: they would replace a good last.ckpt with a useless one."""
    state = checkpoint.get("state_dict") or {}
    bad = next(
        (
            name
            for name, tensor in state.items()
            if isinstance(tensor, torch.Tensor)
            and tensor.is_floating_point()
            and not torch.isfinite(tensor).all()
        ),
        None,
    )
    if bad is None:
        return
    epoch, step = checkpoint.get("epoch"), checkpoint.get("global_step")
    raise KilnError(
        f"the weights became NaN or infinite ({bad}) in epoch {epoch + 1 if epoch is not None else '?'} "
        f"(step {step}): the run diverged; likely causes: a learning rate too high (model.optimizer.lr), "
        "unscaled inputs, or overflow in low precision; lower the learning rate or set "
        f"model.gradient_clip_val=1.0. {path.name} was not overwritten: checkpoints saved so far are kept in "
        f"{path.parent}"
    )


def load_checkpoint(path: Path, key: str | None = None) -> dict[str, Any]:
    """A checkpoint's contents, loaded with weights_only=True (no arbitrary objects are unpickled).

    `key` names the config key the path came from (`resume`), for the message if it cannot be read.
    """
    where = f"{key}={path}: checkpoint" if key else f"checkpoint {path}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KilnError(
            f"{where} cannot be read ({_unreadable_reason(Path(path), exc)}); "
            "use another checkpoint (e.g. <run_dir>/checkpoints/best.ckpt or last.ckpt) or start fresh"
        ) from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise KilnError(
            f"{where} has no model weights (no 'state_dict'): it is not a Lightning checkpoint; "
            "give a .ckpt file that kiln train wrote (<run_dir>/checkpoints/)"
        )
    return checkpoint


def _unreadable_reason(path: Path, exc: Exception) -> str:
    """Why torch.load failed, in words: torch's own message for garbage is about `weights_only`."""
    if path.stat().st_size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return "not a PyTorch checkpoint: the file is not a zip archive, so it is truncated or another kind of file"
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    return f"a damaged PyTorch checkpoint: {first}"


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
    fix = f"resume with the model and data config it was trained with{_its_config(Path(path))}"
    if mismatched:
        name, theirs, ours = mismatched[0]
        raise KilnError(
            f"checkpoint {path} is from another model: {name} has shape {theirs} there but {ours} here "
            f"({len(mismatched)} mismatched tensors); {fix}"
        )
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        raise KilnError(
            f"checkpoint {path} is from another model: {'missing' if missing else 'unexpected'} weights "
            f"{', '.join(names)}; {fix}"
        )


def _its_config(path: Path) -> str:
    """Where the config of the run that wrote a checkpoint lies (<run_dir>/checkpoints/x.ckpt)."""
    config = path.resolve().parent.parent / ".hydra" / "config.yaml"
    return f" (saved in {config})" if config.is_file() else ""
