"""Generated data of any size, for benchmarks and scale tests.

Rows are standard normal features; targets come from a fixed random two-layer "teacher", so a
model can learn them but not trivially. Generated in float32 chunks: 1M x 50 rows peak at about
the size of the data itself, not several copies of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.data.base import InMemoryDataModule, LoadedData, Task
from kiln.errors import require


class SyntheticDataModule(InMemoryDataModule):
    def __init__(
        self,
        num_samples: int = 10_000,
        num_features: int = 20,
        task: Task = "classification",
        num_classes: int = 4,
        noise: float = 0.1,
        data_seed: int = 0,
        **settings: Any,  # the shared ones (kiln.data.settings) and batches_per_chunk
    ) -> None:
        super().__init__(**settings)
        require(num_samples >= 10, "num_samples", f"must be >= 10, got {num_samples}")
        require(num_features >= 1, "num_features", f"must be >= 1, got {num_features}")
        require(
            task in ("classification", "regression"),
            "task",
            f"must be classification or regression, got {task}",
        )
        require(task == "regression" or num_classes >= 2, "num_classes", f"must be >= 2, got {num_classes}")
        require(noise >= 0, "noise", f"must be >= 0, got {noise}")
        self.num_samples = num_samples
        self.num_features = num_features
        self.synthetic_task: Task = task
        self.num_classes = num_classes
        self.noise = noise
        self.data_seed = data_seed

    def load(self) -> LoadedData:
        generator = torch.Generator().manual_seed(self.data_seed)
        hidden = 32
        outputs = self.num_classes if self.synthetic_task == "classification" else 1
        w1 = torch.randn(self.num_features, hidden, generator=generator) / self.num_features**0.5
        w2 = torch.randn(hidden, outputs, generator=generator)
        features = torch.empty(self.num_samples, self.num_features)
        scores = torch.empty(self.num_samples, outputs)
        for start in range(0, self.num_samples, 65_536):
            block = features[start : start + 65_536]
            block.normal_(generator=generator)
            scores[start : start + 65_536] = torch.tanh(block @ w1) @ w2
        scores += self.noise * torch.randn(scores.shape, generator=generator)
        names = [f"x{i}" for i in range(self.num_features)]
        if self.synthetic_task == "classification":
            return LoadedData(
                features=features.numpy(),
                targets=scores.argmax(dim=1).numpy().astype(np.int64),
                task="classification",
                class_names=[f"class_{c}" for c in range(self.num_classes)],
                feature_names=names,
            )
        return LoadedData(
            features=features.numpy(), targets=scores[:, 0].numpy(), task="regression", feature_names=names
        )
