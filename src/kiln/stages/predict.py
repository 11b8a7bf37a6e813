"""`kiln predict`: serve an exported model with onnxruntime alone (no torch, no Lightning).

    kiln predict model=runs/train/<run>/model.onnx input=penguins.csv output=predictions.csv
    kiln predict model=runs/train/<run>/model.onnx input=digits.npy output=predictions.csv
    kiln predict model=runs/train/<run>/model.onnx input=photos/ output=predictions.csv
    kiln predict model=runs/train/<run>/model.onnx input=tokens.npz output=predictions.csv

Steps: open the model (a damaged file is one clear error) -> read the rows (CSV, Parquet, or .npy
for array models; image files, a folder of them, or a .npy batch for image models; an .npz or
Parquet file of named arrays for a model of several inputs) and check them
against the model's inputs (missing or extra columns, text in a numeric column, inf, an empty
file) -> run in batches -> write the predicted class (or value) and each class's probability to a
temp file, then rename it to `output` (never the input's or the model's own file).

Only numpy, pandas and onnxruntime are imported (and kiln modules that import nothing else), and
Pillow for image files: a table model carries its preprocessing inside the graph, an image model
its resizing and normalization.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kiln.errors import EXIT_USER_ERROR, KilnError
from kiln.interrupts import Interrupted

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
USAGE = """usage: kiln predict model=<file.onnx> input=<rows.csv|.parquet|.npy|.npz|image files or folder> output=<predictions.csv> [batch_size=1024]

Serves a model written by kiln export with onnxruntime alone. The defaults are in conf/predict.yaml;
`kiln predict --cfg job` prints them with your overrides applied."""


def main(argv: list[str] | None = None) -> int:
    """`key=value` arguments over conf/predict.yaml's defaults, then `predict(settings)`.

    Not a Hydra app on purpose: `model=...` would select Hydra's `model` config group, and
    predict answers faster without Hydra (its start-up is half a second)."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    settings: dict[str, Any] = {}
    written: list[Path] = []
    try:
        show = args[:2] == ["--cfg", "job"]
        settings = read_settings(args[2:] if show else args)
        if show:
            print("\n".join(f"{key}: {value}" for key, value in settings.items()))
            return 0
        run(settings, written)
    except Interrupted as exc:  # kiln.cli prints the line and exits 130 / 143
        raise exc.said(interrupted_line(exc, settings, args, written)) from None
    except KilnError as exc:
        from kiln.errors import one_line

        print(f"kiln predict: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


def interrupted_line(exc: Interrupted, settings: dict[str, Any], args: list[str], written: list[Path]) -> str:
    """What a signal left: the predictions are written whole (a temp file, then a rename) or not
    at all, and the drift report likewise."""
    import shlex

    again = f"kiln predict {shlex.join(args)}"
    output = settings.get("output")
    if not written:
        return (
            f"interrupted by {exc.signal_name} before the predictions were written: {output} was not "
            f"written (nor changed, if it existed); run it again: {again}"
        )
    return (
        f"interrupted by {exc.signal_name} after writing {written[0]} (complete), during the drift check "
        f"(no drift report written); for the drift report, run it again: {again}"
    )


def read_settings(args: list[str]) -> dict[str, Any]:
    import yaml

    from kiln.arguments import key_value_settings
    from kiln.config import config_dir

    defaults = yaml.safe_load((config_dir() / "predict.yaml").read_text()) or {}
    settings = {key: value for key, value in defaults.items() if key not in ("defaults", "hydra")}
    typed = ("batch_size", "drift_threshold")  # numbers (or null); paths stay text
    return key_value_settings(
        args,
        settings,
        "predict",
        USAGE.splitlines()[0],
        parse=lambda key, value: typed_value(key, value) if key in typed else value,
    )


def typed_value(key: str, value: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise KilnError(
            f"{key}={value}: not a number; e.g. {key}=1024 (batch_size) or 0.2 (drift_threshold)"
        ) from None


def run(settings: dict[str, Any], written: list[Path] | None = None) -> dict[str, Any]:
    """Predict as `settings` say; the output file, once renamed into place, is appended to
    `written` (what a signal coming after it leaves behind)."""
    written = [] if written is None else written
    started = time.perf_counter()
    model, source, output = paths(settings["model"], settings["input"], settings["output"])
    batch_size = settings["batch_size"]
    if not isinstance(batch_size, int) or batch_size < 1:
        raise KilnError(f"batch_size={batch_size}: must be an integer >= 1, e.g. batch_size=1024")
    session, meta = load_model(model)
    threshold = settings.get("drift_threshold")
    if threshold is not None and (not isinstance(threshold, int | float) or threshold <= 0):
        raise KilnError(
            f"drift_threshold={threshold}: must be a positive PSI, e.g. 0.2, or null to skip the check"
        )
    if meta.get("kiln.input_kind") == "image":
        from kiln.drift import image_statistics
        from kiln.export.images import at_training_size, model_channels, predict_images, read_images

        files, images = read_images(source, model_channels(session))
        if threshold is not None and not enough_rows_for_drift(len(images)):
            threshold = None
        projection = embedding_projection(meta) if threshold is not None else None
        if projection is not None:  # the same pass also returns the penultimate layer's output
            session = embedding_session(model, projection["tensor"])
        with onnxruntime_errors(model):
            results = predict_images(session, images, batch_size)
        embeddings = results.pop(projection["tensor"]) if projection is not None else None
        check_answer_width(model, results, meta)
        rows = write_predictions(output, results, meta, files=files)
        written.append(output)
        drift = None
        if threshold is not None:
            columns = image_statistics(at_training_size(images, meta))
            if projection is not None and embeddings is not None:
                from kiln.drift import embedding_columns

                columns.update(embedding_columns(embeddings, projection))
            drift = check_drift(columns, meta, threshold, output)
        print(
            f"kiln predict: {rows} images -> {output} ({(time.perf_counter() - started) * 1000:.0f} ms, "
            f"model {meta.get('kiln.variant', model.name)})",
            flush=True,
        )
        return {"rows": rows, "output": str(output), "drift": drift}
    feeds = read_feeds(source, session, meta)
    with onnxruntime_errors(model):
        results = predict(session, feeds, batch_size)
    check_answer_width(model, results, meta)
    rows = write_predictions(output, results, meta)
    written.append(output)
    drift = None
    if threshold is not None and enough_rows_for_drift(rows):
        drift = check_drift(feature_columns(feeds, meta), meta, threshold, output)
    print(
        f"kiln predict: {rows} rows -> {output} ({(time.perf_counter() - started) * 1000:.0f} ms, "
        f"model {meta.get('kiln.variant', model.name)})",
        flush=True,
    )
    return {"rows": rows, "output": str(output), "drift": drift}


def enough_rows_for_drift(rows: int) -> bool:
    """Whether `rows` are enough for PSI to mean anything; if not, one line says so (rather than a
    warning for every feature, each of them noise)."""
    from kiln.drift import MIN_ROWS

    if rows >= MIN_ROWS:
        return True
    print(
        f"kiln predict: no drift check: it needs at least {MIN_ROWS} rows to mean anything, got {rows}",
        file=sys.stderr,
    )
    return False


def embedding_projection(meta: dict[str, str]) -> dict[str, Any] | None:
    """The embedding part of the model's drift baseline, if it has one (a damaged baseline is said
    by check_drift, which then skips the check)."""
    from kiln.drift import METADATA_KEY, from_metadata

    try:
        return from_metadata(meta[METADATA_KEY]).get("embedding") if METADATA_KEY in meta else None
    except ValueError:
        return None


def embedding_session(model: Path, tensor: str) -> Any:
    """A session of `model` that also outputs `tensor`, its penultimate layer's output."""
    import onnx

    from kiln.export.checks import open_session
    from kiln.export.graphs import with_output

    return open_session(model, model=with_output(onnx.load(str(model)), tensor))


def feature_columns(feeds: dict[str, Any], meta: dict[str, str]) -> dict[str, Any]:
    """The features a drift baseline describes: a table's raw columns, an array's flat values."""
    if meta.get("kiln.input_kind") == "table":
        return {name: values[:, 0] for name, values in feeds.items()}
    flat = next(iter(feeds.values()))
    flat = flat.reshape(len(flat), -1)
    names = listed_names(meta, "kiln.feature_names")
    if len(names) != flat.shape[1]:
        names = [f"x{i}" for i in range(flat.shape[1])]
    return {name: flat[:, i] for i, name in enumerate(names)}


def check_drift(
    columns: dict[str, Any], meta: dict[str, str], threshold: float, output: Path
) -> dict[str, Any] | None:
    """PSI of each feature against the training data's baseline in the model; a warning line per
    feature past `threshold`, all of them in `<output>.drift.json`."""
    import numpy as np

    from kiln.drift import FEW_ROWS, METADATA_KEY, drift_of, from_metadata

    if METADATA_KEY not in meta:
        print("kiln predict: no drift check: the model carries no training baseline", file=sys.stderr)
        return None
    try:
        baseline = from_metadata(meta[METADATA_KEY])
    except ValueError as exc:  # drift warns and never withholds predictions: no check, said so
        print(
            f"kiln predict: no drift check: {exc}; export the model again with kiln export", file=sys.stderr
        )
        return None
    absent = [name for name in baseline["features"] if name not in columns]
    if absent:
        raise KilnError(f"drift: the rows lack the feature(s) {', '.join(absent)} the model was trained on")
    scores = drift_of(baseline, columns)
    rows = len(next(iter(columns.values())))
    drifted = {
        name: value for name, value in sorted(scores.items(), key=lambda kv: -kv[1]) if value > threshold
    }
    report = {
        "rows": rows,
        "training_rows": baseline["rows"],
        "threshold": threshold,
        "psi": {name: round(value, 6) for name, value in scores.items()},
        "drifted": list(drifted),
    }
    path = output.with_name(output.stem + ".drift.json")
    write_whole(path, json.dumps(report, indent=2) + "\n")
    for name, value in drifted.items():
        print(f"kiln predict: warning: drift in {name}: PSI {value:.3f} > {threshold}", file=sys.stderr)
    worst = max(scores.values()) if scores else float("nan")
    note = f"; only {rows} rows, PSI is noisy below {FEW_ROWS}" if rows < FEW_ROWS else ""
    print(
        f"kiln predict: drift check: {len(drifted)} of {len(scores)} features past PSI {threshold} "
        f"(largest {float(np.round(worst, 3))}){note}; details in {path}",
        file=sys.stderr,
        flush=True,
    )
    return report


def paths(model: Any, source: Any, output: Any) -> tuple[Path, Path, Path]:
    if not model:
        from kiln.runs import RunLayout  # no torch: the stage stays light

        example = RunLayout(Path("runs/train/<run>")).model
        raise KilnError(f"model: give the .onnx file to serve, e.g. model={example}")
    if not source:
        raise KilnError("input: give the rows to predict, e.g. input=rows.csv (CSV, Parquet, or .npy)")
    if not output:
        raise KilnError("output: give the CSV file to write, e.g. output=predictions.csv")
    model_path, source_path, output_path = Path(str(model)), Path(str(source)), Path(str(output))
    if not model_path.is_file():
        raise KilnError(f"model={model}: no such file; give an .onnx file written by kiln export")
    if not source_path.exists():
        raise KilnError(f"input={source}: no such file or folder")
    if not source_path.is_dir():
        check_readable_size(source_path, f"input={source}")
    if not output_path.parent.is_dir():
        raise KilnError(f"output={output}: the directory {output_path.parent} does not exist")
    if output_path.is_dir():
        raise KilnError(
            f"output={output}: a directory; give the CSV file to write, e.g. output={output_path / 'predictions.csv'}"
        )
    for key, value, path in (("input", source, source_path), ("model", model, model_path)):
        if same_file(output_path, path):
            raise KilnError(
                f"output={output}: the same file as {key}={value}, which writing the predictions would "
                "replace; choose another file, e.g. output=predictions.csv"
            )
    if source_path.is_dir() and is_read_from_folder(output_path, source_path):
        raise KilnError(
            f"output={output}: one of the image files read from input={source}, which writing the "
            "predictions would replace; choose another file, e.g. output=predictions.csv"
        )
    return model_path, source_path, output_path


MAX_INPUT_BYTES = 512 * 2**20  # predict reads its input whole: past this, memory runs out first


def check_readable_size(path: Path, key: str) -> None:
    """An input predict can read whole: a regular file (a pipe or a device such as /dev/zero may
    never end) of at most MAX_INPUT_BYTES."""
    import stat

    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise KilnError(
            f"{key}: not a regular file (a pipe or device, which may never end); save the rows to a file "
            "and give that"
        )
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise KilnError(
            f"{key}: {size / 2**20:.1f} MiB, more than kiln predict reads at once ({MAX_INPUT_BYTES // 2**20} "
            "MiB); split it into smaller files and predict each"
        )


def same_file(a: Path, b: Path) -> bool:
    """One file under two names: the same resolved path (through symbolic links), or a hard link."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # `a` does not exist yet: nothing to replace
        return False


def is_read_from_folder(output: Path, folder: Path) -> bool:
    """Whether `output` is an image file that read_images takes from `folder`."""
    from kiln.export.images import IMAGE_SUFFIXES

    inside = output.resolve().is_relative_to(folder.resolve())
    return inside and output.suffix.lower() in IMAGE_SUFFIXES and not output.name.startswith(".")


def load_model(path: Path) -> tuple[Any, dict[str, str]]:
    from kiln.export.checks import open_session

    session = open_session(path)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    for key in NAME_LISTS:
        try:
            listed_names(meta, key)
        except ValueError as exc:
            raise KilnError(
                f"model={path}: its {key} metadata {exc}; the file was changed after export: export it "
                "again with kiln export"
            ) from None
    return session, meta


NAME_LISTS = ("kiln.class_names", "kiln.feature_names")  # metadata kiln export writes as JSON lists


def listed_names(meta: dict[str, str], key: str) -> list[str]:
    """A JSON list of names from the model's metadata ([] when absent); a ValueError saying what
    is wrong otherwise (load_model checks both lists, so later calls cannot fail)."""
    text = meta.get(key)
    if text is None:
        return []
    try:
        names = json.loads(text)
    except ValueError:
        raise ValueError(f"is not JSON ({text[:40]!r})") from None
    if not isinstance(names, list) or not all(type(n) in (str, int) for n in names):
        raise ValueError(f"is not a list of names ({text[:40]!r})")
    return [str(n) for n in names]


@contextmanager
def onnxruntime_errors(model: Path) -> Iterator[None]:
    """onnxruntime refusing the rows (a shape or type its graph cannot take) is one line naming the
    model; any other exception is a bug in kiln and keeps its traceback."""
    try:
        yield
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise KilnError(
            f"model={model}: onnxruntime cannot run it on these rows ({onnxruntime_reason(exc)}); give "
            "rows shaped as the model was trained on"
        ) from exc


def onnxruntime_reason(exc: Exception) -> str:
    """The readable part of onnxruntime's message, which wraps it in a status code and the C++
    source line that failed: "... Status Message: /src/x.h:84 f() cond was false. <the reason>"."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.split("Status Message: ", 1)[-1]
    if text.startswith("/") and " was false. " in text:
        text = text.split(" was false. ", 1)[1]
    return text[:300]


def read_feeds(source: Path, session: Any, meta: dict[str, str]) -> dict[str, Any]:
    """The model's inputs, by name, from the file the user gave: named arrays for a model of
    several inputs, a .npy array, or the columns of a CSV or Parquet file."""
    from kiln.export.feeds import is_table, specs_of
    from kiln.export.images import IMAGE_SUFFIXES, takes_image_tensors, tensor_input_needed

    specs = specs_of(session.get_inputs())
    key = f"input={source}"
    if (source.is_dir() or source.suffix.lower() in IMAGE_SUFFIXES) and takes_image_tensors(specs):
        raise KilnError(tensor_input_needed(key, specs[0]))  # an image net without images in its graph
    if source.is_dir():
        raise KilnError(f"{key}: a folder, but this model takes rows; give a CSV, Parquet or .npy file")
    suffix = source.suffix.lower()
    if len(specs) > 1 and not is_table(specs):
        return read_named_feeds(source, specs, key)
    if suffix == ".npy":
        if is_table(specs):
            raise KilnError(f"{key}: this model takes table columns; give a CSV or Parquet file with them")
        return npy_feeds(source, specs[0], key)
    if suffix not in TABLE_SUFFIXES:
        raise KilnError(f"{key}: unknown file type '{suffix}'; use .csv, .parquet or .npy")
    return column_feeds(source, specs, meta, key)


def npy_feeds(source: Path, spec: Any, key: str) -> dict[str, Any]:
    """A .npy array as the model's one input; a NaN or inf is named by its index."""
    import numpy as np

    from kiln.export.feeds import array_feeds

    try:
        values = np.load(source, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise KilnError(f"{key}: cannot read it as a .npy array ({exc})") from exc
    if values.size == 0:
        raise KilnError(f"{key}: the array is empty; give at least one row")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf: said below, in one line
        feeds = array_feeds(values, spec, key)
    bad = first_non_finite(next(iter(feeds.values())))
    if bad is not None:
        row, position, rows = bad
        index = (row, *(int(i) for i in np.unravel_index(position, values.shape[1:])))
        value = values[index]
        raise KilnError(
            f"{key}: values[{', '.join(map(str, index))}] is {value}{beyond_float32(value)}; {rows} "
            f"row(s) hold NaN or inf; {NO_MISSING_IN_ARRAYS}"
        )
    return feeds


def column_feeds(source: Path, specs: list[Any], meta: dict[str, str], key: str) -> dict[str, Any]:
    """A CSV or Parquet file's columns: a table model's raw columns, or an array model's features
    (the columns its kiln.feature_names lists, in that order)."""
    from kiln.export.feeds import check_columns, is_table, table_feeds

    header, columns, from_text = read_columns(source, key)
    if not is_table(specs):
        return feature_column_feeds(header, columns, specs[0], meta, key)
    ignored = [meta["kiln.target"]] if meta.get("kiln.target") else []
    check_columns(header, [s.name for s in specs], key, ignored)
    feeds = table_feeds(columns, specs, key, from_text=from_text)
    refuse_infinite_cells(feeds, columns, key)
    return feeds


def feature_column_feeds(
    header: list[str], columns: dict[str, Any], spec: Any, meta: dict[str, str], key: str
) -> dict[str, Any]:
    """An array model's one input from the columns named as its features; a missing value or inf
    is named by its column and row."""
    import numpy as np

    from kiln.export.feeds import array_feeds, check_columns, numeric_column

    names = listed_names(meta, "kiln.feature_names")
    if not names:
        raise KilnError(f"{key}: the model does not record its feature names; give a .npy array instead")
    check_columns(header, names, key)
    values = np.stack([numeric_column(np.asarray(columns[n], dtype=object), n, key) for n in names], axis=1)
    with np.errstate(over="ignore"):
        feeds = array_feeds(values, spec, key)
    bad = first_non_finite(next(iter(feeds.values())))
    if bad is not None:
        row, position, rows = bad
        name = names[position]
        cell = columns[name][row]
        raise KilnError(
            f"{key}: column '{name}' holds {cell!r}{beyond_float32(values[row, position])} in row {row + 1} "
            f"(rows counted from 1 below the header); {rows} row(s) hold a missing value or inf; "
            f"{NO_MISSING_IN_ARRAYS}"
        )
    return feeds


NO_MISSING_IN_ARRAYS = "replace it with a finite number (an array model has no missing values to fill in)"


def read_named_feeds(source: Path, specs: list[Any], key: str) -> dict[str, Any]:
    """A model of several named inputs (token ids and a mask, an image and tabular features) reads
    an .npz of arrays named as its inputs, or a Parquet table whose columns of those names hold
    one array (or list) per row (kiln.export.feeds.named_feeds checks them)."""
    import numpy as np

    from kiln.export.feeds import named_feeds, stacked_column

    takes = ", ".join(spec.describe() for spec in specs)
    suffix = source.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(source, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (ValueError, OSError, KeyError) as exc:
            raise KilnError(f"{key}: cannot read it as an .npz of arrays ({exc})") from exc
        return named_feeds(arrays, specs, key)
    if suffix in (".parquet", ".pq"):
        header, columns, _ = read_columns(source, key)
        arrays = {
            name: stacked_column(columns[name], name, key)
            for name in header
            if name in {s.name for s in specs}
        }
        return named_feeds(arrays, specs, key)
    raise KilnError(
        f"{key}: this model takes several named inputs: {takes}; give an .npz of arrays with those names, "
        "or a Parquet file with those columns (one list per row)"
    )


def refuse_infinite_cells(feeds: dict[str, Any], columns: dict[str, Any], key: str) -> None:
    """A table model takes NaN (an empty cell) as a missing value and fills it in inside its graph,
    but inf has no answer: its scaling makes the logits NaN, and their argmax a made-up class.
    Training refuses inf too."""
    import numpy as np

    for name, values in feeds.items():
        if values.dtype.kind != "f":
            continue
        rows = np.flatnonzero(np.isinf(values[:, 0]))
        if len(rows):
            raise KilnError(
                f"{key}: column '{name}' holds {columns[name][rows[0]]!r} in row {rows[0] + 1} (rows counted "
                f"from 1 below the header); {len(rows)} row(s) hold inf or -inf; replace it with a finite "
                "number, or leave the cell empty for a missing value"
            )


def first_non_finite(feed: Any) -> tuple[int, int, int] | None:
    """(row, position within the flattened row, how many rows) of the first NaN or inf in an
    array model's input; None if every value is finite."""
    import numpy as np

    bad = ~np.isfinite(feed.reshape(len(feed), -1))
    rows = np.flatnonzero(bad.any(axis=1))
    if not len(rows):
        return None
    row = int(rows[0])
    return row, int(np.flatnonzero(bad[row])[0]), len(rows)


def beyond_float32(value: Any) -> str:
    """A note for a finite value that becomes inf in the model's float32 input."""
    import numpy as np

    finite = np.isfinite(value)
    return " (beyond float32's range)" if finite else ""


def read_columns(source: Path, key: str) -> tuple[list[str], dict[str, Any], bool]:
    """(header, column name -> values, whether the values are raw text). CSV without pandas (its
    import costs more than the whole prediction); Parquet through pandas."""
    if source.suffix.lower() in (".parquet", ".pq"):
        import pandas as pd

        try:
            frame = pd.read_parquet(source)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KilnError(f"{key}: cannot read it as a Parquet table ({first[:160]})") from exc
        if len(frame) == 0:
            raise KilnError(f"{key}: the table has no rows")
        header = [str(c) for c in frame.columns]
        return header, {str(c): frame[c].to_numpy(dtype=object) for c in frame.columns}, False
    import csv

    try:
        with source.open(newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.reader(stream, delimiter="\t" if source.suffix.lower() == ".tsv" else ","))
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise KilnError(f"{key}: cannot read it as a CSV table ({exc})") from exc
    rows = [row for row in rows if row]  # blank lines
    if not rows:
        raise KilnError(f"{key}: the file is empty; give a header row and at least one data row")
    header, body = rows[0], rows[1:]
    if not body:
        raise KilnError(f"{key}: the file has a header but no rows")
    ragged = next((i for i, row in enumerate(body) if len(row) != len(header)), None)
    if ragged is not None:
        raise KilnError(
            f"{key}: row {ragged + 1} has {len(body[ragged])} cells but the header has {len(header)} columns"
        )
    columns = {name: [row[index] for row in body] for index, name in enumerate(header)}
    return header, columns, True


def predict(session: Any, feeds: dict[str, Any], batch_size: int) -> dict[str, Any]:
    from kiln.export.checks import run_batched

    return run_batched(session, feeds, batch_size)


def write_predictions(
    output: Path, results: dict[str, Any], meta: dict[str, str], files: list[str] | None = None
) -> int:
    """The predictions as CSV (written to a temp file, then renamed); for images, the file of
    each prediction in a first column `file`."""
    header, rows = prediction_table(results, meta)
    refuse_non_finite_answers(results, files)
    if files is not None:
        header = ["file", *header]
        rows = [[name, *row] for name, row in zip(files, rows, strict=True)]
    write_csv(output, header, rows)
    return len(rows)


def prediction_table(results: dict[str, Any], meta: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the answers: a classifier's class and each class's probability; otherwise
    the model's answer, one column per number it gives a row (`prediction` when it gives one)."""
    if "label" in results:
        probabilities = results["probabilities"]
        classes = listed_names(meta, "kiln.class_names") or [str(i) for i in range(probabilities.shape[1])]
        header = ["prediction", *(f"probability_{name}" for name in classes)]
        rows = [
            [str(label), *(f"{p:.6g}" for p in row)]
            for label, row in zip(results["label"], probabilities, strict=True)
        ]
        return header, rows
    name = "prediction" if "prediction" in results else next(iter(results))
    values = results[name]
    values = values.reshape(len(values), -1)
    header = ["prediction"] if values.shape[1] == 1 else [f"{name}_{i}" for i in range(values.shape[1])]
    return header, [[number_text(v) for v in row] for row in values]


def number_text(value: Any) -> str:
    """A float to 7 significant digits (float32's precision); anything else as it is."""
    import numpy as np

    return f"{value:.7g}" if isinstance(value, float | np.floating) else str(value)


def check_answer_width(model: Path, results: dict[str, Any], meta: dict[str, str]) -> None:
    """A classifier's class names must be one per probability column: 3 names for 10 classes is
    metadata changed after export, and would write a ragged CSV or name the wrong classes."""
    names = listed_names(meta, "kiln.class_names")
    if "label" not in results or not names:
        return
    width = results["probabilities"].reshape(len(results["probabilities"]), -1).shape[1]
    if len(names) != width:
        raise KilnError(
            f"model={model}: its kiln.class_names metadata lists {len(names)} class names but the model "
            f"answers {width} classes; the file was changed after export: export it again with kiln export"
        )


# A cell a spreadsheet would run as a formula (OWASP's CSV injection list): kept as text by a
# leading quote. A number (-1.5) is not a formula and stays a number.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    if cell.startswith(FORMULA_STARTS) and not is_number(cell):
        return "'" + cell
    return cell


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_csv(output: Path, header: list[str], rows: list[list[str]]) -> None:
    """`header` and `rows` to a temp file beside `output` (named as temp_prefix says), renamed onto
    it once whole; every cell made safe to open in a spreadsheet."""
    import csv

    from kiln.runs import replacing

    remove_abandoned_temps(output)
    try:
        with replacing(output, temp_prefix(output)) as temp, temp.open("w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow([spreadsheet_safe(cell) for cell in header])
            writer.writerows([spreadsheet_safe(cell) for cell in row] for row in rows)
    except OSError as exc:  # a full disk, a read-only file system, a folder without write permission
        raise KilnError(
            f"output={output}: cannot write it in {output.parent} ({exc.strerror or exc})"
        ) from exc


def temp_prefix(path: Path) -> str:
    """The name of the temp file `path` is written to first: `.<name>.<pid>.<random>.tmp`, so that a
    later predict can tell the temp files of a process that was killed (SIGKILL) from those of
    one still writing."""
    return f".{path.name}.{os.getpid()}."


def remove_abandoned_temps(path: Path) -> None:
    """Delete the temp files of `path` left by predicts that were killed (their process is gone)."""
    for temp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = temp.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            temp.unlink(missing_ok=True)
        except (PermissionError, OverflowError):  # another user's live process; not a pid
            continue


def write_whole(path: Path, text: str) -> None:
    """`text` to a temp file beside `path` (named as temp_prefix says), then renamed onto it."""
    from kiln.runs import replacing

    remove_abandoned_temps(path)
    with replacing(path, temp_prefix(path)) as temp:
        temp.write_text(text)


def refuse_non_finite_answers(results: dict[str, Any], files: list[str] | None) -> None:
    """NaN probabilities (or values) mean the model could not answer a row, and the label beside
    them is argmax(NaN): a made-up class. The inputs are checked, so this is a last guard, e.g. for
    numbers so far from the training data that the model overflows."""
    import numpy as np

    values = results.get("probabilities", results.get("prediction"))
    if values is None or values.dtype.kind != "f":
        return
    bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
    if len(bad):
        row = files[bad[0]] if files is not None else f"row {bad[0] + 1} (rows counted from 1)"
        raise KilnError(
            f"the model's answer for {row} is not a number ({len(bad)} row(s) like it), so nothing was "
            "written; check those rows for values far outside the training data"
        )


if __name__ == "__main__":
    sys.exit(main())
