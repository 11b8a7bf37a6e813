"""Fault cases in a loop: signals at random points of kiln's stages, two writers on one run.

    python scripts/stress.py --iterations 5      (scripts/stress.sh N runs this)

Each iteration, in a fresh temp directory, on tiny configs:
  1. `kiln train` stopped by SIGINT, SIGTERM or SIGKILL at a random moment (start-up, training,
     testing or export); after a SIGKILL, `resume=auto` must finish the run.
  2. two `kiln train` on one run_dir at once: one trains, the other is refused (or, if it came
     after the end, refused as a completed run); never two writers.
  3. `kiln compress`, 4. `kiln export` and 5. `kiln predict` on that run, each stopped by a random
     signal at a random moment; after a SIGKILL the same command runs again to the end
     (`--quick`: 3 and 4 left out).
After each iteration every run directory must be either completed and consistent (run.json, its
best checkpoint, report.json, model.onnx and every exported file agree: config hash, epoch, the
shipped variant) or resumable (interrupted / failed / running with its saved config, and a
checkpoint to resume from or none trained yet), no temp file may be left (`*.tmp*`,
`.export.tmp-*`, `.compress.tmp-*`, a swap's `.old-*`), and predictions are whole or absent.

The moments are random delays (this is a stress script, not a test); the checks are exact.
Prints `iterations=N consistent=C lost=L` last; exits 1 unless every iteration was consistent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data=digits",
    "model=mlp",
    "model.net.hidden_sizes=[16]",
    "progress=lines",
    "export.latency_repeats=3",
]
TRAIN = [*TINY, "trainer.max_epochs=4", "compress=none"]  # exports the fp32 model after testing
FAULTS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
EXPECTED_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}


class Lost(Exception):
    """A run directory that is neither complete and consistent nor resumable."""


def kiln(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln", *args]


def run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(kiln(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def interrupt(args: list[str], cwd: Path, rng: random.Random, latest: float) -> tuple[int, int, str, str]:
    """Start `kiln <args>`, send a random fault after a random delay of up to `latest` seconds;
    (signal, exit code, stderr, what happened). A process that ended first just ends (exit code as
    it is; said as 'finished before SIGINT', so that an exit 0 is not taken for a lost signal)."""
    fault = rng.choice(FAULTS)
    process = subprocess.Popen(
        kiln(*args), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    name = signal.Signals(fault).name
    try:
        process.wait(timeout=rng.uniform(0, latest))
        happened = f"finished before {name}"
    except subprocess.TimeoutExpired:
        process.send_signal(fault)
        happened = name
    _, stderr = process.communicate(timeout=900)
    return fault, process.returncode, stderr, f"{happened} -> exit {process.returncode}"


def check_exit(what: str, fault: int, code: int, stderr: str) -> None:
    """Stopped by the fault (130, 143, or killed), or finished before it (0): nothing else. A
    signal that comes while the interpreter itself starts, before any handler is in place, ends the
    process as the signal's default does (-2, -15: shells report 130, 143), with nothing written."""
    if code == -fault and (not stderr.strip() or stderr.strip().endswith("KeyboardInterrupt")):
        return
    if code not in (0, EXPECTED_CODES[fault]):
        raise Lost(f"{what}: exit {code} after {signal.Signals(fault).name}:\n{stderr[-2000:]}")
    if code in (130, 143):
        last = (stderr.strip().splitlines() or [""])[-1]
        if "interrupted by" not in last or "Traceback" in stderr:
            raise Lost(f"{what}: exit {code} without the one line saying how to continue:\n{stderr[-2000:]}")


# -- the checks ------------------------------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if ".tmp" in p.name or ".old-" in p.name
    )


def onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in model.metadata_props}


def checkpoint_epoch(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"]) + 1


def is_checkpoint(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)  # torch.save writes a zip archive


def check_run(directory: Path) -> str:
    """'completed' (consistent) or 'resumable'; raises Lost otherwise."""
    from kiln.runs import RunDirectory

    left = leftovers(directory)
    if left:
        raise Lost(f"{directory}: temp files left: {', '.join(left)}")
    if not (directory / "run.json").exists():
        trained = [p.name for p in (directory / "checkpoints").glob("*.ckpt")] if directory.is_dir() else []
        if trained:
            raise Lost(f"{directory}: checkpoints {trained} but no run.json")
        return "resumable"  # nothing trained yet: resume=auto starts fresh
    try:
        run = RunDirectory.read(directory)
    except Exception as exc:
        raise Lost(f"{directory}: unreadable: {exc}") from exc
    record = run.record
    if run.status != "completed":
        if run.status not in ("running", "interrupted", "failed"):
            raise Lost(f"{directory}: status {run.status!r}")
        saved = [directory / "checkpoints" / n for n in ("last.ckpt", "preempted.ckpt")]
        if any(p.exists() and not is_checkpoint(p) for p in saved):
            raise Lost(f"{directory}: a damaged checkpoint to resume from")
        if record.get("best_checkpoint") and not is_checkpoint(directory / "checkpoints" / "best.ckpt"):
            raise Lost(f"{directory}: run.json names a best checkpoint that is not there")
        return "resumable"
    best = run.best_checkpoint
    if best is None or not is_checkpoint(best):
        raise Lost(f"{directory}: completed without its best checkpoint")
    if checkpoint_epoch(best) != record["best_checkpoint"]["epoch"]:
        raise Lost(f"{directory}: best.ckpt's epoch is not run.json's")
    if not (directory / ".hydra" / "config.yaml").is_file():
        raise Lost(f"{directory}: completed without its saved config")
    check_delivery(run)
    return "completed"


def check_delivery(run: Any) -> None:
    directory, wanted = run.directory, run.config_hash
    for path in [*sorted((directory / "export").glob("*.onnx")), directory / "model.onnx"]:
        if path.exists() and onnx_metadata(path).get("kiln.config_hash") != wanted:
            raise Lost(f"{path}: config hash is not run.json's {wanted}")
    report = run.report
    if report is not None and report.get("config_hash") != wanted:
        raise Lost(f"{directory}/report.json: config hash is not run.json's")
    delivery = run.delivery or {}
    if delivery.get("status") == "passed":
        if run.model_path is None or report is None:
            raise Lost(f"{directory}: delivery passed without model.onnx and report.json")
        variant = onnx_metadata(run.model_path).get("kiln.variant")
        if not (variant == delivery.get("shipped") == report.get("shipped")):
            raise Lost(
                f"{directory}: shipped {delivery.get('shipped')!r} (run.json), {report.get('shipped')!r} "
                f"(report.json), model.onnx is {variant!r}"
            )
    elif delivery and delivery.get("status") not in ("interrupted", "failed"):
        raise Lost(f"{directory}: delivery status {delivery.get('status')!r}")


def check_predictions(
    output: Path, before: bytes | None, rows: int, finished: bool, killed: bool = False
) -> None:
    """Whole or absent: a finished predict wrote every row; a stopped one left the earlier file
    (or none) or, stopped after its rename, every row. Only a killed one may leave its temp file
    (the next predict removes it)."""
    if not killed and any(p.name.endswith(".tmp") for p in output.parent.iterdir()):
        raise Lost(f"{output.parent}: a temp file of the predictions was left")
    if not output.exists():
        if finished or before is not None:
            raise Lost(
                f"{output}: missing (finished: {finished}; an earlier file existed: {before is not None})"
            )
        return
    data = output.read_bytes()
    whole = len(data.decode().strip().splitlines()) == rows + 1
    if not whole and (finished or data != before):
        raise Lost(f"{output}: partial predictions ({len(data.splitlines()) - 1} of {rows} rows)")


# -- one iteration ---------------------------------------------------------------------------------


def iteration(work: Path, rng: random.Random, say: Any, quick: bool = False) -> None:
    # 1. training stopped anywhere: start-up, an epoch, testing, the export after it. A SIGKILL
    #    gets no say: what it left must be picked up by the next command, as a user would.
    first = work / "first"
    fault, code, stderr, happened = interrupt(["train", *TRAIN, f"run_dir={first}"], work, rng, latest=25)
    say(f"train: {happened}")
    check_exit("train", fault, code, stderr)
    if fault == signal.SIGKILL and code != 0:
        recover_training(first, work, say)
    check_run(first)

    # 2. two writers on one run directory
    shared = work / "shared"
    both = [
        subprocess.Popen(
            kiln("train", *TRAIN, f"run_dir={shared}"),
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = [(p.wait(timeout=900), p.communicate()[1]) for p in both]
    codes = sorted(code for code, _ in outcomes)
    refused = [err for code, err in outcomes if code == 2]
    say(f"two writers: exits {codes}")
    if codes != [0, 2] or not any(
        "is writing this run now" in err or "holds a completed run" in err or "holds an earlier run" in err
        for err in refused
    ):
        raise Lost(f"{shared}: two writers ended {codes}:\n" + "\n".join(err[-1500:] for _, err in outcomes))
    if check_run(shared) != "completed":
        raise Lost(f"{shared}: not completed after the writer that was let in finished")

    # 3. compress, 4. export: stopped anywhere; a SIGKILL is followed by the same command, to the end
    delivering = (
        (
            [
                "compress",
                f"run={shared}",
                "compress=quantize_dynamic",
                "compress.max_metric_drop=100",
                "export.latency_repeats=3",
            ],
            20.0,
        ),
        (["export", f"run={shared}", "export.latency_repeats=3"], 15.0),
    )
    for args, latest in () if quick else delivering:
        fault, code, stderr, happened = interrupt(args, work, rng, latest)
        say(f"{args[0]}: {happened}")
        check_exit(args[0], fault, code, stderr)
        if fault == signal.SIGKILL and code != 0:
            again = run(args, work)  # it also removes what the killed one left (kiln.delivery)
            if again.returncode != 0:
                raise Lost(f"{args[0]} after SIGKILL failed:\n{again.stderr[-2000:]}")
        if check_run(shared) != "completed":
            raise Lost(f"{shared}: the training's status changed during {args[0]}")
        if fault != signal.SIGKILL and code != 0 and "before it wrote anything" not in stderr:
            delivery = json.loads((shared / "run.json").read_text()).get("delivery") or {}
            if delivery.get("status") != "interrupted":
                raise Lost(f"{shared}: {args[0]} stopped by a signal, but delivery says {delivery}")

    # 5. predict: the predictions whole or not at all, an earlier file untouched
    model = shared / "model.onnx"
    if not model.exists():
        raise Lost(f"{shared}: no model.onnx after export ran to the end")
    rows = work / "rows.npy"
    if not rows.exists():
        import numpy as np
        from sklearn.datasets import load_digits

        np.save(rows, np.tile(load_digits().data.astype("float32"), (60, 1)))
    output = work / "predictions.csv"
    output.write_text("prediction\nfrom an earlier predict\n")  # to be replaced whole, or kept
    before = output.read_bytes()
    predict = ["predict", f"model={model}", f"input={rows}", f"output={output}"]
    fault, code, stderr, happened = interrupt(predict, work, rng, latest=4)
    say(f"predict: {happened}")
    check_exit("predict", fault, code, stderr)
    if fault == signal.SIGKILL and code != 0:
        check_predictions(output, before, rows=1797 * 60, finished=False, killed=True)
        before = output.read_bytes() if output.exists() else None
        again = run(predict, work)  # removes the temp files the killed one left
        if again.returncode != 0:
            raise Lost(f"predict after SIGKILL failed:\n{again.stderr[-2000:]}")
        code = 0
    check_predictions(output, before, rows=1797 * 60, finished=code == 0)


def recover_training(run_dir: Path, work: Path, say: Any) -> None:
    """After a SIGKILL: `resume=auto` continues the run (or starts it, if nothing was trained); a
    run killed after it completed (in the export after training) is exported again."""
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    if record.get("status") == "completed":
        again = run(["export", f"run={run_dir}", "export.latency_repeats=3"], work)
        say(f"train: killed after completing; kiln export -> exit {again.returncode}")
    elif run_dir.exists():
        again = run(["train", *TRAIN, f"run_dir={run_dir}", "resume=auto"], work)
        say(f"train: resume=auto -> exit {again.returncode}")
        if again.returncode != 0 and "give a larger trainer.max_epochs" in again.stderr:
            # killed after its last epoch was saved, before testing ended: resume=auto has no epoch
            # left to train under the same trainer.max_epochs (it says so, and changes nothing)
            say("train: NOTE resume=auto refused: the last epoch was saved before the test ended")
            return
    else:
        return  # killed before it made its directory: nothing to pick up
    if again.returncode != 0:
        raise Lost(f"{run_dir}: recovery after SIGKILL failed:\n{again.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None, help="of the random faults (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument(
        "--quick", action="store_true", help="train, two writers and predict only (no compress, no export)"
    )
    options = parser.parse_args()
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    print(f"stress: seed={seed}", flush=True)
    consistent = lost = 0
    started = time.monotonic()
    for number in range(1, options.iterations + 1):
        work = Path(tempfile.mkdtemp(prefix=f"kiln-stress-{number}-"))

        def say(line: str, number: int = number) -> None:
            print(f"stress: [{number}] {line}", flush=True)

        try:
            iteration(work, rng, say, quick=options.quick)
            consistent += 1
            keep = options.keep
        except Lost as exc:
            lost += 1
            say(f"LOST: {exc}")
            keep = True
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work}")
    print(f"stress: {time.monotonic() - started:.0f} s", flush=True)
    print(f"iterations={options.iterations} consistent={consistent} lost={lost}", flush=True)
    return 0 if consistent == options.iterations and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
