"""`kiln tensorboard`: serve the TensorBoard logs of one run, a folder of runs, or a sweep.

    kiln tensorboard dir=runs/train                    every run under runs/train
    kiln tensorboard dir=runs/train/<run>              one run
    kiln tensorboard dir=runs/train_multirun port=6006

Steps: find every `tensorboard/` directory with event files under `dir` -> name each after its
run directory (the path below `dir` where two runs share a name) -> start TensorBoard on loopback
(127.0.0.1, a free port unless `port=` is given) -> print the address -> serve until Ctrl-C.

Not a Hydra app, like `kiln predict`: it has two settings and no config tree, and without Hydra
there is no output directory to write and no torch to import (TensorBoard alone starts in ~2 s).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from kiln.errors import EXIT_USER_ERROR, KilnError, one_line
from kiln.runs import RunLayout

EVENTS = "events.out.tfevents.*"
DEFAULTS: dict[str, Any] = {"dir": None, "port": 0}  # port 0: the system picks a free one
USAGE = """usage: kiln tensorboard dir=<run or sweep directory> [port=<port>]

Serves every run's TensorBoard logs found under dir on http://127.0.0.1 (a free port unless
port= is given), each run named after its run directory. Ctrl-C stops it."""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    try:
        settings = read_settings(args)
        runs = find_runs(settings["dir"])
        serve(runs, settings["port"])
    except KilnError as exc:
        print(f"kiln tensorboard: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


def read_settings(args: list[str]) -> dict[str, Any]:
    from kiln.arguments import key_value_settings

    settings = key_value_settings(args, DEFAULTS, "tensorboard", USAGE.splitlines()[0], example_key="dir")
    if not settings["dir"]:
        raise KilnError("dir: give a run or sweep directory to serve, e.g. kiln tensorboard dir=runs/train")
    try:
        port = int(settings["port"])
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise KilnError(f"port={settings['port']}: must be an integer from 1 to 65535, or 0 for a free port")
    settings["port"] = port
    return settings


def find_runs(directory: str | Path) -> dict[str, Path]:
    """Run name -> its tensorboard/ directory, for every one under `directory` holding event files."""
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise KilnError(f"dir={directory}: no such directory; give a run or sweep directory, e.g. runs/train")
    logs_name = RunLayout.TENSORBOARD  # where conf/logger/tensorboard.yaml puts a run's event files
    candidates = [root] if root.name == logs_name else sorted(root.rglob(logs_name))
    logs = [d for d in candidates if d.is_dir() and next(d.rglob(EVENTS), None) is not None]
    if not logs:
        raise KilnError(
            f"dir={directory}: no TensorBoard event files under {root}; "
            "give a directory that holds kiln runs (their tensorboard/ folders), e.g. runs/train"
        )
    return name_runs(root, logs)


def name_runs(root: Path, logs: list[Path]) -> dict[str, Path]:
    """Each run is named after its run directory; where names repeat (job 0 of two sweeps), after its
    path below `root`. `:` and `,` separate entries of TensorBoard's --logdir_spec, so they go."""

    def clean(name: str) -> str:
        return name.replace(":", "_").replace(",", "_")

    runs = [log.parent for log in logs]  # <run dir>/tensorboard -> <run dir>
    short = [clean(run.name) for run in runs]
    names = [
        name
        if short.count(name) == 1 or not run.is_relative_to(root)
        else clean(run.relative_to(root).as_posix())
        for name, run in zip(short, runs, strict=True)
    ]
    for log in logs:
        if "," in str(log):
            raise KilnError(
                f"{log}: TensorBoard cannot serve a path with a comma in it; rename the directory"
            )
    return dict(zip(names, logs, strict=True))


def serve(runs: dict[str, Path], port: int) -> None:
    """Start TensorBoard in this process and block until Ctrl-C (or SIGTERM)."""
    try:
        from tensorboard import program
    except ImportError as exc:
        raise KilnError(f"tensorboard is not installed ({exc}); pip install tensorboard") from exc

    board = program.TensorBoard()
    spec = ",".join(f"{name}:{path}" for name, path in runs.items())
    # --load_fast=false: the Rust data server does not take --logdir_spec; reload every 5 s so a run
    # still training shows its new epochs.
    address = ["--host", "127.0.0.1", "--port", str(port)]
    board.configure(
        argv=["", "--logdir_spec", spec, *address, "--load_fast", "false", "--reload_interval", "5"]
    )
    try:
        url = board.launch()
    except program.TensorBoardServerException as exc:
        raise KilnError(f"port={port}: {exc.msg}; pick another port, or port=0 for a free one") from exc
    for name, path in runs.items():
        print(f"  {name}  {path}", flush=True)
    print(f"kiln tensorboard: {url.rstrip('/')} (Ctrl-C stops it)", flush=True)
    from kiln.interrupts import Interrupted

    signal.signal(signal.SIGTERM, _stop)  # `kill` stops it as cleanly as Ctrl-C
    try:
        while True:  # the server runs in a daemon thread; this one only waits
            time.sleep(3600)
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C or kill: the way to stop a server, exit 0
        print("kiln tensorboard: stopped", flush=True)


def _stop(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
