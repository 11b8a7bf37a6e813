"""TablePreprocessor against scikit-learn: what kiln applies with plain numbers must be exactly what
sklearn's own fitted ColumnTransformer computes, unseen categories and missing values included."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, StandardScaler

from kiln.data.preprocessing import TablePreprocessor

NUMERIC = ["length", "mass", "count"]
CATEGORICAL = ["island", "sex"]


def frame(n_rows: int = 40, seed: int = 0) -> pd.DataFrame:
    """Numbers with NaNs (one column constant), strings with missing values."""
    rng = np.random.default_rng(seed)
    data = pd.DataFrame(
        {
            "length": rng.normal(40, 5, n_rows),
            "mass": rng.normal(4000, 800, n_rows),
            "count": np.full(n_rows, 3.0),  # zero variance: the scalers must not divide by 0
            "island": rng.choice(["Biscoe", "Dream", "Torgersen", "Dream"], n_rows).astype(object),
            "sex": rng.choice(["female", "male", "male"], n_rows).astype(object),
        }
    )
    data.loc[[1, 5, 9], "length"] = np.nan
    data.loc[[2, 3], "mass"] = np.nan
    data.loc[[4, 7, 8], "island"] = np.nan
    data.loc[[0, 6], "sex"] = None
    return data


def new_rows() -> pd.DataFrame:
    """Rows never seen in fitting: an unseen category, all-missing values, text in a numeric column."""
    return pd.DataFrame(
        {
            "length": [35.0, np.nan, 52.5],
            "mass": [np.nan, 3100.0, 5000.0],
            "count": [3.0, np.nan, 4.0],
            "island": ["Atlantis", np.nan, "Dream"],
            "sex": [None, "female", "male"],
        }
    )


def reference(numeric_imputation: str, categorical_imputation: str, scaling: str) -> ColumnTransformer:
    scaler = {"standard": StandardScaler(), "minmax": MinMaxScaler(), "none": "passthrough"}[scaling]
    categorical_imputer = (
        SimpleImputer(strategy="most_frequent")
        if categorical_imputation == "most_frequent"
        else SimpleImputer(strategy="constant", fill_value="missing")
    )
    return ColumnTransformer(
        [
            (
                "numeric",
                Pipeline(
                    [
                        ("impute", SimpleImputer(strategy=numeric_imputation, fill_value=0.0)),
                        ("scale", scaler),
                    ]
                ),
                NUMERIC,
            ),
            (
                "categorical",
                Pipeline(
                    [
                        ("impute", categorical_imputer),
                        ("encode", OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
                    ]
                ),
                CATEGORICAL,
            ),
        ],
        sparse_threshold=0.0,
    )


def fitted(**settings: object) -> TablePreprocessor:
    data = frame()
    targets = (data["island"] == "Dream").to_numpy().astype(np.int64)
    return TablePreprocessor(NUMERIC, CATEGORICAL, **settings).fit(data, targets, "classification")  # type: ignore[arg-type]


@pytest.mark.parametrize("scaling", ["standard", "minmax", "none"])
@pytest.mark.parametrize("numeric_imputation", ["median", "mean", "most_frequent", "constant"])
@pytest.mark.parametrize("categorical_imputation", ["most_frequent", "constant"])
def test_transform_equals_sklearn_column_transformer(
    scaling: str, numeric_imputation: str, categorical_imputation: str
):
    ours = fitted(
        scaling=scaling, numeric_imputation=numeric_imputation, categorical_imputation=categorical_imputation
    )
    theirs = reference(numeric_imputation, categorical_imputation, scaling).fit(frame())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unknown categories.*")
        for rows in (frame(), new_rows()):
            expected = theirs.transform(rows)
            got = ours.transform(rows)
            assert got.dtype == np.float32
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    encoder = theirs.named_transformers_["categorical"].named_steps["encode"]
    assert ours.categories == [list(c) for c in encoder.categories_]


def test_unseen_category_encodes_as_zeros():
    ours = fitted()
    encoded = ours.transform(new_rows())
    island = [i for i, name in enumerate(ours.output_names()) if name.startswith("island=")]
    assert encoded[0, island].tolist() == [0.0] * len(island)  # "Atlantis"
    assert encoded[2, island].sum() == 1.0  # "Dream"


def test_state_round_trip_gives_the_same_output():
    ours = fitted(scaling="minmax", feature_selection="k_best", k_best=4)
    state = json.loads(json.dumps(ours.state_dict()))  # plain values only: no pickling needed
    again = TablePreprocessor.from_state(state)
    for rows in (frame(), new_rows()):
        np.testing.assert_array_equal(again.transform(rows), ours.transform(rows))
    assert again.output_names() == ours.output_names()


def test_k_best_keeps_k_columns():
    everything = fitted()
    ours = fitted(feature_selection="k_best", k_best=3)
    assert ours.transform(frame()).shape == (len(frame()), 3)
    assert len(ours.output_names()) == 3
    assert set(ours.output_names()) <= set(everything.output_names())
    # the kept columns are those columns of the full encoding
    kept = [everything.output_names().index(name) for name in ours.output_names()]
    np.testing.assert_array_equal(ours.transform(new_rows()), everything.transform(new_rows())[:, kept])


def test_k_best_above_the_column_count_keeps_them_all():
    everything = fitted()
    ours = fitted(feature_selection="k_best", k_best=100)
    assert ours.output_names() == everything.output_names()


def test_variance_selection_drops_the_constant_column():
    ours = fitted(feature_selection="variance", variance_threshold=0.0)
    assert "count" not in ours.output_names()
    assert len(ours.output_names()) == len(fitted().output_names()) - 1


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("scaling", "robust"),
        ("numeric_imputation", "zero"),
        ("categorical_imputation", "median"),
        ("feature_selection", "pca"),
        ("k_best", 0),
    ],
)
def test_bad_settings_name_the_argument(setting: str, value: object):
    from kiln.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as error:
        TablePreprocessor(NUMERIC, CATEGORICAL, **{setting: value})  # type: ignore[arg-type]
    assert error.value.argument == setting
