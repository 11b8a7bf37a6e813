"""Splits: seeded, stratified, disjoint; too few rows is a KilnError that says what to change."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kiln.data.splits import split_indices, split_sizes
from kiln.errors import InvalidArgument, KilnError


def test_splits_are_disjoint_complete_and_stratified():
    targets = np.repeat([0, 1, 2], [50, 30, 20])
    splits = split_indices(targets, stratify=True, val_fraction=0.2, test_fraction=0.2, seed=0)
    rows = np.concatenate([splits.train, splits.val, splits.test])
    assert sorted(rows.tolist()) == list(range(100))
    for part in (splits.train, splits.val, splits.test):
        assert set(targets[part]) == {0, 1, 2}
    assert (len(splits.train), len(splits.val), len(splits.test)) == split_sizes(100, 0.2, 0.2)


def test_folds_share_the_test_split():
    targets = np.repeat([0, 1], 40)
    folds = [
        split_indices(
            targets, stratify=True, val_fraction=0.2, test_fraction=0.2, seed=0, num_folds=4, fold=f
        )
        for f in range(4)
    ]
    assert all(np.array_equal(f.test, folds[0].test) for f in folds)
    validated = np.concatenate([f.val for f in folds])
    assert sorted(validated.tolist()) == sorted(set(range(80)) - set(folds[0].test.tolist()))


@pytest.mark.parametrize(
    ("targets", "stratify", "fractions", "expected"),
    [
        ([0, 1, 1, 0, 1], True, (0.15, 0.15), "class 'no' has 2; add rows of that class"),
        (
            [0, 0, 0, 1, 1, 1],
            True,
            (0.15, 0.15),
            "leave 1 test row, too few for a row of each of the 2 classes",
        ),
        ([0] * 10, True, (0.15, 0.15), "single class ('no')"),
        (list(range(8)), False, (0.45, 0.45), "leave 0 training rows, too few"),
        ([0.5, 1.5], False, (0.15, 0.15), "need at least 3 rows"),
    ],
)
def test_too_few_rows_say_what_to_change(targets, stratify, fractions, expected):
    with pytest.raises(KilnError) as error:
        split_indices(
            np.asarray(targets),
            stratify=stratify,
            val_fraction=fractions[0],
            test_fraction=fractions[1],
            seed=0,
            class_names=["no", "yes"],
        )
    assert expected in str(error.value)


def test_too_many_folds_names_num_folds():
    with pytest.raises(KilnError, match=r"data.num_folds=10: .* use data.num_folds="):
        split_indices(
            np.repeat([0, 1], 8), stratify=True, val_fraction=0.2, test_fraction=0.2, seed=0, num_folds=10
        )


def test_bad_fractions_name_the_argument():
    with pytest.raises(InvalidArgument) as error:
        split_indices(np.arange(10), stratify=False, val_fraction=0.6, test_fraction=0.5, seed=0)
    assert error.value.argument == "val_fraction"


@pytest.mark.slow
def test_small_data_never_crashes_inside_scikit_learn():
    """Every tiny case either splits (every split non-empty) or raises KilnError, never ValueError."""
    for counts in itertools.product(range(1, 8), repeat=2):
        targets = np.repeat([0, 1], counts)
        for fractions, folds in itertools.product([(0.15, 0.15), (0.3, 0.3), (0.45, 0.45)], [None, 2, 3]):
            for stratify in (True, False):
                try:
                    splits = split_indices(
                        targets if stratify else targets.astype(float),
                        stratify=stratify,
                        val_fraction=fractions[0],
                        test_fraction=fractions[1],
                        seed=0,
                        num_folds=folds,
                    )
                except KilnError:
                    continue
                assert min(len(splits.train), len(splits.val), len(splits.test)) >= 1
