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
    require(0 < val_fraction < 1, "val_fraction", f"must be between 0 and 1, got {val_fraction}")
    require(0 < test_fraction < 1, "test_fraction", f"must be between 0 and 1, got {test_fraction}")
    require(
        val_fraction + test_fraction < 1,
        "val_fraction",
        f"val_fraction + test_fraction must leave rows to train on, got {val_fraction} + {test_fraction}",
    )
    if num_folds is not None:
        require(num_folds >= 2, "num_folds", f"k-fold needs at least 2 folds, got {num_folds}")
        require(0 <= fold < num_folds, "fold", f"must be in 0..{num_folds - 1}, got {fold}")


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
    n_rows = len(targets)
    shape = _shape(n_rows, val_fraction, test_fraction, num_folds)
    needed, per_split = 1, "at least one row"
    if stratify:
        classes, counts = np.unique(targets, return_counts=True)

        def label(index: int) -> str:
            value = classes[index]
            return (
                repr(class_names[value])
                if class_names is not None and 0 <= value < len(class_names)
                else repr(value)
            )

        if len(classes) < 2:
            raise KilnError(
                f"the target has a single class ({label(0) if len(classes) else 'no rows'}): nothing to "
                "classify; check data.target, or declare data.task=regression"
            )
        rarest = int(np.argmin(counts))
        if counts[rarest] < 3:
            raise KilnError(
                f"{shape} need at least 3 rows of every class (one each for train, validation and test), "
                f"but class {label(rarest)} has {counts[rarest]}; add rows of that class, or drop its rows"
            )
        needed, per_split = len(classes), f"a row of each of the {len(classes)} classes"
    if n_rows < 3:
        raise KilnError(f"{shape} need at least 3 rows (one per split); add rows")
    n_train, n_val, n_test = split_sizes(n_rows, val_fraction, test_fraction)
    if n_test < needed:
        raise KilnError(
            f"{shape} leave {_rows(n_test, 'test')}, too few for {per_split}; add rows or raise data.test_fraction"
        )
    if num_folds is None and n_val < needed:
        raise KilnError(
            f"{shape} leave {_rows(n_val, 'validation')}, too few for {per_split}; add rows or raise "
            "data.val_fraction"
        )
    if num_folds is None and n_train < needed:
        raise KilnError(
            f"{shape} leave {_rows(n_train, 'training')}, too few for {per_split}; add rows or lower "
            "data.val_fraction and data.test_fraction"
        )
    if num_folds is not None:
        n_rest = n_train + n_val
        # each fold validates on about 1/num_folds of the rows outside the test split
        smallest_left = (
            int(np.floor(np.unique(targets, return_counts=True)[1].min() * (1 - test_fraction)))
            if stratify
            else n_rest
        )
        if num_folds > smallest_left or n_rest // num_folds < needed:
            what = f"the smallest class ({label(rarest)}) has" if stratify else "the data has"
            raise KilnError(
                f"data.num_folds={num_folds}: {what} only {smallest_left} rows outside the test split, "
                f"too few for {num_folds} folds with {per_split} each; add rows or use data.num_folds="
                f"{max(2, min(smallest_left, n_rest // needed))}"
            )
