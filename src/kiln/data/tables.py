"""Reading a table (a built-in data set or a user's CSV/Parquet file) and typing its columns.

Every mistake in the data is reported with the file or column it concerns and what to do.
"""

from __future__ import annotations

import codecs
import csv
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from kiln.data.preprocessing import numeric_values
from kiln.errors import KilnError


def _sklearn(loader_name: str) -> Callable[[], tuple[pd.DataFrame, str]]:
    def load() -> tuple[pd.DataFrame, str]:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, loader_name)(as_frame=True)
        frame = bunch.frame.copy()
        if loader_name != "load_diabetes":  # class labels by name, not by index
            frame["target"] = np.asarray(bunch.target_names)[bunch.target.to_numpy()]
        return frame, "target"

    return load


def _penguins() -> tuple[pd.DataFrame, str]:
    from palmerpenguins import load_penguins

    return load_penguins(), "species"


BUILTIN_TABLES: dict[str, Callable[[], tuple[pd.DataFrame, str]]] = {
    "breast_cancer": _sklearn("load_breast_cancer"),
    "diabetes": _sklearn("load_diabetes"),
    "iris": _sklearn("load_iris"),
    "penguins": _penguins,
    "wine": _sklearn("load_wine"),
}


Warn = Callable[[str], None]


def print_warning(line: str) -> None:
    """One line on stderr, as kiln train prints its warnings."""
    print(f"kiln train: warning: {line}", file=sys.stderr, flush=True)


def read_table(
    name: str | None,
    path: str | None,
    target: str | None,
    *,
    missing_target: str = "drop",
    encoding: str = "utf-8",
    sep: str = "auto",
    warn: Warn = print_warning,
) -> tuple[pd.DataFrame, str, str]:
    """The table, its target column and where it came from (for messages).

    Rows without a target value are left out (with a warning) or refused (`missing_target`). The
    rows kept keep their index: the file's data row numbers, which later messages quote.
    """
    if path:
        frame = read_file(Path(path), encoding=encoding, sep=sep, warn=warn)
        source = f"data.path={path}"
    elif name:
        if name not in BUILTIN_TABLES:
            raise KilnError(
                f"data.name={name}: no such built-in table; built-in: {', '.join(sorted(BUILTIN_TABLES))} "
                "(or give a file with data.path=FILE.csv data.target=COLUMN)"
            )
        frame, builtin_target = BUILTIN_TABLES[name]()
        source = f"data.name={name}"
        target = target or builtin_target
    else:
        raise KilnError("data: give a built-in table with data.name=... or a file with data.path=FILE.csv")
    if not target:
        raise KilnError(
            f"{source}: say which column to predict with data.target=COLUMN; columns: {_list(frame)}"
        )
    if target not in frame.columns:
        raise KilnError(
            f"data.target={target}: no such column in {source}; columns: {_list(frame)}{_separator_hint(frame)}"
        )
    if len(frame) == 0:
        raise KilnError(f"{source}: the table has a header but no rows")
    return _without_missing_targets(frame, target, source, missing_target, warn), target, source


def _without_missing_targets(
    frame: pd.DataFrame, target: str, source: str, missing_target: str, warn: Warn
) -> pd.DataFrame:
    """A row with no target value cannot be trained or scored on: leave it out, or refuse the file."""
    missing = frame[target].isna().to_numpy()
    if not missing.any():
        return frame
    count, total = int(missing.sum()), len(frame)
    rows = f"data row{'s' if count > 1 else ''} {_rows(frame, np.flatnonzero(missing))}"
    if count == total:
        raise KilnError(
            f"data.target={target}: none of the {total} rows of {source} has a target value (the column "
            f"is empty); check that data.target names the column to predict; columns: {_list(frame)}"
        )
    if missing_target == "error":
        raise KilnError(
            f"data.target={target}: {count} of {total} rows of {source} have no target value ({rows}); "
            "drop or fill those rows, or set data.missing_target=drop to leave them out"
        )
    warn(
        f"data.target={target}: {count} of {total} rows of {source} have no target value and are left "
        f"out ({rows}; data.missing_target=error refuses them instead)"
    )
    return frame[~missing]


def read_file(
    path: Path, *, encoding: str = "utf-8", sep: str = "auto", warn: Warn = print_warning
) -> pd.DataFrame:
    if not path.exists():
        raise KilnError(
            f"data.path={path}: file not found (looked at {path.resolve()}); give a CSV or Parquet file"
        )
    if path.is_dir():
        raise KilnError(f"data.path={path}: is a directory; give a CSV or Parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".txt", ".tsv"):
            return _read_text(path, "\t" if suffix == ".tsv" else ",", encoding, sep, warn)
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
            _refuse_duplicates(path, [str(c) for c in frame.columns])
            return frame
    except pd.errors.EmptyDataError as exc:
        raise KilnError(
            f"data.path={path}: the file is empty; give a table with a header row and data rows"
        ) from exc
    except UnicodeDecodeError as exc:
        raise KilnError(_not_decodable(path, encoding)) from exc
    except (pd.errors.ParserError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KilnError(f"data.path={path}: cannot read it as a {suffix[1:]} table ({reason})") from exc
    raise KilnError(f"data.path={path}: unknown file type '{suffix}'; use .csv, .tsv or .parquet")


def _read_text(path: Path, default_sep: str, encoding: str, sep: str, warn: Warn) -> pd.DataFrame:
    """A CSV or TSV file. With `sep: auto`, a file whose header comes out as one column holding
    ';' (or tab, '|', ',') is read again with that separator; a semicolon file's decimal commas
    (3,5) are read as numbers."""
    chosen = default_sep if sep == "auto" else delimiter(sep)
    frame = pd.read_csv(path, sep=chosen, encoding=encoding)
    sniffed = _other_separator(frame, chosen) if sep == "auto" else None
    if sniffed:
        again = pd.read_csv(path, sep=sniffed, encoding=encoding)
        if again.shape[1] > 1:
            frame, chosen = again, sniffed
        else:
            sniffed = None
    decimal_commas = _decimal_comma_columns(frame) if chosen == ";" else []
    if decimal_commas:
        frame = pd.read_csv(path, sep=chosen, encoding=encoding, decimal=",")
    _refuse_duplicates(path, _header(path, chosen, encoding))
    if sniffed:
        warn(
            f"data.path={path}: its columns are separated by {_SEPARATORS[sniffed]}, not "
            f"{_SEPARATORS[default_sep]}, so it is read with data.sep={_sep_value(sniffed)} (set that "
            "to say so and silence this line)"
        )
    if decimal_commas:
        warn(
            f"data.path={path}: numbers with a decimal comma (3,5 for 3.5) read as numbers in column"
            f"{'s' if len(decimal_commas) > 1 else ''} {', '.join(map(repr, decimal_commas))}"
        )
    return frame


_SEPARATORS = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "'|'"}


def delimiter(sep: str) -> str:
    """`data.sep` as the character itself: `tab` and a typed backslash-t both mean a tab."""
    return "\t" if sep in ("tab", "\\t") else sep


def _sep_value(sep: str) -> str:
    return "tab" if sep == "\t" else f"'{sep}'"


def _other_separator(frame: pd.DataFrame, chosen: str = "") -> str | None:
    """The separator a one-column table's header holds most of, if any: `a;b;y` read with ','."""
    if frame.shape[1] != 1:
        return None
    header = str(frame.columns[0])
    counts = {sep: header.count(sep) for sep in (";", "\t", "|", ",") if sep != chosen}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] else None


def _decimal_comma_columns(frame: pd.DataFrame) -> list[str]:
    """Text columns that are numbers written with a decimal comma, as semicolon files have them."""
    columns = []
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values):
            continue
        present = values.dropna().astype(str).str.strip()
        comma = present.str.fullmatch(r"[+-]?\d*,\d+")
        whole = present.str.fullmatch(r"[+-]?\d+")
        if not present.empty and comma.any() and (comma | whole).all():
            columns.append(str(column))
    return columns


def _header(path: Path, sep: str, encoding: str) -> list[str]:
    """The header row as written: pandas renames a repeated name (x1, x1.1), so ask the csv module."""
    if len(sep) != 1:
        return []
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # as pandas does, a byte-order mark is not part of the first name
    with path.open(encoding=encoding, newline="") as file:
        return next(csv.reader(file, delimiter=sep), [])


def _refuse_duplicates(path: Path, names: list[str]) -> None:
    """Two columns of one name: pandas would silently call the second `x1.1`."""
    counts = Counter(name for name in names if name)
    repeated = {name: count for name, count in counts.items() if count > 1}
    if repeated:
        listed = ", ".join(f"'{name}' ({count} times)" for name, count in repeated.items())
        first = next(iter(repeated))
        raise KilnError(
            f"data.path={path}: the header repeats column name{'s' if len(repeated) > 1 else ''} {listed}; "
            f"give each column its own name, or delete the copies (pandas would quietly rename them "
            f"{first}.1, ...)"
        )


def _separator_hint(frame: pd.DataFrame) -> str:
    """A one-column table whose header holds ';' was read with the wrong separator."""
    other = _other_separator(frame)
    if other is None:
        return ""
    return f" (one column: its header holds {_SEPARATORS[other]}; set data.sep={_sep_value(other)})"


def _not_decodable(path: Path, encoding: str) -> str:
    """Which byte on which line is not `encoding` text, and how to read the file."""
    data = path.read_bytes()
    where = ""
    try:
        data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        where = f" (byte 0x{data[exc.start]:02x} on line {line})"
    if codecs.lookup(encoding).name == "utf-8":
        return (
            f"data.path={path}: is not UTF-8 text{where}; save it as UTF-8, or read it as Latin-1 "
            "with data.encoding=latin-1 (or the encoding it was saved in, e.g. cp1252)"
        )
    return (
        f"data.path={path}: is not {encoding} text{where} (data.encoding={encoding}); set "
        "data.encoding to the encoding it was saved in (utf-8, latin-1, cp1252, ...)"
    )


def column_types(
    frame: pd.DataFrame,
    target: str,
    numeric: list[str] | None,
    categorical: list[str] | None,
    drop: list[str],
    source: str = "the table",
    warn: Warn = print_warning,
) -> tuple[list[str], list[str]]:
    """Numeric and categorical feature columns: declared ones as given, the rest detected.

    `source` says where the table came from (`data.path=cars.csv`), for messages. A row index
    saved with the file is left out, with a warning, unless a setting names it.
    """
    declared_numeric, declared_categorical = list(numeric or []), list(categorical or [])
    _check_declared_columns(frame, target, declared_numeric, declared_categorical, drop, source)
    features = [c for c in frame.columns if c != target and c not in drop]
    _leave_out_saved_index(frame, features, declared_numeric + declared_categorical, source, warn)
    detected_numeric, detected_categorical = [], []
    for column in features:
        if column in declared_numeric or column in declared_categorical:
            continue
        values = frame[column]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            detected_numeric.append(column)
        else:
            _check_numeric(frame, column, declared=False, source=source)
            detected_categorical.append(column)
    numeric_columns = [c for c in features if c in declared_numeric or c in detected_numeric]
    categorical_columns = [c for c in features if c in declared_categorical or c in detected_categorical]
    if not numeric_columns and not categorical_columns:
        raise KilnError(
            f"{source}: no feature columns besides the target '{target}'"
            + (" once data.drop_columns are dropped" if drop else "")
            + f"; give a table with feature columns, or check data.target and data.drop_columns; columns: {_list(frame)}"
        )
    return numeric_columns, categorical_columns


def _check_declared_columns(
    frame: pd.DataFrame, target: str, numeric: list[str], categorical: list[str], drop: list[str], source: str
) -> None:
    """Declared columns exist, are not the target, are declared once, and numeric ones hold numbers."""
    for declared, key in (
        (numeric, "numeric_columns"),
        (categorical, "categorical_columns"),
        (drop, "drop_columns"),
    ):
        absent = [c for c in declared if c not in frame.columns]
        if absent:
            raise KilnError(
                f"data.{key}: column{'s' if len(absent) > 1 else ''} {', '.join(map(repr, absent))} not in "
                f"{source}; fix the name{'s' if len(absent) > 1 else ''} or remove "
                f"{'them' if len(absent) > 1 else 'it'} from data.{key}; columns: {_list(frame)}"
            )
        if key != "drop_columns" and target in declared:
            raise KilnError(
                f"data.{key}: names the target column '{target}', which is what the model predicts, "
                f"not a feature; remove it from data.{key}"
            )
    both = set(numeric) & set(categorical)
    if both:
        raise KilnError(
            f"data.numeric_columns and data.categorical_columns both name {sorted(both)}; pick one"
        )
    for column in numeric:
        _check_numeric(frame, column, declared=True, source=source)


def _leave_out_saved_index(
    frame: pd.DataFrame, features: list[str], declared: list[str], source: str, warn: Warn
) -> None:
    """Remove a row index saved with the table from `features` (with a warning), unless declared."""
    index = _saved_index(frame)
    if index is None or index not in features or index in declared:
        return
    features.remove(index)
    numbers = frame[index].to_numpy()
    warn(
        f"{source}: its first column has no name and a different whole number in every row "
        f"({numbers.min()}..{numbers.max()}): a row index saved with the table (pandas' to_csv "
        f"without index=False), not a feature, so it is left out (data.numeric_columns=[{index!r}] "
        "keeps it)"
    )


def _check_numeric(frame: pd.DataFrame, column: str, *, declared: bool, source: str = "the table") -> None:
    """A numeric column with stray strings ('?', 'n/a') is an error, not silently a category."""
    values = frame[column]
    present = values.dropna()
    if present.empty or pd.api.types.is_numeric_dtype(values):
        return
    parsed = pd.to_numeric(present, errors="coerce")
    bad = present[parsed.isna()]
    if bad.empty:
        return
    mostly_numbers = parsed.notna().mean() >= 0.5
    if declared or mostly_numbers:
        position = _data_row(frame, int(frame.index.get_loc(bad.index[0])))
        distinct = list(dict.fromkeys(bad.astype(str)))
        examples = ", ".join(repr(v[:20]) for v in distinct[:3]) + (", ..." if len(distinct) > 3 else "")
        raise KilnError(
            f"column '{column}' of {source} is numeric but holds text in {len(bad)} rows ({examples}; "
            f"first in data row {position}); clean the file, leaving missing values as empty cells"
            + (
                " (data.numeric_columns declares it numeric)"
                if declared
                else f", or declare it with data.categorical_columns=[{column}]"
            )
        )


def _saved_index(frame: pd.DataFrame) -> str | None:
    """The first column if it is a row index written with the table (`to_csv` without
    `index=False`, R's `write.csv`): an empty header, which pandas names 'Unnamed: 0', over
    distinct whole numbers."""
    if frame.shape[1] == 0 or frame.columns[0] != "Unnamed: 0":
        return None
    values = frame.iloc[:, 0]
    if not pd.api.types.is_integer_dtype(values) or not values.is_unique:
        return None
    return "Unnamed: 0"


def check_finite(frame: pd.DataFrame, columns: list[str], source: str) -> None:
    """inf (read_csv reads 'inf' as a number) or a number past float32's range cannot be scaled or
    trained on, and is not an empty cell that imputation fills: name where it is, before training."""
    if not columns:
        return
    numbers = numeric_values(frame, columns)
    with np.errstate(invalid="ignore"):
        bad = np.isinf(numbers) | (np.abs(numbers) > np.finfo(np.float32).max)
    if not bad.any():
        return
    columns_bad = [column for column, hit in zip(columns, bad.any(axis=0), strict=True) if hit]
    first_row = int(np.flatnonzero(bad.any(axis=1))[0])
    first_column = int(np.flatnonzero(bad[first_row])[0])
    several, rows = len(columns_bad) > 1, int(bad.any(axis=1).sum())
    raise KilnError(
        f"column{'s' if several else ''} {', '.join(map(repr, columns_bad))} of {source} hold"
        f"{'' if several else 's'} inf or a number past float32's range in {rows} "
        f"row{'s' if rows > 1 else ''} (first {numbers[first_row, first_column]:g} in column '{columns[first_column]}', data row "
        f"{_data_row(frame, first_row)}); replace those values with empty cells (imputed like missing "
        f"values) or drop those rows"
    )


def row_id_like(targets: pd.Series) -> str | None:
    """How a regression target looks like a row id rather than a quantity, or None.

    Every value a different whole number, and either a run of consecutive numbers (1..406 in any
    order), increasing row by row, or under an id-like name ('id', 'customer_id', 'userId').
    """
    numbers = pd.to_numeric(targets, errors="coerce").to_numpy(np.float64)
    if len(numbers) < 10 or not np.all(np.mod(numbers, 1) == 0) or len(np.unique(numbers)) < len(numbers):
        return None
    low, high = int(numbers.min()), int(numbers.max())
    if high - low + 1 == len(numbers):
        return f"{low}..{high}, each once"
    if np.all(np.diff(numbers) > 0):
        return f"{low}..{high}, increasing row by row"
    if re.search(r"(^|[^a-z])(id|index|row|key|number|no)$", str(targets.name).lower()) or re.search(
        r"[a-z](ID|Id)$", str(targets.name)
    ):
        return f"{low}..{high}, under an id-like name"
    return None


def infer_task(targets: pd.Series) -> str:
    """Classification for text, booleans and small sets of integers; regression otherwise."""
    if not pd.api.types.is_numeric_dtype(targets) or pd.api.types.is_bool_dtype(targets):
        return "classification"
    values = targets.to_numpy()
    integral = np.all(np.mod(values, 1) == 0)
    return "classification" if integral and targets.nunique() <= 20 else "regression"


def _data_row(frame: pd.DataFrame, position: int) -> int:
    """The data row of the file a frame row came from, counted from 1: rows left out before (no
    target value) keep their index, so the numbers stay the file's."""
    label = frame.index[position]
    return int(label) + 1 if isinstance(label, int | np.integer) else position + 1


def _rows(frame: pd.DataFrame, positions: np.ndarray) -> str:
    shown = ", ".join(str(_data_row(frame, int(p))) for p in positions[:5])
    return shown + (", ..." if len(positions) > 5 else "")


def _list(frame: pd.DataFrame) -> str:
    columns = [str(c) for c in frame.columns]
    return ", ".join(columns[:30]) + (f", ... ({len(columns)} in all)" if len(columns) > 30 else "")
