"""`kiln <stage> [overrides]`: the one entry point.

It imports nothing heavy: `kiln --help` answers at once, and only the chosen stage's module (and
with it torch and Lightning) is imported. The stage then runs as a Hydra app, so everything after
the stage name is Hydra's: overrides, `--help`, `--cfg job`, `--info`, `-m`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from kiln import __version__

# stage name -> (module, one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "train": ("kiln.stages.train", "train with early stopping, then test the best checkpoint"),
    "search": (
        "kiln.stages.search",
        "Optuna search (TPE, pruning, shared storage); every trial a run (hparams_search=<name>)",
    ),
    "compress": ("kiln.stages.compress", "prune / quantize a run's best checkpoint, then export (run=<dir>)"),
    "export": (
        "kiln.stages.export",
        "verified, measured ONNX of each variant; ships the chosen one in the run (run=<dir>)",
    ),
    "predict": (
        "kiln.stages.predict",
        "onnxruntime only: model=<file.onnx> input=<csv|parquet|npy> output=<csv>",
    ),
    "report": (
        "kiln.stages.report",
        "one table of the runs under dir=<sweep or cv dir>, best first; writes runs.md, runs.csv",
    ),
    "tensorboard": (
        "kiln.stages.tensorboard",
        "serve the TensorBoard logs of the runs under dir=<run or sweep dir>",
    ),
}

USAGE = """\
usage: kiln <stage> [overrides...] [hydra flags]

stages:
{stages}

examples:
  kiln train experiment=digits_cnn                 the demo: digits CNN on CPU, a few minutes
  kiln train experiment=penguins_mlp trainer.max_epochs=50
  kiln train data=table data.path=cars.csv data.target=Miles_per_Gallon
  kiln train run_dir=runs/train/<run> resume=auto  continue a run from its last checkpoint
  kiln search hparams_search=digits_cnn            Bayesian search over the demo CNN
  kiln train -m hydra/launcher=slurm seed=1,2,3    three SLURM jobs, one table of results
  kiln train --cfg job                             print the composed config
  kiln train --help                                config groups and their options

kiln {version}. Every stage takes Hydra overrides (key=value, group=option, +new_key=value).
"""


def usage() -> str:
    width = max(len(name) for name in STAGES)
    stages = "\n".join(f"  {name.ljust(width)}  {description}" for name, (_, description) in STAGES.items())
    return USAGE.format(stages=stages, version=__version__)


def main(argv: list[str] | None = None) -> int:
    """Run `kiln <args>`; its exit code. Without `argv`, kiln owns the process (the `kiln` script,
    `python -m kiln`): a signal at any moment ends it with 130 / 143 and one line, and once the
    outcome is decided and said, later signals are ignored (the work is done; see interrupts.ignore).
    With `argv` (in-process callers) the handlers are kiln's only while it runs."""
    from kiln.interrupts import ignore, install, raising

    if argv is not None:
        with raising():
            return stopped_or_run(argv, settled=lambda: None)
    install()  # first thing: before this, a Ctrl-C is Python's KeyboardInterrupt
    try:
        return stopped_or_run(sys.argv[1:], settled=ignore)
    finally:
        ignore()


def stopped_or_run(args: list[str], settled: Callable[[], None]) -> int:
    """`run_command`, or the one line of a signal that came before the stage started, where no
    stage code was there yet to say what it kept."""
    from kiln.interrupts import Interrupted

    try:
        return run_command(args, settled)
    except (Interrupted, KeyboardInterrupt) as exc:
        stopped = exc if isinstance(exc, Interrupted) else Interrupted(signal_number("SIGINT"))
        print(f"kiln: {stopped_early(stopped, args)}", file=sys.stderr, flush=True)
        return stopped.exit_code


def signal_number(name: str) -> int:
    import signal

    return int(signal.Signals[name])


def run_command(args: list[str], settled: Callable[[], None]) -> int:
    """The stage's exit code; `settled` is called as soon as the stage has returned (its outcome
    is decided: a signal after that changes nothing)."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"kiln {__version__}")
        return 0
    name = args[0]
    if name not in STAGES:
        print(
            f"kiln: error: unknown stage '{name}'; stages: {', '.join(STAGES)} (kiln --help)", file=sys.stderr
        )
        return 2
    make_user_code_importable(args[1:])
    from kiln.interrupts import Interrupted

    received: list[int] = []
    returned: list[int] = []
    try:
        with noting(received):
            returned.append(run_stage(name, args))
        settled()
        code = returned[0]
    except (Interrupted, KeyboardInterrupt) as caught:  # said in one line: what was saved, how to continue
        if returned:  # came as kiln handed the stage's result back: the outcome stands
            settled()
            return returned[0]
        exc = caught if isinstance(caught, Interrupted) else Interrupted(signal_number("SIGINT"))
        print(f"kiln {name}: {exc.message or stopped_early(exc, args)}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Exception:
        if not received:
            raise  # a bug: its traceback
        code = 1
    if received and code != 0:
        import shlex

        # The signal's Interrupted was taken for an error by code on its way (a library that
        # catches BaseException, or an import it broke): still a signal, said and exited as one.
        stopped = Interrupted(received[0])
        print(
            f"kiln {name}: interrupted by {stopped.signal_name} (what it said above is the signal's doing); "
            f"run it again: kiln {shlex.join(args)}",
            file=sys.stderr,
            flush=True,
        )
        return stopped.exit_code
    return code


@contextmanager
def noting(received: list[int]) -> Iterator[None]:
    """Note each SIGINT / SIGTERM in `received`, then hand it to the handler in place (kiln.interrupts
    raises Interrupted). Inside `raising()`; training's own handlers replace these while it runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    inner: dict[int, Any] = {signum: signal.getsignal(signum) for signum in signals}

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        handler = inner[signum]
        if callable(handler):
            handler(signum, frame)

    previous = {signum: signal.signal(signum, note) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stopped_early(exc: BaseException, args: list[str]) -> str:
    """The line for a signal that came before the stage had started writing anything (while it
    started up, or composed its config): a stage that was writing says what it kept itself."""
    import shlex

    signal_name = getattr(exc, "signal_name", "a signal")
    return f"interrupted by {signal_name} before it wrote anything; run it again: kiln {shlex.join(args)}"


def run_stage(name: str, args: list[str]) -> int:
    module = importlib.import_module(STAGES[name][0])
    # Hydra reads sys.argv, without the stage name. Lightning re-launches ranks > 0 of a DDP run as
    # `python -m <__main__'s module> <argv[1:]>` (or `python <argv[0]> ...` when __main__ has no
    # module): both must name the stage's own module, whether kiln started as `kiln` or `python -m kiln`.
    sys.argv = [module.__file__ or name, *args[1:]]
    main_module = sys.modules["__main__"]
    if getattr(main_module, "__spec__", None) is not None:
        main_module.__spec__ = module.__spec__
    result: int = module.main()
    return result


def make_user_code_importable(args: list[str]) -> None:
    """The directory kiln starts from is importable, as it is for `python -m` (a `_target_:
    my_package.MyModule` run from the project), and so is the directory that holds a
    `--config-dir` (configs naming classes next to them). Also put in PYTHONPATH, so the
    processes kiln starts (DDP ranks, SLURM jobs, the API's stage processes) import the same."""
    directories = [os.getcwd()]
    config_dir = _option_value(args, ("--config-dir", "-cd"))
    if config_dir:
        directories.append(os.path.dirname(os.path.abspath(config_dir)))
    for directory in reversed(directories):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*directories, *inherited]))


def _option_value(args: list[str], names: tuple[str, ...]) -> str | None:
    for index, arg in enumerate(args):
        for name in names:
            if arg == name and index + 1 < len(args):
                return args[index + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


if __name__ == "__main__":
    sys.exit(main())
