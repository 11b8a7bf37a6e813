"""`kiln report`: one table of every run under a sweep or cross-validation directory.

    kiln report dir=runs/train_multirun/<sweep>       the jobs of a sweep, best first
    kiln report dir=runs/train/<cv run>               the folds of kiln train cv.folds=K

Steps: find every run (a directory holding run.json) under `dir` -> read each one's monitor, best
score, test metrics, status and `.hydra/overrides.yaml` -> keep the overrides whose value differs
between runs as columns -> sort the completed runs by the monitored metric (its mode says which
way is better), then list the runs that did not complete with their error -> print the table as
markdown, write it to `<dir>/runs.md` and `<dir>/runs.csv`, and name the best run.

(`runs.md`, not `report.md`: that name is the compress/export report inside a single run.)

All runs must monitor the same metric, or their scores cannot be ranked together: runs with
different monitors are refused with one line listing them (report each sweep on its own).

Not a Hydra app, like `kiln tensorboard`: one setting, nothing to compose, and no torch to import.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import EXIT_USER_ERROR, KilnError, one_line

RUN_RECORD = "run.json"  # kiln.runs.RUN_RECORD; not imported so that this stage stays light
TABLE_MD = "runs.md"
TABLE_CSV = "runs.csv"
USAGE = """usage: kiln report dir=<sweep, cross-validation or runs directory>

Finds every kiln run under dir, prints one markdown table sorted by the monitored metric (best
first, failed runs last with their error) with a column per override that differs between runs,
writes it to <dir>/runs.md and <dir>/runs.csv, and names the best run."""


@dataclass
class RunRow:
    directory: Path
    name: str  # the run directory below `dir`
    status: str
    monitor: tuple[str, str] | None  # (metric, mode); None where run.json does not say
    score: float | None
    test_metrics: dict[str, float]
    overrides: dict[str, str]
    error: str | None = None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    try:
        root = read_settings(args)
        rows, monitor = read_runs(root)
        rows = sort_rows(rows, monitor)
        header, table = build_table(rows, monitor)
        markdown = to_markdown(header, table)
        best = best_line(rows, monitor, root)
        write_outputs(root, header, table, markdown + "\n\n" + best + "\n")
    except KilnError as exc:
        print(f"kiln report: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    print(markdown)
    print(f"\n{best}\nkiln report: wrote {root / TABLE_MD} and {root / TABLE_CSV}", flush=True)
    return 0


def read_settings(args: list[str]) -> Path:
    from kiln.config import key_value_settings

    settings = key_value_settings(args, {"dir": None}, "report", USAGE.splitlines()[0], example_key="dir")
    if not settings["dir"]:
        raise KilnError(
            "dir: give a sweep or cross-validation directory, e.g. kiln report dir=runs/train_multirun"
        )
    root = Path(settings["dir"]).expanduser()
    if not root.is_dir():
        raise KilnError(
            f"dir={settings['dir']}: no such directory; give a sweep or cross-validation directory"
        )
    return root


# -- reading -----------------------------------------------------------------------------------


def find_runs(root: Path) -> list[Path]:
    """Every directory at or below `root` holding a run.json."""
    return sorted(path.parent for path in root.rglob(RUN_RECORD) if path.is_file())


def read_runs(root: Path) -> tuple[list[RunRow], tuple[str, str]]:
    """Every run under `root`, and the (metric, mode) they all monitor."""
    directories = find_runs(root)
    if not directories:
        raise KilnError(
            f"dir={root}: no kiln runs under it (no {RUN_RECORD} found); give the directory of a sweep "
            "(runs/train_multirun/<sweep>) or of a cross-validation run (runs/train/<run> with fold_*)"
        )
    rows = [read_run(root, directory) for directory in directories]
    monitors = {row.monitor for row in rows if row.monitor is not None}
    if len(monitors) > 1:
        counts = ", ".join(
            f"{metric} ({mode}): {_runs(sum(row.monitor == (metric, mode) for row in rows))}"
            for metric, mode in sorted(monitors)
        )
        raise KilnError(
            f"dir={root}: its runs monitor different metrics ({counts}), so their scores cannot be ranked "
            "together; report each sweep on its own with dir=<sweep directory>"
        )
    return rows, monitors.pop() if monitors else ("?", "min")


def read_run(root: Path, directory: Path) -> RunRow:
    name = directory.relative_to(root).as_posix() if directory != root else "."
    path = directory / RUN_RECORD
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:  # one damaged run must not hide the others
        return RunRow(directory, name, "unreadable", None, None, {}, {}, f"{RUN_RECORD}: {exc}")
    monitor = record.get("monitor") or {}
    best = record.get("best_checkpoint") or {}
    return RunRow(
        directory=directory,
        name=name,
        status=str(record.get("status") or "unknown"),
        monitor=(str(monitor["metric"]), str(monitor.get("mode", "min"))) if monitor.get("metric") else None,
        score=_number(best.get("score")),
        test_metrics={
            k: float(v) for k, v in (record.get("test_metrics") or {}).items() if _number(v) is not None
        },
        overrides=read_overrides(directory),
        error=record.get("error"),
    )


def read_overrides(directory: Path) -> dict[str, str]:
    """`.hydra/overrides.yaml` as key -> value (`+key=v` and `key=v` alike; `~key` as `~`)."""
    import yaml  # PyYAML comes with Hydra/OmegaConf; imported here to keep --help instant

    path = directory / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        items = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return {}
    overrides: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        text = str(item)
        if text.startswith("~"):
            overrides[text[1:].split("=", 1)[0]] = "~"
            continue
        key, _, value = text.partition("=")
        overrides[key.lstrip("+")] = value
    return overrides


def _runs(count: int) -> str:
    return f"{count} run{'' if count == 1 else 's'}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# -- the table ---------------------------------------------------------------------------------


def sort_rows(rows: list[RunRow], monitor: tuple[str, str]) -> list[RunRow]:
    """Completed runs best first by the monitored score (mode says which way), ties by name; then
    the rest (failed, running) by name. A completed run without a finite score goes last of its group."""
    done = [row for row in rows if row.status == "completed"]
    rest = [row for row in rows if row.status != "completed"]

    def key(row: RunRow) -> tuple[bool, float, str]:
        score = row.score
        missing = score is None or not math.isfinite(score)
        value = 0.0 if missing or score is None else (score if monitor[1] == "min" else -score)
        return (missing, value, row.name)

    return sorted(done, key=key) + sorted(rest, key=lambda row: row.name)


def differing_overrides(rows: list[RunRow]) -> list[str]:
    """Override keys whose value is not the same in every run (absent counts as a value)."""
    keys = sorted({key for row in rows for key in row.overrides})
    return [key for key in keys if len({row.overrides.get(key) for row in rows}) > 1]


def build_table(rows: list[RunRow], monitor: tuple[str, str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (plain values; None where a run has no value)."""
    metric = monitor[0]
    keys = differing_overrides(rows)
    tests = sorted({name for row in rows for name in row.test_metrics})
    with_error = any(row.status != "completed" for row in rows)
    header = [
        "rank",
        *keys,
        "status",
        f"best {metric}",
        *tests,
        "run dir",
        *(["error"] if with_error else []),
    ]
    table = []
    rank = 0
    for row in rows:
        rank += row.status == "completed"
        cells: list[Any] = [rank if row.status == "completed" else None]
        cells += [row.overrides.get(key) for key in keys]
        cells += [row.status, row.score, *(row.test_metrics.get(name) for name in tests), row.name]
        if with_error:
            cells.append(row.error)
        table.append(cells)
    return header, table


def to_markdown(header: list[str], table: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4f}"
        return one_line(str(value)).replace("|", "\\|")  # a `|` inside a cell would split it

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in table]
    return "\n".join(lines)


def best_line(rows: list[RunRow], monitor: tuple[str, str], root: Path) -> str:
    metric, mode = monitor
    best = rows[0] if rows[0].status == "completed" and rows[0].score is not None else None
    if best is None:
        return f"best run: none (no run under {root} completed with a {metric} score)"
    return f"best run: {best.directory} ({metric}={best.score:.4f}, mode {mode})"


def write_outputs(root: Path, header: list[str], table: list[list[Any]], markdown: str) -> None:
    from kiln.runs import write_atomically  # stdlib only: no torch

    stream = io.StringIO()
    writer = csv.writer(stream)
    writer.writerow(header)
    writer.writerows([["" if value is None else value for value in row] for row in table])
    try:
        write_atomically(root / TABLE_MD, markdown)
        write_atomically(root / TABLE_CSV, stream.getvalue())
    except OSError as exc:
        raise KilnError(f"dir={root}: cannot write the report there ({exc}); check its permissions") from exc


if __name__ == "__main__":
    sys.exit(main())
