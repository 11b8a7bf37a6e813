"""Seeded train/validation/test splits, stratified for classification, with optional k-fold.

The test split is held out first and never moves; with `num_folds`, the rest is cut into
stratified folds and `fold` picks which one validates. So every fold of a cross-validation is
scored on the same test rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

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
) -> Splits:
    """Row indices of each split. `targets` are class indices when `stratify` is true."""
    check_split_settings(val_fraction, test_fraction, num_folds, fold)
    n_rows = len(targets)
    rows = np.arange(n_rows)
    if stratify:
        _check_enough_per_class(targets, val_fraction, test_fraction, num_folds)
    elif n_rows * min(val_fraction, test_fraction) < 1 or n_rows < 3:
        raise KilnError(
            f"the data has {n_rows} rows: too few for splits of {1 - val_fraction - test_fraction:.0%}/"
            f"{val_fraction:.0%}/{test_fraction:.0%} (each split needs at least one row); add rows or raise "
            "data.val_fraction/data.test_fraction"
        )
    strata = targets if stratify else None
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
    return Splits(train=np.sort(train), val=np.sort(val), test=np.sort(test))


def _check_enough_per_class(
    targets: np.ndarray, val_fraction: float, test_fraction: float, num_folds: int | None
) -> None:
    classes, counts = np.unique(targets, return_counts=True)
    n_rows, n_classes = len(targets), len(classes)
    smallest = int(counts.min())
    if n_classes < 2:
        raise KilnError(
            f"the target has a single class ({classes[0]!r}): nothing to classify; check data.target, "
            "or declare data.task=regression"
        )
    # each of train, val and test needs a member of every class for a stratified split
    needed = max(3, int(np.ceil(n_classes / min(val_fraction, test_fraction))))
    if smallest < 3 or n_rows < needed:
        raise KilnError(
            f"the data has {n_rows} rows and its smallest class has {smallest}: too few for stratified "
            f"train/val/test splits of {val_fraction:.0%} and {test_fraction:.0%} validation and test "
            f"(needs at least 3 rows per class and {needed} rows); add rows or raise data.val_fraction/"
            "data.test_fraction"
        )
    if num_folds is not None:
        # the test split takes its share of each class before folding
        smallest_left = int(np.floor(smallest * (1 - test_fraction)))
        if num_folds > smallest_left:
            raise KilnError(
                f"data.num_folds={num_folds}: the smallest class has only {smallest_left} rows outside the test "
                f"split, fewer than the folds; use data.num_folds<={max(smallest_left, 2)}"
            )
