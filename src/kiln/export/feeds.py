"""Raw rows -> onnxruntime inputs, the same way for the export checks and for `kiln predict`.

Torch-free and pandas-free on purpose (numpy only): `kiln predict` imports this module and must
answer fast.

A table model takes one input per raw column, shaped (rows, 1): numbers as float64 with NaN where a
value is missing, categories as strings with "" where one is missing (onnxruntime would turn a
None or NaN inside a string tensor into the text 'None' or 'nan', silently: DESIGN.md). An image
or array model takes one float32 input shaped (rows, *input_shape).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.errors import KilnError

NUMERIC = "tensor(double)"
STRING = "tensor(string)"
FLOAT = "tensor(float)"


@dataclass(frozen=True)
class InputSpec:
    """An ONNX model's input: its name, onnxruntime type string and shape (None for dynamic)."""

    name: str
    type: str
    shape: tuple[int | None, ...]
    axes: tuple[str, ...] = ()  # each axis's name (a dynamic one's, e.g. "sequence") or size

    def describe(self) -> str:
        """'input_ids (int64, batch x sequence)': the input as a refusal names it."""
        dims = " x ".join(self.axes or [str(d) if d is not None else "?" for d in self.shape])
        return f"{self.name} ({self.type.removeprefix('tensor(').removesuffix(')')}, {dims})"


def specs_of(session_inputs: Sequence[object]) -> list[InputSpec]:
    """InputSpecs from `onnxruntime.InferenceSession.get_inputs()`."""
    specs = []
    for node in session_inputs:
        dims = list(getattr(node, "shape", []))
        shape = tuple(d if isinstance(d, int) else None for d in dims)
        axes = tuple(str(d) if d is not None else "?" for d in dims)
        specs.append(InputSpec(str(getattr(node, "name", "")), str(getattr(node, "type", "")), shape, axes))
    return specs


def is_table(specs: Sequence[InputSpec]) -> bool:
    """A raw-row table model: one (rows, 1) input per column, numbers or strings."""
    return all(spec.type in (NUMERIC, STRING) and len(spec.shape) == 2 for spec in specs)


# How pandas' read_csv spells a missing value (its default na_values): a CSV read here without
# pandas must see the same cells as missing as the training data did.
MISSING_TEXT = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)


def is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return bool(np.isnan(value))
    return type(value).__name__ in ("NAType", "NaTType")


def table_feeds(
    columns: Mapping[str, Any], specs: Sequence[InputSpec], source: str = "input", from_text: bool = False
) -> dict[str, np.ndarray]:
    """One (rows, 1) array per model input, from the columns of the same names (a DataFrame or a
    mapping of column name -> values)."""
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        values = np.asarray(columns[spec.name], dtype=object)
        if spec.type == NUMERIC:
            feeds[spec.name] = numeric_column(values, spec.name, source)[:, None]
        else:
            feeds[spec.name] = category_column(values, from_text)[:, None]
    return feeds


def numeric_column(values: np.ndarray, name: str, source: str) -> np.ndarray:
    """float64 with NaN for missing values; text in a numeric column is an error naming the column."""
    out = np.empty(len(values), dtype=np.float64)
    for row, value in enumerate(values):
        if is_missing(value) or (isinstance(value, str) and value.strip() in MISSING_TEXT):
            out[row] = np.nan
            continue
        try:
            out[row] = float(value)
        except (TypeError, ValueError):
            bad = sum(
                1
                for v in values
                if isinstance(v, str) and not _is_number(v) and v.strip() not in MISSING_TEXT
            )
            raise KilnError(
                f"{source}: column '{name}' must hold numbers, but row {row} holds {value!r} ({bad} such values); "
                "fix those cells (leave a cell empty for a missing value)"
            ) from None
    return out


def category_column(values: np.ndarray, from_text: bool = False) -> np.ndarray:
    """Strings as kiln's preprocessing sees them (str of each value), "" where missing.
    `from_text`: cells read as text (a CSV without pandas), where "NA", "nan"... mean missing."""
    out = np.empty(len(values), dtype=object)
    for row, value in enumerate(values):
        missing = is_missing(value) or (from_text and isinstance(value, str) and value in MISSING_TEXT)
        out[row] = "" if missing else str(value)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_columns(
    present: Sequence[str], expected: Sequence[str], source: str, ignored: Sequence[str] = ()
) -> None:
    """The rows must have exactly the model's columns (any order; `ignored` ones, e.g. the target, are
    dropped). The refusal is one short line however many columns there are: a table of 8 columns
    fed to a model of 64 pixels names a few of each, not all of them twice."""
    present = [str(c) for c in present]
    missing = [c for c in expected if c not in present]
    takes = f"the model takes {len(expected)} column{plural(expected)}: {few(expected)}"
    if missing and len(missing) == len(expected):
        raise KilnError(
            f"{source}: none of the model's columns; {takes}; the file has {len(present)}: {few(present)}; "
            "give rows with the model's columns"
        )
    if missing:
        raise KilnError(f"{source}: missing column{plural(missing)} {few(missing, quoted=True)}; {takes}")
    extra = [c for c in present if c not in expected and c not in ignored]
    if extra:
        raise KilnError(
            f"{source}: column{plural(extra)} {few(extra, quoted=True)} not taken by the model; drop "
            f"{'them' if len(extra) > 1 else 'it'} ({takes})"
        )
    duplicated = sorted({c for c in present if present.count(c) > 1})
    if duplicated:
        raise KilnError(f"{source}: column {shortened(duplicated[0])!r} appears more than once")


SHOWN_NAMES = 4  # column names a refusal lists before "... and N more"
LONGEST_NAME = 40  # characters of a column name a refusal shows (a header cell can be any length)


def few(names: Sequence[str], quoted: bool = False) -> str:
    """The first SHOWN_NAMES of `names` (each cut to LONGEST_NAME characters), then how many more."""
    shown = [repr(shortened(n)) if quoted else shortened(n) for n in names[:SHOWN_NAMES]]
    more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    return ", ".join(shown) + more


def shortened(name: str) -> str:
    return name if len(name) <= LONGEST_NAME else name[: LONGEST_NAME - 3] + "..."


def plural(items: Sequence[object]) -> str:
    return "s" if len(items) > 1 else ""


def array_feeds(values: np.ndarray, spec: InputSpec, source: str = "input") -> dict[str, np.ndarray]:
    """An array model's one input; rows of flat features are reshaped to the model's input shape."""
    if values.dtype.kind not in "fiub":
        raise KilnError(f"{source}: the model takes numbers, got an array of {values.dtype}")
    shape = tuple(d for d in spec.shape[1:])
    if any(d is None for d in shape):
        raise KilnError(
            f"input {spec.name} has a dynamic non-batch dimension {spec.shape}; kiln cannot feed it"
        )
    size = int(np.prod([int(d) for d in shape if d is not None]))
    if values.ndim < 1 or len(values) == 0:
        raise KilnError(f"{source}: no rows")
    flat = values.reshape(len(values), -1)
    if flat.shape[1] != size:
        raise KilnError(
            f"{source}: each row has {flat.shape[1]} values but the model takes {size} (shape {list(shape)})"
        )
    return {
        spec.name: flat.astype(np.float32).reshape(len(values), *[int(d) for d in shape if d is not None])
    }


def tile_rows(feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Exactly `rows` rows, repeating the given ones (for latency at a fixed batch size)."""
    out = {}
    for name, value in feeds.items():
        reps = -(-rows // len(value))
        out[name] = np.concatenate([value] * reps, axis=0)[:rows]
    return out


def take_rows(feeds: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: value[start:stop] for name, value in feeds.items()}


def num_rows(feeds: dict[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values())))


# The kinds of numpy array each ONNX element type takes (cast to that type): integers for token
# ids, 0/1 integers or booleans for a mask, any numbers for a float input.
TAKES_KINDS = {"int64": "iub", "int32": "iub", "bool": "biu", "float": "fiub", "double": "fiub"}
NUMPY_TYPES = {
    "int64": np.int64,
    "int32": np.int32,
    "bool": np.bool_,
    "float": np.float32,
    "double": np.float64,
}


def named_feeds(arrays: Mapping[str, Any], specs: Sequence[InputSpec], source: str) -> dict[str, np.ndarray]:
    """A model of several named inputs: one array per input, from the arrays of the same names
    (an .npz, or Parquet columns of lists), each checked against what the model takes (its
    element type, number of axes, fixed sizes) and with the rows and the named dynamic axes
    (e.g. `sequence`) the same size in every input. Arrays the model does not take (e.g. the
    labels) are left out. Every refusal is one line naming the input and what the model expects."""
    takes = f"the model takes {', '.join(spec.describe() for spec in specs)}"
    missing = [spec.name for spec in specs if spec.name not in arrays]
    if missing:
        given = ", ".join(sorted(map(str, arrays))) or "none"
        raise KilnError(f"{source}: no array {missing[0]!r} (arrays given: {given}); {takes}")
    feeds: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[int, str]] = {}  # an axis name -> (its size, the input that set it)
    for spec in specs:
        values = np.asarray(arrays[spec.name])
        element = spec.type.removeprefix("tensor(").removesuffix(")")
        if values.dtype.kind not in TAKES_KINDS.get(element, "fiub"):
            raise KilnError(f"{source}: array {spec.name!r} holds {values.dtype}, but {takes}")
        if values.ndim != len(spec.shape):
            raise KilnError(
                f"{source}: array {spec.name!r} has shape {list(values.shape)} ({values.ndim} axes), but {takes}"
            )
        for axis, (size, name) in enumerate(
            zip(values.shape, spec.axes or ("?",) * values.ndim, strict=True)
        ):
            if spec.shape[axis] is not None and size != spec.shape[axis]:
                raise KilnError(
                    f"{source}: array {spec.name!r} has {size} on axis {axis}, the model takes {spec.shape[axis]} "
                    f"there; {takes}"
                )
            key = "batch (rows)" if axis == 0 else name
            if spec.shape[axis] is None and key != "?":
                first = sizes.setdefault(key, (int(size), spec.name))
                if first[0] != size:
                    raise KilnError(
                        f"{source}: array {spec.name!r} has {size} on its {key} axis but {first[1]!r} has "
                        f"{first[0]}; they must match ({takes})"
                    )
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise KilnError(f"{source}: array {spec.name!r} holds NaN or inf; give finite numbers")
        with np.errstate(over="ignore", invalid="ignore"):
            feeds[spec.name] = np.ascontiguousarray(values.astype(NUMPY_TYPES.get(element, np.float32)))
    if not num_rows(feeds):
        raise KilnError(f"{source}: no rows")
    return feeds


def stacked_column(values: Sequence[Any], name: str, source: str) -> np.ndarray:
    """A table column holding one array (or list) per row, as one array of rows; rows of
    different lengths are refused, naming the first that differs."""
    rows = [np.asarray(value) for value in values]
    first = rows[0].shape
    for index, row in enumerate(rows):
        if row.shape != first:
            raise KilnError(
                f"{source}: column {name!r} holds {list(row.shape)} values in row {index + 1} but "
                f"{list(first)} in row 1; give every row the same length (pad it, as the model was trained)"
            )
    return np.stack(rows) if rows else np.zeros((0,))
