"""Reading a table (a built-in data set or a user's CSV/Parquet file) and typing its columns.

Every mistake in the data is reported with the file or column it concerns and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

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


def read_table(name: str | None, path: str | None, target: str | None) -> tuple[pd.DataFrame, str, str]:
    """The table, its target column and where it came from (for messages)."""
    if path:
        frame, source = read_file(Path(path)), f"data.path={path}"
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
        raise KilnError(f"data.target={target}: no such column in {source}; columns: {_list(frame)}")
    if len(frame) == 0:
        raise KilnError(f"{source}: the table has a header but no rows")
    missing = frame[target].isna().to_numpy()
    if missing.any():
        rows = np.flatnonzero(missing)
        raise KilnError(
            f"data.target={target}: {len(rows)} rows of {source} have no target value (rows "
            f"{', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''}); drop or fill those rows"
        )
    return frame, target, source


def read_file(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise KilnError(
            f"data.path={path}: file not found (looked at {path.resolve()}); give a CSV or Parquet file"
        )
    if path.is_dir():
        raise KilnError(f"data.path={path}: is a directory; give a CSV or Parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".txt", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except pd.errors.EmptyDataError as exc:
        raise KilnError(
            f"data.path={path}: the file is empty; give a table with a header row and data rows"
        ) from exc
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KilnError(f"data.path={path}: cannot read it as a {suffix[1:]} table ({reason})") from exc
    raise KilnError(f"data.path={path}: unknown file type '{suffix}'; use .csv, .tsv or .parquet")


def column_types(
    frame: pd.DataFrame,
    target: str,
    numeric: list[str] | None,
    categorical: list[str] | None,
    drop: list[str],
    source: str = "the table",
) -> tuple[list[str], list[str]]:
    """Numeric and categorical feature columns: declared ones as given, the rest detected.

    `source` says where the table came from (`data.path=cars.csv`), for messages.
    """
    for declared, key in (
        (numeric, "numeric_columns"),
        (categorical, "categorical_columns"),
        (drop, "drop_columns"),
    ):
        absent = [c for c in declared or [] if c not in frame.columns]
        if absent:
            raise KilnError(
                f"data.{key}: column{'s' if len(absent) > 1 else ''} {', '.join(map(repr, absent))} not in "
                f"{source}; fix the name{'s' if len(absent) > 1 else ''} or remove "
                f"{'them' if len(absent) > 1 else 'it'} from data.{key}; columns: {_list(frame)}"
            )
        if key != "drop_columns" and target in (declared or []):
            raise KilnError(
                f"data.{key}: names the target column '{target}', which is what the model predicts, "
                f"not a feature; remove it from data.{key}"
            )
    both = set(numeric or []) & set(categorical or [])
    if both:
        raise KilnError(
            f"data.numeric_columns and data.categorical_columns both name {sorted(both)}; pick one"
        )
    declared_numeric, declared_categorical = list(numeric or []), list(categorical or [])
    for column in declared_numeric:
        _check_numeric(frame, column, declared=True, source=source)
    features = [c for c in frame.columns if c != target and c not in drop]
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
        position = int(frame.index.get_loc(bad.index[0])) + 1
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


def infer_task(targets: pd.Series) -> str:
    """Classification for text, booleans and small sets of integers; regression otherwise."""
    if not pd.api.types.is_numeric_dtype(targets) or pd.api.types.is_bool_dtype(targets):
        return "classification"
    values = targets.to_numpy()
    integral = np.all(np.mod(values, 1) == 0)
    return "classification" if integral and targets.nunique() <= 20 else "regression"


def _list(frame: pd.DataFrame) -> str:
    columns = [str(c) for c in frame.columns]
    return ", ".join(columns[:30]) + (f", ... ({len(columns)} in all)" if len(columns) > 30 else "")
