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
import math
import sys
from pathlib import Path
from typing import Any

from kiln.errors import EXIT_USER_ERROR, KilnError, one_line
from kiln.runs import RunDirectory, RunLayout, find_runs, read_record  # no torch: the stage stays light

TABLE_MD = "runs.md"
TABLE_CSV = "runs.csv"
USAGE = """usage: kiln report dir=<sweep, cross-validation or runs directory>

Finds every kiln run under dir, prints one markdown table sorted by the monitored metric (best
first, failed runs last with their error) with a column per override that differs between runs,
writes it to <dir>/runs.md and <dir>/runs.csv, and names the best run."""


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
    from kiln.arguments import key_value_settings

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


def read_runs(root: Path) -> tuple[list[RunDirectory], tuple[str, str]]:
    """Every run under `root`, and the (metric, mode) they all monitor."""
    directories = find_runs(root)
    if not directories:
        raise KilnError(
            f"dir={root}: no kiln runs under it (no {RunLayout.RECORD} found); give the directory of a sweep "
            "(runs/train_multirun/<sweep>) or of a cross-validation run (runs/train/<run> with fold_*)"
        )
    rows = [read_run(root, directory) for directory in directories]
    monitors = {monitor for monitor in map(monitor_of, rows) if monitor is not None}
    if len(monitors) > 1:
        counts = ", ".join(
            f"{metric} ({mode}): {_runs(sum(monitor_of(row) == (metric, mode) for row in rows))}"
            for metric, mode in sorted(monitors)
        )
        raise KilnError(
            f"dir={root}: its runs monitor different metrics ({counts}), so their scores cannot be ranked "
            "together; report each sweep on its own with dir=<sweep directory>"
        )
    return rows, monitors.pop() if monitors else ("?", "min")


def read_run(root: Path, directory: Path) -> RunDirectory:
    name = directory.relative_to(root).as_posix() if directory != root else "."
    try:
        record = dict(read_record(directory))
    except KilnError as exc:  # one damaged run must not hide the others
        record = {"status": "unreadable", "error": str(exc)}
    return RunDirectory(directory, record, name)


def monitor_of(run: RunDirectory) -> tuple[str, str] | None:
    """(metric, mode) as the run recorded it; None where run.json does not say."""
    monitor = run.record.get("monitor") or {}
    return (str(monitor["metric"]), str(monitor.get("mode", "min"))) if monitor.get("metric") else None


def _runs(count: int) -> str:
    return f"{count} run{'' if count == 1 else 's'}"


# -- the table ---------------------------------------------------------------------------------


def sort_rows(rows: list[RunDirectory], monitor: tuple[str, str]) -> list[RunDirectory]:
    """Completed runs best first by the monitored score (mode says which way), ties by name; then
    the rest (failed, running) by name. A completed run without a finite score goes last of its group."""
    done = [row for row in rows if row.status == "completed"]
    rest = [row for row in rows if row.status != "completed"]

    def key(row: RunDirectory) -> tuple[bool, float, str]:
        score = row.best_score
        missing = score is None or not math.isfinite(score)
        value = 0.0 if missing or score is None else (score if monitor[1] == "min" else -score)
        return (missing, value, row.name)

    return sorted(done, key=key) + sorted(rest, key=lambda row: row.name)


def differing_overrides(rows: list[RunDirectory]) -> list[str]:
    """Override keys whose value is not the same in every run (absent counts as a value)."""
    keys = sorted({key for row in rows for key in row.overrides})
    return [key for key in keys if len({row.overrides.get(key) for row in rows}) > 1]


def build_table(rows: list[RunDirectory], monitor: tuple[str, str]) -> tuple[list[str], list[list[Any]]]:
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
        cells += [
            row.status or "unknown",
            row.best_score,
            *(row.test_metrics.get(name) for name in tests),
            row.name,
        ]
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


def best_line(rows: list[RunDirectory], monitor: tuple[str, str], root: Path) -> str:
    metric, mode = monitor
    best = rows[0] if rows[0].status == "completed" else None
    if best is None or best.best_score is None:
        return f"best run: none (no run under {root} completed with a {metric} score)"
    return f"best run: {best.directory} ({metric}={best.best_score:.4f}, mode {mode})"


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
