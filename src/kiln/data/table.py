"""One DataModule for any table: a built-in one by name, or a user's CSV or Parquet file.

    kiln train data=table data.name=penguins
    kiln train data=table data.path=cars.csv data.target=Miles_per_Gallon

The task comes from the target column (or `task`); numeric and categorical columns are detected
(or declared). Preprocessing is fitted on the training split only and saved in the checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd

from kiln.data.base import InMemoryDataModule, LoadedData
from kiln.data.preprocessing import Imputation, Scaling, Selection, TablePreprocessor
from kiln.data.tables import column_types, infer_task, read_table
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
        numeric_imputation: Imputation = "median",
        categorical_imputation: Literal["most_frequent", "constant"] = "most_frequent",
        fill_value: float = 0.0,
        scaling: Scaling = "standard",
        feature_selection: Selection = "none",
        k_best: int = 10,
        variance_threshold: float = 0.0,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_folds: int | None = None,
        fold: int = 0,
        seed: int = 0,
        batches_per_chunk: int = 16,
        eval_batch_size: int = 1024,
        refit: bool = False,
    ) -> None:
        super().__init__(
            batch_size,
            val_fraction,
            test_fraction,
            num_folds,
            fold,
            seed,
            batches_per_chunk,
            eval_batch_size,
            refit,
        )
        require(
            task in ("auto", "classification", "regression"),
            "task",
            f"must be auto, classification or regression, got {task!r}",
        )
        self.name, self.path, self.target = name, path, target
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

    def load(self) -> LoadedData:
        frame, target, source = read_table(self.name, self.path, self.target)
        numeric, categorical = column_types(
            frame, target, self.numeric_columns, self.categorical_columns, self.drop_columns, source
        )
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
