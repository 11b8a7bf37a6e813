"""Ctrl-C and `kill`: stop at a safe point, keep what is saved, say how to continue, exit as shells do.

A kiln command stopped by SIGINT (Ctrl-C) or SIGTERM (`kill`, `timeout`, a scheduler) ends with
one line on stderr saying what happened and how to continue, exit code 130 or 143 (128 + the
signal, as shells report it), and the run's record saying `interrupted`:

    kiln train: interrupted by SIGTERM at epoch 3, step 5: saved checkpoints/preempted.ckpt;
    continue it with: kiln train run_dir=runs/train/... resume=auto

While a stage runs (`raising`), a signal raises `Interrupted` where the program stands: every file
kiln writes is written through a temp file and a rename, so an interrupted write leaves the old
file or none. While training runs, `training.callbacks.StopOnSignal` takes over and stops at the
next step boundary instead, after saving a checkpoint to resume from exactly.

Inside a SLURM job during training, SIGTERM is preemption's (kiln.training.preemption): it saves
and the job is requeued, as before.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stage stopped by a signal. A BaseException, like KeyboardInterrupt: no `except Exception`
    on the way takes it for an error of its own, and Lightning's KeyboardInterrupt handling (which
    exits with 1 and says nothing) never sees it."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = signum
        self.message = message
        super().__init__(message or self.signal_name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def said(self, message: str) -> Interrupted:
        """The same interruption, with what was saved and how to continue."""
        return Interrupted(self.signum, message)


_owner: list[int] = []  # the pid that installed the handlers: forked DataLoader workers inherit them


def in_worker() -> bool:
    """True in a process forked from the one that installed kiln's handlers (a DataLoader worker):
    there Ctrl-C stays a KeyboardInterrupt, which torch's worker loop expects and ends quietly."""
    return bool(_owner) and os.getpid() != _owner[-1]


def _raise(signum: int, _frame: FrameType | None) -> None:
    if in_worker():
        raise KeyboardInterrupt
    raise Interrupted(signum)


@contextmanager
def raising() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` for as long as the block runs (main thread only:
    Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _owner.append(os.getpid())
    previous = {signum: signal.signal(signum, _raise) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _owner.pop()
        _deferred.clear()  # a command's kept signal is its own, not the next in-process command's


def install() -> None:
    """For a process kiln owns (`kiln`, `python -m kiln`), first thing: SIGINT and SIGTERM raise
    `Interrupted` from now on, never taken out again. Until then Python's own handling rules:
    SIGINT raises KeyboardInterrupt and SIGTERM kills the process before it can say anything."""
    if threading.current_thread() is threading.main_thread():
        _owner.append(os.getpid())
        for signum in SIGNALS:
            signal.signal(signum, _raise)


def ignore() -> None:
    """For a process kiln owns, once its outcome is decided and said: a later signal changes
    nothing. Ignored, it cannot kill the interpreter as it shuts down (Python restores the default
    handlers there, and a SIGINT then ends the process as killed by it, after kiln said it finished)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


_deferred: list[int] = []  # a signal that came when stopping would have lost more than finishing


def defer(signum: int) -> None:
    """Keep a signal to act on at the next safe point (`take_deferred`): training's last epoch is
    saved, and its test is what makes the run whole."""
    _deferred.append(signum)


def take_deferred() -> int | None:
    """The signal kept by `defer`, if any (SIGTERM before SIGINT), now forgotten."""
    signums = sorted(set(_deferred), key=lambda signum: signum != signal.SIGTERM)
    _deferred.clear()
    return signums[0] if signums else None


@contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends: for the few renames that must happen
    together (a directory swap; a new model.onnx with its report). A signal that came meanwhile
    is delivered again right after, to whatever handled it before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, _frame: received.append(signum)) for signum in SIGNALS
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            os.kill(os.getpid(), received[0])
