"""Seeded train/validation/test splits, stratified for classification, with optional k-fold.

The test split is held out first and never moves; with `num_folds`, the rest is cut into
stratified folds and `fold` picks which one validates. So every fold of a cross-validation is
scored on the same test rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import ceil

import numpy as np

from kiln.errors import KilnError, require


@dataclass(frozen=True)
class Splits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def check_split_settings(val_fraction: float, test_fraction: float, num_folds: int | None, fold: int) -> None:
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        require(_is_number(fraction) and 0 < fraction < 1, name, f"must be between 0 and 1, got {fraction!r}")
    require(
        val_fraction + test_fraction < 1,
        "val_fraction",
        f"val_fraction + test_fraction must leave rows to train on, got {val_fraction} + {test_fraction}",
    )
    if num_folds is not None:
        require(
            _is_int(num_folds) and num_folds >= 2,
            "num_folds",
            f"k-fold needs at least 2 folds, got {num_folds!r}",
        )
        require(
            _is_int(fold) and 0 <= fold < num_folds, "fold", f"must be in 0..{num_folds - 1}, got {fold!r}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def split_indices(
    targets: np.ndarray,
    *,
    stratify: bool,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    num_folds: int | None = None,
    fold: int = 0,
    class_names: Sequence[str] | None = None,
) -> Splits:
    """Row indices of each split. `targets` are class indices when `stratify` is true.

    Too few rows for the requested splits is a KilnError that says which split comes out empty (or
    which class is too rare) and which setting to change, checked before scikit-learn is asked.
    """
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    check_split_settings(val_fraction, test_fraction, num_folds, fold)
    n_rows = len(targets)
    rows = np.arange(n_rows)
    _check_enough_rows(targets, stratify, val_fraction, test_fraction, num_folds, class_names)
    strata = targets if stratify else None
    try:
        rest, test = train_test_split(rows, test_size=test_fraction, random_state=seed, stratify=strata)
        rest_strata = targets[rest] if stratify else None
        if num_folds is None:
            train, val = train_test_split(
                rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=rest_strata
            )
        else:
            folds = (
                StratifiedKFold(num_folds, shuffle=True, random_state=seed)
                if stratify
                else KFold(num_folds, shuffle=True, random_state=seed)
            )
            train_pos, val_pos = list(folds.split(rest, rest_strata))[fold]
            train, val = rest[train_pos], rest[val_pos]
    except ValueError as exc:  # a case the checks above did not foresee: still the user's data
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KilnError(
            f"{_shape(n_rows, val_fraction, test_fraction, num_folds)} cannot be made (scikit-learn: {reason}); "
            "add rows, or change data.val_fraction/data.test_fraction"
            + ("/data.num_folds" if num_folds is not None else "")
        ) from exc
    return Splits(train=np.sort(train), val=np.sort(val), test=np.sort(test))


def split_sizes(n_rows: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Rows in train, val and test, rounded as scikit-learn's train_test_split rounds them."""
    n_test = ceil(test_fraction * n_rows)
    n_rest = n_rows - n_test
    n_val = ceil(val_fraction / (1 - test_fraction) * n_rest)
    return n_rest - n_val, n_val, n_test


def _shape(n_rows: int, val_fraction: float, test_fraction: float, num_folds: int | None) -> str:
    train = 1 - val_fraction - test_fraction
    folds = f" with {num_folds} folds" if num_folds is not None else ""
    return (
        f"the data has {n_rows} rows: train/validation/test splits of "
        f"{train:.0%}/{val_fraction:.0%}/{test_fraction:.0%}{folds}"
    )


def _rows(count: int, kind: str) -> str:
    return f"{count} {kind} row{'' if count == 1 else 's'}"


def _check_enough_rows(
    targets: np.ndarray,
    stratify: bool,
    val_fraction: float,
    test_fraction: float,
    num_folds: int | None,
    class_names: Sequence[str] | None,
) -> None:
    """Each split (each fold) must get a row, and with `stratify` a row of every class."""
    shape = _shape(len(targets), val_fraction, test_fraction, num_folds)
    classes = _check_classes(targets, shape, class_names) if stratify else None
    if len(targets) < 3:
        raise KilnError(f"{shape} need at least 3 rows (one per split); add rows")
    needed = len(classes.names) if classes else 1
    per_split = f"a row of each of the {needed} classes" if classes else "at least one row"
    n_train, n_val, n_test = split_sizes(len(targets), val_fraction, test_fraction)
    if n_test < needed:
        raise KilnError(
            f"{shape} leave {_rows(n_test, 'test')}, too few for {per_split}; add rows or raise data.test_fraction"
        )
    if num_folds is None:
        _check_train_and_validation(n_train, n_val, shape, needed, per_split)
    else:
        _check_folds(n_train + n_val, test_fraction, num_folds, classes, needed, per_split)


@dataclass(frozen=True)
class _Classes:
    names: list[str]  # each class as messages show it: 'Adelie', or its index without class_names
    counts: np.ndarray  # rows per class

    @property
    def rarest(self) -> int:
        return int(np.argmin(self.counts))


def _check_classes(targets: np.ndarray, shape: str, class_names: Sequence[str] | None) -> _Classes:
    """At least two classes, and at least 3 rows (one per split) of each."""
    values, counts = np.unique(targets, return_counts=True)
    names = [
        repr(class_names[value]) if class_names is not None and 0 <= value < len(class_names) else repr(value)
        for value in values
    ]
    if len(values) < 2:
        raise KilnError(
            f"the target has a single class ({names[0] if names else 'no rows'}): nothing to "
            "classify; check data.target, or declare data.task=regression"
        )
    classes = _Classes(names, counts)
    if counts[classes.rarest] < 3:
        raise KilnError(
            f"{shape} need at least 3 rows of every class (one each for train, validation and test), "
            f"but class {names[classes.rarest]} has {counts[classes.rarest]}; add rows of that class, "
            "or drop its rows"
        )
    return classes


def _check_train_and_validation(n_train: int, n_val: int, shape: str, needed: int, per_split: str) -> None:
    if n_val < needed:
        raise KilnError(
            f"{shape} leave {_rows(n_val, 'validation')}, too few for {per_split}; add rows or raise "
            "data.val_fraction"
        )
    if n_train < needed:
        raise KilnError(
            f"{shape} leave {_rows(n_train, 'training')}, too few for {per_split}; add rows or lower "
            "data.val_fraction and data.test_fraction"
        )


def _check_folds(
    n_rest: int, test_fraction: float, num_folds: int, classes: _Classes | None, needed: int, per_split: str
) -> None:
    """`n_rest` rows outside the test split; each fold validates on about 1/num_folds of them."""
    smallest_left = int(np.floor(classes.counts.min() * (1 - test_fraction))) if classes else n_rest
    if num_folds > smallest_left or n_rest // num_folds < needed:
        what = f"the smallest class ({classes.names[classes.rarest]}) has" if classes else "the data has"
        raise KilnError(
            f"data.num_folds={num_folds}: {what} only {smallest_left} rows outside the test split, "
            f"too few for {num_folds} folds with {per_split} each; add rows or use data.num_folds="
            f"{max(2, min(smallest_left, n_rest // needed))}"
        )
