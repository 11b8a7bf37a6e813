"""Preemption on SLURM: save exactly where training stands, requeue, and carry on from there.

SLURM warns a job before it takes the node away: USR2 `signal_delay_s` before the time limit (the
`--signal` submitit writes into the job script), `scancel --signal=USR2` from an operator, or
SIGTERM when the job is requeued (`scontrol requeue`) or cancelled; SIGKILL follows after KillWait.

kiln alone owns requeue. On the signal, `Preemption` lets the current training step finish (a
handler that saved in the middle of a step would save half an update), saves
`checkpoints/preempted.ckpt`, requeues the job when the warning came before the time limit (after
SIGTERM SLURM is already requeueing or cancelling it), and waits to be stopped. The requeued job
resumes from that file (`kiln train` picks the newest of last.ckpt and preempted.ckpt) with the
random number generators and the position inside the epoch restored, so it ends exactly as an
uninterrupted run would.

Neither of the other candidates can do this: submitit's USR2 handler resubmits the job function
from its start, and Lightning's auto-requeue saves from inside the signal handler, mid-step.
Both are switched off in a kiln job (submitit's handler is replaced while training runs; Lightning
gets `SLURMEnvironment(auto_requeue=False)`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch

from kiln.errors import KilnError
from kiln.interrupts import Interrupted, defer
from kiln.runs import RunLayout, mask_secrets
from kiln.slurm import job_id

log = logging.getLogger(__name__)  # to stderr and the run's log file

PREEMPTED_CHECKPOINT = RunLayout.PREEMPTED_CHECKPOINT  # today's name, for code that imported it here
# The warning signal (submitit's `--signal=USR2@delay`) and SLURM's stop signal.
_WARNING, _STOP = signal.SIGUSR2, signal.SIGTERM
_RNG_KEY = "kiln_rng_states"
_POSITION_KEY = "kiln_epoch_position"


def mask_logged_hyperparameters(logger: Any) -> None:
    """Mask URL passwords in whatever `logger.log_hyperparams` is given (kiln.runs.mask_secrets).
    Lightning hands hyperparameters straight to each logger, with no public hook to filter them
    first, so the logger's own method is wrapped (tests/test_public_apis.py checks that it works)."""
    if not isinstance(logger.log_hyperparams, _MaskedLogHyperparams):
        logger.log_hyperparams = _MaskedLogHyperparams(logger.log_hyperparams)


class _MaskedLogHyperparams:
    """A logger's log_hyperparams that masks URL passwords first."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        return self.original(mask_secrets(params), *args, **kwargs)


class ExactResume(L.Callback):
    """Puts into every checkpoint what a resume needs to continue exactly as an uninterrupted run:
    the random number generators (dropout draws) and, for a save inside an epoch, how far into
    the epoch training was. It also keeps URL passwords out of what Lightning writes from
    hyperparameters: the checkpoint's `hyper_parameters`, hparams.yaml and TensorBoard's hparams."""

    def __init__(self) -> None:
        self._chunks_done: int | None = None  # set while saving inside an epoch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before Lightning logs the module's and the datamodule's hyperparameters (hparams.yaml,
        # TensorBoard): a user's component may take a URL with a password.
        for logger in trainer.loggers:
            mask_logged_hyperparameters(logger)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        kept = ("state_dict", "optimizer_states")
        # hyper_parameters and the like, masked in one call: one look at the environment's secrets
        checkpoint.update(mask_secrets({key: value for key, value in checkpoint.items() if key not in kept}))
        checkpoint[_RNG_KEY] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        if self._chunks_done is not None:
            checkpoint[_POSITION_KEY] = {"epoch": trainer.current_epoch, "chunks_done": self._chunks_done}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get(_RNG_KEY)
        if states is not None:
            torch.set_rng_state(states["torch"])
            if states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
        position = checkpoint.get(_POSITION_KEY)
        datamodule: Any = getattr(trainer, "datamodule", None)
        if position is not None and hasattr(datamodule, "resume_train_chunks"):
            # the epoch goes on after the chunks it had already trained on
            datamodule.resume_train_chunks = position["chunks_done"]


def drop_superseded(preempted: Path) -> None:
    """A preempted.ckpt older than the last.ckpt beside it is a resume that has since trained past
    it (`resume=auto` takes the newer file): keeping it only costs a checkpoint's size on disk."""
    last = preempted.with_name(RunLayout.LAST_CHECKPOINT)
    if preempted.is_file() and last.is_file() and last.stat().st_mtime_ns > preempted.stat().st_mtime_ns:
        preempted.unlink()


class SavesOnSignal(ExactResume):
    """On one of `signals`, let the current training step finish, save `checkpoints/preempted.ckpt`
    there (every rank at the same step: a save under DDP is collective), then `after_save`."""

    signals: tuple[int, ...] = ()

    def __init__(self, checkpoint_dir: Path) -> None:
        super().__init__()
        self.checkpoint_path = Path(checkpoint_dir) / RunLayout.PREEMPTED_CHECKPOINT
        self.received: int | None = None
        self._pid = os.getpid()
        self._previous_handlers: dict[int, Any] = {}

    # -- signals: only note the request; the work happens at the next step boundary --------------

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None or signum == _STOP:
            self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in on_fit_start: Lightning installs its own handlers after on_fit_start.
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._note)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self.received is None and trainer.is_global_zero:
            drop_superseded(self.checkpoint_path)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last step: a save here would resume into an epoch with no steps left,
            # which Lightning ends without validating. The epoch ends (validated), then saves.
            return
        if not self._requested_on_any_rank(trainer, pl_module):
            return
        self._chunks_done = batch_idx + 1
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # collective under DDP
        self._chunks_done = None
        self.after_save(trainer, batch_idx + 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After validation: a save here resumes at the next epoch, as an end-of-epoch checkpoint does.
        if not self._requested_on_any_rank(trainer, pl_module):
            return
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
        self.after_save(trainer, None)

    def after_save(self, trainer: L.Trainer, steps_done: int | None) -> None:
        """`steps_done` of the epoch when the save was inside it; None at its end."""
        raise NotImplementedError

    @staticmethod
    def where(trainer: L.Trainer, steps_done: int | None) -> str:
        epoch = trainer.current_epoch + 1
        return f"at epoch {epoch}, step {steps_done}" if steps_done else f"at the end of epoch {epoch}"

    def _requested_on_any_rank(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        requested = self.received is not None
        if trainer.world_size > 1:  # every rank must save at the same step, or the save deadlocks
            flag = torch.tensor([1.0 if requested else 0.0], device=pl_module.device)
            requested = bool(trainer.strategy.reduce(flag, reduce_op="max").item() > 0)
            if requested and self.received is None:
                self.received = _STOP
        return requested


class StopOnSignal(SavesOnSignal):
    """Outside SLURM: Ctrl-C or SIGTERM stops training at the next step boundary, after saving a
    checkpoint that `resume=auto` continues from exactly (kiln.interrupts). A second Ctrl-C
    stops at once."""

    signals = (signal.SIGINT, signal.SIGTERM)

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: Ctrl-C ends it as torch expects
            raise KeyboardInterrupt
        if self.received is not None and signum == signal.SIGINT:
            raise Interrupted(signum)  # asked twice: do not wait for the step
        super()._note(signum, _frame)

    def after_save(self, trainer: L.Trainer, steps_done: int | None) -> None:
        assert self.received is not None
        raise Interrupted(
            self.received,
            f"interrupted by {signal.Signals(self.received).name} {self.where(trainer, steps_done)}: "
            f"saved {self.checkpoint_path}",
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.received is not None:  # came as training ended: it is whole; its test makes the run whole
            defer(self.received)  # kiln train stops once the test is recorded (stages/train.py)
            log.warning(
                f"kiln: {signal.Signals(self.received).name} came as training ended; testing the best "
                "checkpoint, then stopping (send it again to stop now)"
            )


class Preemption(SavesOnSignal):
    """In a SLURM job: on USR2 or SIGTERM, save preempted.ckpt at the next step boundary, requeue
    (after the time-limit warning), and wait for SLURM to stop the job."""

    signals = (_WARNING, _STOP)

    def __init__(self, checkpoint_dir: Path, stopped_within_s: float = 600.0) -> None:
        super().__init__(checkpoint_dir)
        self.stopped_within_s = stopped_within_s

    def after_save(self, trainer: L.Trainer, steps_done: int | None) -> None:
        reason = "warned of the time limit" if self.received == _WARNING else "stopped by SLURM"
        if trainer.is_global_zero:
            log.warning(
                f"kiln: preempted ({reason}) {self.where(trainer, steps_done)}; saved {self.checkpoint_path}"
            )
            if self.received == _WARNING:
                self._requeue()
        self._wait_to_be_stopped()

    def _requeue(self) -> None:
        job = job_id()
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            raise KilnError(
                f"preempted and saved {self.checkpoint_path}, but `scontrol requeue {job}` failed "
                f"({result.stderr.strip()}); resubmit and it resumes from there"
            )
        log.warning(f"kiln: requeued SLURM job {job}; it resumes from {self.checkpoint_path}")

    def _wait_to_be_stopped(self) -> None:
        # Exiting would let submitit record a result (an error) for a job SLURM is about to restart.
        deadline = time.monotonic() + self.stopped_within_s
        while time.monotonic() < deadline:
            time.sleep(1.0)
        raise KilnError(
            f"preempted and saved {self.checkpoint_path}, but SLURM did not stop the job within "
            f"{self.stopped_within_s:.0f} s; resubmit and it resumes from there"
        )
