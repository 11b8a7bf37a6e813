"""The in-memory DataModule every kiln data set builds on.

A subclass says how to load its rows (`load`) and, if it needs to, how to fit preprocessing on
the training rows (`fit_preprocessing`). This class does the rest the same way for all of them:
seeded (stratified) splits, k-fold, a fingerprint of the data, fast chunked loaders, and saving
what it learned from the data in the checkpoint as plain values (never pickled objects).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kiln.data.batches import Batch, Chunk, chunk_loader
from kiln.data.settings import SharesDataSettings
from kiln.data.splits import Splits, split_indices
from kiln.errors import KilnError, require

Task = Literal["classification", "regression"]


@dataclass
class LoadedData:
    """What a subclass's `load` returns: raw features, targets and what they mean."""

    features: Any  # anything `fit_preprocessing` understands: an array or a DataFrame
    targets: np.ndarray  # class indices (int) for classification, values (float) for regression
    task: Task
    class_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    source: str = ""  # where the rows came from, for messages: "data.path=cars.csv"


class InMemoryDataModule(SharesDataSettings, L.LightningDataModule):
    """Takes the shared settings (kiln.data.settings: splits, batch sizes, seed) and its own loader knob."""

    # Each DDP rank takes its own slice of the rows (data/batches.py), without padding.
    shards_by_rank = True

    def __init__(self, batches_per_chunk: int = 16, **settings: Any) -> None:
        super().__init__()
        self.take_settings(settings)
        require(
            isinstance(batches_per_chunk, int) and batches_per_chunk >= 1,
            "batches_per_chunk",
            f"must be >= 1, got {batches_per_chunk}",
        )
        self.batches_per_chunk = batches_per_chunk
        # filled by setup()
        self.features: Tensor | None = None
        self.targets: Tensor | None = None
        self.splits: Splits | None = None
        self.task: Task = "classification"
        self.class_names: list[str] = []
        self.feature_names: list[str] = []
        self.fingerprint = ""
        self.resume_train_chunks = 0  # set when resuming inside an epoch (training/preemption.py)

    # -- what a subclass provides ------------------------------------------------------------

    def load(self) -> LoadedData:
        raise NotImplementedError

    def fit_preprocessing(
        self, features: Any, train_rows: np.ndarray, train_targets: np.ndarray
    ) -> np.ndarray:
        """Fit on the training rows only, return all rows transformed to a float32 array."""
        return np.asarray(features, dtype=np.float32)

    # -- shared ------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.features is not None:
            return  # set up once: fit, validate and test all see the same splits and preprocessing
        data = self.load()
        self.task, self.class_names, self.feature_names = data.task, data.class_names, data.feature_names
        try:
            self.splits = split_indices(
                data.targets,
                stratify=data.task == "classification",
                val_fraction=self.settings.val_fraction,
                test_fraction=self.settings.test_fraction,
                seed=self.settings.seed,
                num_folds=self.settings.num_folds,
                fold=self.settings.fold,
                class_names=data.class_names,
            )
        except KilnError as exc:
            raise KilnError(f"{data.source}: {exc}" if data.source else str(exc)) from exc
        if self.settings.refit:  # cv.refit's final model: the validation rows are trained on too
            train = np.sort(np.concatenate([self.splits.train, self.splits.val]))
            self.splits = Splits(train=train, val=self.splits.val, test=self.splits.test)
        self.fingerprint = _fingerprint(data.features, data.targets)
        features = self.fit_preprocessing(data.features, self.splits.train, data.targets[self.splits.train])
        self.features = torch.as_tensor(features, dtype=torch.float32)
        target_dtype = torch.int64 if data.task == "classification" else torch.float32
        self.targets = torch.as_tensor(data.targets, dtype=target_dtype)

    @property
    def input_shape(self) -> tuple[int, ...]:
        assert self.features is not None, "call setup() first"
        return tuple(self.features.shape[1:])

    @property
    def num_outputs(self) -> int:
        return len(self.class_names) if self.task == "classification" else 1

    def train_dataloader(self) -> DataLoader[Chunk | Batch]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        chunks = bool(getattr(module, "trains_on_chunks", False))  # KilnModule's speed-up, no one else's
        loader = self._loader("train", shuffle=True, batch_size=self.settings.batch_size, chunks=chunks)
        # Resuming inside an epoch (a preemption checkpoint): skip what that epoch already trained on.
        loader.sampler.skip_next_chunks(self.resume_train_chunks)  # type: ignore[attr-defined]
        self.resume_train_chunks = 0
        return loader

    def val_dataloader(self) -> DataLoader[Batch]:
        return self._loader("val", shuffle=False, batch_size=self.settings.eval_batch_size)

    def test_dataloader(self) -> DataLoader[Batch]:
        return self._loader("test", shuffle=False, batch_size=self.settings.eval_batch_size)

    def predict_dataloader(self) -> DataLoader[Batch]:
        return self._loader("test", shuffle=False, batch_size=self.settings.eval_batch_size)

    def _loader(self, split: str, *, shuffle: bool, batch_size: int, chunks: bool = False) -> DataLoader[Any]:
        assert self.features is not None and self.targets is not None and self.splits is not None
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return chunk_loader(
            self.features,
            self.targets,
            torch.from_numpy(getattr(self.splits, split)),
            batch_size=batch_size,
            batches_per_chunk=self.batches_per_chunk,
            shuffle=shuffle,
            seed=self.settings.seed,
            rank=rank,
            world_size=world_size,
            pin_memory=on_gpu,
            chunks=chunks,
        )

    def split_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """All rows of one split, e.g. for a confusion matrix or calibration."""
        assert self.features is not None and self.targets is not None and self.splits is not None
        rows = torch.from_numpy(getattr(self.splits, split))
        return self.features[rows], self.targets[rows]

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: what the data taught us, as plain values."""
        return {
            "task": self.task,
            "class_names": list(self.class_names),
            "feature_names": list(self.feature_names),
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Data set up from the config again must match the checkpoint's (same classes, same task)."""
        if self.features is not None and (
            state.get("class_names") != self.class_names or state.get("task") != self.task
        ):
            raise KilnError(
                f"the checkpoint was trained on other data (task {state.get('task')}, classes "
                f"{state.get('class_names')}); this run has task {self.task}, classes {self.class_names}; "
                "resume with the data config the checkpoint was made with"
            )


def _fingerprint(features: Any, targets: np.ndarray) -> str:
    """A short hash of the raw data: two runs with the same fingerprint saw the same rows."""
    import pandas as pd

    digest = hashlib.blake2b(digest_size=16)
    if isinstance(features, pd.DataFrame):
        digest.update(pd.util.hash_pandas_object(features, index=False).to_numpy().tobytes())
        digest.update(",".join(map(str, features.columns)).encode())
    else:
        digest.update(np.ascontiguousarray(features).data)
    digest.update(np.ascontiguousarray(targets).data)
    return digest.hexdigest()
