"""Preprocessing for tables, fitted on the training split only.

scikit-learn's transformers do the fitting (SimpleImputer, StandardScaler/MinMaxScaler,
OneHotEncoder, SelectKBest with mutual information, VarianceThreshold). What they learn is then
kept as plain numbers and strings (fill values, offsets, scales, categories, the kept columns):
that state goes into checkpoints without pickling, and applying it is a few lines of numpy that
an ONNX graph can mirror. `tests/data/test_preprocessing.py` checks it against sklearn's own
ColumnTransformer.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd

from kiln.errors import require

Imputation = Literal["mean", "median", "most_frequent", "constant"]
Scaling = Literal["standard", "minmax", "none"]
Selection = Literal["none", "k_best", "variance"]


class TablePreprocessor:
    def __init__(
        self,
        numeric_columns: list[str],
        categorical_columns: list[str],
        *,
        numeric_imputation: Imputation = "median",
        categorical_imputation: Literal["most_frequent", "constant"] = "most_frequent",
        fill_value: float = 0.0,
        scaling: Scaling = "standard",
        feature_selection: Selection = "none",
        k_best: int = 10,
        variance_threshold: float = 0.0,
    ) -> None:
        require(
            numeric_imputation in ("mean", "median", "most_frequent", "constant"),
            "numeric_imputation",
            f"must be mean, median, most_frequent or constant, got {numeric_imputation!r}",
        )
        require(
            categorical_imputation in ("most_frequent", "constant"),
            "categorical_imputation",
            f"must be most_frequent or constant, got {categorical_imputation!r}",
        )
        require(
            scaling in ("standard", "minmax", "none"),
            "scaling",
            f"must be standard, minmax or none, got {scaling!r}",
        )
        require(
            feature_selection in ("none", "k_best", "variance"),
            "feature_selection",
            f"must be none, k_best or variance, got {feature_selection!r}",
        )
        require(k_best >= 1, "k_best", f"must be >= 1, got {k_best}")
        self.numeric_columns = list(numeric_columns)
        self.categorical_columns = list(categorical_columns)
        self.numeric_imputation = numeric_imputation
        self.categorical_imputation = categorical_imputation
        self.fill_value = fill_value
        self.scaling = scaling
        self.feature_selection = feature_selection
        self.k_best = k_best
        self.variance_threshold = variance_threshold
        # learned by fit(): plain values only
        self.numeric_fill: list[float] = []
        self.offset: list[float] = []
        self.scale: list[float] = []
        self.categorical_fill: list[str] = []
        self.categories: list[list[str]] = []
        self.kept: list[bool] = []

    # -- fitting with scikit-learn -------------------------------------------------------------

    def fit(self, frame: pd.DataFrame, targets: np.ndarray, task: str) -> TablePreprocessor:
        from sklearn.impute import SimpleImputer
        from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, StandardScaler

        if self.numeric_columns:
            numbers = numeric_values(frame, self.numeric_columns)
            imputer = SimpleImputer(
                strategy=self.numeric_imputation, fill_value=self.fill_value, keep_empty_features=True
            )
            filled = imputer.fit_transform(numbers)
            self.numeric_fill = imputer.statistics_.astype(float).tolist()
            if self.scaling == "standard":
                scaler = StandardScaler().fit(filled)
                self.offset, self.scale = scaler.mean_.tolist(), scaler.scale_.tolist()
            elif self.scaling == "minmax":
                minmax = MinMaxScaler().fit(filled)
                span = minmax.data_range_.copy()
                span[span == 0] = 1.0
                self.offset, self.scale = minmax.data_min_.tolist(), span.tolist()
            else:
                self.offset, self.scale = [0.0] * len(self.numeric_columns), [1.0] * len(self.numeric_columns)
        if self.categorical_columns:
            labels = category_values(frame, self.categorical_columns)
            strategy = "most_frequent" if self.categorical_imputation == "most_frequent" else "constant"
            cat_imputer = SimpleImputer(
                strategy=strategy, missing_values=None, fill_value="missing", keep_empty_features=True
            )
            filled_labels = cat_imputer.fit_transform(labels)
            self.categorical_fill = [str(v) for v in cat_imputer.statistics_]
            encoder = OneHotEncoder(handle_unknown="ignore").fit(filled_labels)
            self.categories = [[str(c) for c in column] for column in encoder.categories_]
        self.kept = [True] * len(self.output_names(selected=False))
        if self.feature_selection != "none":
            self.kept = self._select(self.transform(frame, select=False), targets, task)
        return self

    def _select(self, encoded: np.ndarray, targets: np.ndarray, task: str) -> list[bool]:
        from sklearn.feature_selection import (
            SelectKBest,
            VarianceThreshold,
            mutual_info_classif,
            mutual_info_regression,
        )

        if self.feature_selection == "variance":
            selector: Any = VarianceThreshold(self.variance_threshold)
        else:
            score = mutual_info_classif if task == "classification" else mutual_info_regression
            selector = SelectKBest(
                lambda x, y: score(x, y, random_state=0), k=min(self.k_best, encoded.shape[1])
            )
        try:
            selector.fit(encoded, targets)
        except ValueError as exc:  # e.g. no feature passes the variance threshold
            raise ValueError(f"feature_selection={self.feature_selection}: {exc}") from exc
        return selector.get_support().tolist()

    # -- applying what was learned ------------------------------------------------------------

    def transform(self, frame: pd.DataFrame, select: bool = True) -> np.ndarray:
        blocks = []
        if self.numeric_columns:
            numbers = numeric_values(frame, self.numeric_columns)
            numbers = np.where(np.isnan(numbers), np.asarray(self.numeric_fill), numbers)
            blocks.append((numbers - np.asarray(self.offset)) / np.asarray(self.scale))
        if self.categorical_columns:
            labels = category_values(frame, self.categorical_columns)
            for index, categories in enumerate(self.categories):
                column = labels[:, index]
                column = np.where(pd.isna(column), self.categorical_fill[index], column)
                # a category never seen in training encodes as all zeros
                blocks.append(
                    (column[:, None] == np.asarray(categories, dtype=object)[None, :]).astype(np.float64)
                )
        encoded = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0))
        if select and self.kept and not all(self.kept):
            encoded = encoded[:, np.asarray(self.kept)]
        return encoded.astype(np.float32)

    def output_names(self, selected: bool = True) -> list[str]:
        names = list(self.numeric_columns)
        for column, categories in zip(self.categorical_columns, self.categories, strict=True):
            names += [f"{column}={category}" for category in categories]
        if selected and self.kept:
            names = [name for name, keep in zip(names, self.kept, strict=True) if keep]
        return names

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if not key.startswith("_")}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TablePreprocessor:
        preprocessor = cls(state["numeric_columns"], state["categorical_columns"])
        vars(preprocessor).update(state)
        return preprocessor


def numeric_values(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    return frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)


def category_values(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Category labels as strings, with None where missing (numbers-as-categories become '1', '2').

    Built with numpy: pandas turns a None put into an object column back into NaN.
    """
    values = frame[columns].to_numpy(dtype=object)
    labels = values.astype(str).astype(object)
    labels[pd.isna(values)] = None
    return labels
