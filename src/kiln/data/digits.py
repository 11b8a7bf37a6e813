"""sklearn's 8x8 handwritten digits (1,797 images, 10 classes) as 1x8x8 image tensors."""

from __future__ import annotations

import numpy as np

from kiln.data.base import InMemoryDataModule, LoadedData


class DigitsDataModule(InMemoryDataModule):
    """Pixels scaled from 0..16 to 0..1; shape (N, 1, 8, 8) for a CNN (an MLP flattens it)."""

    def load(self) -> LoadedData:
        from sklearn.datasets import load_digits  # here: importing sklearn.datasets takes seconds

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
        return LoadedData(
            features=images,
            targets=digits.target.astype(np.int64),
            task="classification",
            class_names=[str(d) for d in range(10)],
            feature_names=[f"pixel_{r}_{c}" for r in range(8) for c in range(8)],
        )
