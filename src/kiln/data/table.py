"""One DataModule for any table: a built-in one by name, or a user's CSV or Parquet file.

    kiln train data=table data.name=penguins
    kiln train data=table data.path=cars.csv data.target=Miles_per_Gallon

The task comes from the target column (or `task`); numeric and categorical columns are detected
(or declared). Preprocessing is fitted on the training split only and saved in the checkpoint.
What the data does that a user should know about (rows left out for lack of a target, a saved
row index, a target that looks like a row id) is one warning line on stderr, printed once.
"""

from __future__ import annotations

import codecs
from typing import Any, Literal

import numpy as np
import pandas as pd

from kiln.data.base import InMemoryDataModule, LoadedData
from kiln.data.preprocessing import Imputation, Scaling, Selection, TablePreprocessor
from kiln.data.tables import (
    check_finite,
    column_types,
    infer_task,
    print_warning,
    read_table,
    row_id_like,
)
from kiln.errors import KilnError, require


class TableDataModule(InMemoryDataModule):
    def __init__(
        self,
        name: str | None = "penguins",
        path: str | None = None,
        target: str | None = None,
        task: Literal["auto", "classification", "regression"] = "auto",
        numeric_columns: list[str] | None = None,
        categorical_columns: list[str] | None = None,
        drop_columns: list[str] | None = None,
        missing_target: Literal["drop", "error"] = "drop",
        encoding: str = "utf-8",
        sep: str = "auto",
        numeric_imputation: Imputation = "median",
        categorical_imputation: Literal["most_frequent", "constant"] = "most_frequent",
        fill_value: float = 0.0,
        scaling: Scaling = "standard",
        feature_selection: Selection = "none",
        k_best: int = 10,
        variance_threshold: float = 0.0,
        **settings: Any,  # the shared ones (kiln.data.settings) and batches_per_chunk
    ) -> None:
        super().__init__(**settings)
        _check_reading(task, missing_target, encoding, sep)
        self.name, self.path, self.target = name, path, target
        self.missing_target, self.encoding, self.sep = missing_target, encoding, sep
        self.declared_task = task
        self.numeric_columns, self.categorical_columns = numeric_columns, categorical_columns
        self.drop_columns = list(drop_columns or [])
        # checked now (fail before loading anything); fitted in setup()
        self.preprocessor = TablePreprocessor(
            [],
            [],
            numeric_imputation=numeric_imputation,
            categorical_imputation=categorical_imputation,
            fill_value=fill_value,
            scaling=scaling,
            feature_selection=feature_selection,
            k_best=k_best,
            variance_threshold=variance_threshold,
        )
        self.raw_columns: list[str] = []
        self.target_column = ""
        self._warned: set[str] = set()  # load() runs again after training (importance, drift)

    def _warn(self, line: str) -> None:
        """One line on stderr, once per data module and from one process of a multi-GPU run."""
        from lightning.pytorch.utilities import rank_zero_only

        if line in self._warned or getattr(rank_zero_only, "rank", 0) != 0:
            return
        self._warned.add(line)
        print_warning(line)

    def load(self) -> LoadedData:
        frame, target, source = read_table(
            self.name,
            self.path,
            self.target,
            missing_target=self.missing_target,
            encoding=self.encoding,
            sep=self.sep,
            warn=self._warn,
        )
        numeric, categorical = column_types(
            frame,
            target,
            self.numeric_columns,
            self.categorical_columns,
            self.drop_columns,
            source,
            warn=self._warn,
        )
        check_finite(frame, numeric, source)
        self.preprocessor.numeric_columns, self.preprocessor.categorical_columns = numeric, categorical
        self.raw_columns, self.target_column = numeric + categorical, target
        task = infer_task(frame[target]) if self.declared_task == "auto" else self.declared_task
        if task == "classification":
            labels = frame[target].astype(str).to_numpy()
            class_names, indices = np.unique(labels, return_inverse=True)
            return LoadedData(
                frame[self.raw_columns],
                indices.astype(np.int64),
                "classification",
                class_names.tolist(),
                source=source,
            )
        values = pd.to_numeric(frame[target], errors="coerce")
        if values.isna().any():
            bad = frame[target][values.isna()].iloc[0]
            raise KilnError(
                f"data.target={target}: regression needs numbers, but {source} holds {bad!r}; "
                "declare data.task=classification if it is a label"
            )
        numbers = values.to_numpy(np.float64)
        out_of_range = ~np.isfinite(numbers) | (np.abs(numbers) > np.finfo(np.float32).max)
        if out_of_range.any():
            bad = numbers[out_of_range][0]
            raise KilnError(
                f"data.target={target}: {source} holds {bad} as a target value; regression needs finite "
                "numbers within float32's range: drop or fix those rows"
            )
        looks_like = row_id_like(frame[target])
        if looks_like:
            others = [c for c in numeric if row_id_like(frame[c]) is None]
            self._warn(
                f"data.target={target}: every value is a different whole number ({looks_like}), as in a row "
                f"id, not a quantity to predict; if so, set data.target to the column to predict"
                + (f" (numeric columns: {', '.join(map(str, others[:10]))})" if others else "")
                + f" and leave the id out with data.drop_columns=[{target}]"
            )
        return LoadedData(frame[self.raw_columns], numbers.astype(np.float32), "regression", source=source)

    def fit_preprocessing(
        self, features: Any, train_rows: np.ndarray, train_targets: np.ndarray
    ) -> np.ndarray:
        try:
            self.preprocessor.fit(features.iloc[train_rows], train_targets, self.task)
        except ValueError as exc:
            raise KilnError(f"data preprocessing: {exc}") from exc
        self.feature_names = self.preprocessor.output_names()
        return self.preprocessor.transform(features)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "raw_columns": self.raw_columns,
            "target_column": self.target_column,
            "preprocessor": self.preprocessor.state_dict(),
        }


def _check_reading(task: str, missing_target: str, encoding: str, sep: str) -> None:
    """How the table is read and what it predicts: checked before anything is loaded."""
    require(
        task in ("auto", "classification", "regression"),
        "task",
        f"must be auto, classification or regression, got {task!r}",
    )
    require(
        missing_target in ("drop", "error"),
        "missing_target",
        f"must be drop (leave out rows without a target value) or error, got {missing_target!r}",
    )
    require(
        _known_encoding(encoding),
        "encoding",
        f"unknown encoding {encoding!r}; use utf-8, latin-1, cp1252 or another Python codec name",
    )
    require(bool(sep), "sep", "must be auto or the character between columns (',', ';', tab)")


def _known_encoding(name: str) -> bool:
    try:
        codecs.lookup(name)
    except (LookupError, TypeError):
        return False
    return True
