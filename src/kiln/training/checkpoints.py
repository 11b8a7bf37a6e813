"""Checkpoints that are written whole or not at all, read without unpickling objects, and the one
a run resumes from."""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kiln.errors import KilnError
from kiln.runs import RunLayout

if TYPE_CHECKING:
    from kiln.runs import Run


def _usable_checkpoints() -> str:
    """Where a run's checkpoints are, as the user is told to look."""
    example = RunLayout(Path("<run_dir>"))
    return f"{example.best_checkpoint} or {example.LAST_CHECKPOINT}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temp file, then rename: a run killed mid-save keeps its previous last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        from kiln.runs import mask_secrets, replacing

        path = Path(path)
        check_finite_weights(checkpoint, path)
        # what save_hyperparameters kept (a URL with a password) is never written in clear, even
        # where Lightning skips the callbacks' save hooks (save_weights_only)
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = mask_secrets(checkpoint[key])
        from kiln.errors import TORCH_WRITE_FAILURES, write_failure

        try:
            with replacing(path) as temp:
                torch.save(checkpoint, temp)
        except RuntimeError as exc:  # torch's C++ writer: a full disk or a file size limit, no errno
            if not any(marker in str(exc) for marker in TORCH_WRITE_FAILURES):
                raise
            raise write_failure(path, exc) from exc


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
        refused = refused_objects(Path(path), exc)
        if refused is not None:
            # Never pass on torch's advice to load it with weights_only=False: that runs the file's code.
            raise KilnError(
                f"{where} holds objects kiln will not unpickle ({refused}): unpickling them could run "
                "arbitrary code, so kiln loads only tensors and plain values; use a checkpoint saved by "
                f"Lightning or kiln (e.g. {_usable_checkpoints()}), and treat this file as untrusted"
            ) from None
        raise KilnError(
            f"{where} cannot be read ({_unreadable_reason(Path(path), exc)}); "
            f"use another checkpoint (e.g. {_usable_checkpoints()}) or start fresh"
        ) from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise KilnError(
            f"{where} has no model weights (no 'state_dict'): it is not a Lightning checkpoint; "
            f"give a .ckpt file that kiln train wrote ({RunLayout(Path('<run_dir>')).checkpoints}/)"
        )
    return checkpoint


# torch's weights-only unpickler names what it refused in one of these forms.
_REFUSED = (
    re.compile(r"Unsupported global: GLOBAL ([\w.]+)"),
    re.compile(r"unsupported GLOBAL ([\w.]+)"),
    re.compile(r"Unsupported class ([\w.]+)"),
)
# Modules whose names a checkpoint of tensors and plain values imports (torch's rebuild functions).
_SAFE_MODULES = ("torch", "collections", "builtins", "_codecs", "numpy")
_SCAN_LIMIT = 64 * 2**20  # bytes of pickle to scan for the names it imports


def refused_objects(path: Path, exc: Exception) -> str | None:
    """What a file that torch.load(weights_only=True) refused would import when unpickled
    (`posix.system`), or None if it was refused for another reason (damage, not a checkpoint)."""
    message = str(exc)
    if "Weights only load failed" not in message and not isinstance(exc, pickle.UnpicklingError):
        return None
    for pattern in _REFUSED:
        found = pattern.search(message)
        if found:
            return found.group(1)
    names = _imported_names(path)
    unsafe = [name for name in names if not name.startswith(_SAFE_MODULES)]
    if unsafe:
        return ", ".join(dict.fromkeys(unsafe))
    return None


def _imported_names(path: Path) -> list[str]:
    """The `module.name`s a pickle (a torch zip's data.pkl, or a bare pickle file) would import;
    read with pickletools, which parses the opcodes and runs nothing."""
    import io
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None or archive.getinfo(member).file_size > _SCAN_LIMIT:
                    return []
                data = archive.read(member)
        else:
            if path.stat().st_size > _SCAN_LIMIT:
                return []
            data = path.read_bytes()
        names: list[str] = []
        strings: list[str] = []
        for opcode, argument, _ in pickletools.genops(io.BytesIO(data)):
            if opcode.name == "GLOBAL" and isinstance(argument, str):
                names.append(argument.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(argument, str):
                strings.append(argument)
            if opcode.name == "STOP":
                break
        return names
    except Exception:  # not a pickle at all, or a damaged one: nothing to name
        return []


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


def epochs_trained(checkpoint: dict[str, Any]) -> int:
    """Whole epochs a checkpoint has trained: the fit loop's processed epochs (its `epoch` field is
    the epoch it was saved in, whether or not that epoch had ended)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    processed = progress.get("processed")
    if isinstance(processed, int):
        return processed
    epoch = checkpoint.get("epoch")
    return int(epoch) if isinstance(epoch, int) else 0


def stopped_early(checkpoint: dict[str, Any]) -> int | None:
    """For a checkpoint saved after early stopping ended its run: the epochs it had waited
    without improvement; None if early stopping did not stop it."""
    for name, state in (checkpoint.get("callbacks") or {}).items():
        if str(name).startswith("EarlyStopping") and isinstance(state, dict) and state.get("stopped_epoch"):
            waited = state.get("wait_count")
            return int(waited) if isinstance(waited, int) else None
    return None


def _its_config(path: Path) -> str:
    """Where the config of the run that wrote a checkpoint lies (<run_dir>/checkpoints/x.ckpt)."""
    config = RunLayout(path.resolve().parent.parent).saved_config
    return f" (saved in {config})" if config.is_file() else ""


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
        saved = [p for p in (run.layout.last_checkpoint, run.layout.preempted_checkpoint) if p.exists()]
        path = max(saved, key=lambda p: p.stat().st_mtime_ns) if saved else run.layout.last_checkpoint
        if not saved:
            print(f"kiln: resume=auto: no checkpoint in {run.checkpoints}, starting fresh", file=sys.stderr)
            return None
    else:
        path = Path(resume)
        if not path.is_file():
            raise KilnError(
                f"resume={resume}: no such checkpoint file; give a .ckpt file or resume=auto with run_dir=..."
            )
    checkpoint = load_checkpoint(path, key="resume")
    if check is not None:
        check(path, checkpoint)
    print(f"kiln: resuming from {path}", file=sys.stderr)
    return path
