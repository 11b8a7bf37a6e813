"""Batches straight from in-memory tensors, with no per-sample collate.

A DataLoader's default per-sample collate costs about 3.5 us a row here (a third of throughput
for a small MLP; DESIGN.md). Instead, a sampler yields a tensor of row indices and the dataset
slices all rows at once. A training item for kiln's own module is a *chunk*: a `Chunk` of
`batches_per_chunk` mini-batches. KilnModule takes one optimizer step per mini-batch, so
Lightning's own per-step overhead (hooks, progress bar, loop bookkeeping; ~0.6 ms) is paid once
per chunk, not per batch. Any other module (a user's) gets ordinary `(x, y)` batches, as do all
evaluation loaders: chunks are kiln's internal speed-up, never a user's training_step's input.

Under DDP each rank takes its own slice of the same seeded permutation. Training slices are cut
to equal length (ranks must take the same number of optimizer steps); evaluation slices are not
padded, so no row is counted twice (the bias of DistributedSampler, Lightning #7929).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

Batch = tuple[Tensor, Tensor]


class Chunk(list[Batch]):
    """Mini-batches trained one after another in one Lightning step (KilnModule only). Its own
    type, so that a default collate's `[x, y]` list is never mistaken for one."""


class ChunkSampler(Sampler[Tensor]):
    """Yields index tensors of up to `chunk_rows` rows; reshuffled per epoch from `seed + epoch`."""

    def __init__(
        self, rows: Tensor, chunk_rows: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.rows = rows
        self.chunk_rows = chunk_rows
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip = 0

    def skip_next_chunks(self, count: int) -> None:
        """The next epoch started skips its first `count` chunks: a resume inside an epoch.
        The length stays the epoch's full length, as Lightning counts the skipped steps as done."""
        self._skip = count

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start; the order depends only on seed and epoch, so a
        resumed run sees the same batches as an uninterrupted one."""
        self.epoch = epoch

    def _my_rows(self) -> Tensor:
        rows = self.rows
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            rows = rows[torch.randperm(len(rows), generator=generator)]
        if self.world_size == 1:
            return rows
        if self.shuffle:  # training: every rank takes the same number of rows
            per_rank = len(rows) // self.world_size
            return rows[self.rank * per_rank : (self.rank + 1) * per_rank]
        return rows.tensor_split(self.world_size)[self.rank]  # evaluation: no padding, no duplicates

    def __iter__(self) -> Iterator[Tensor]:
        skip, self._skip = self._skip, 0  # read when iteration really starts, after set_epoch
        yield from self._my_rows().split(self.chunk_rows)[skip:]

    def __len__(self) -> int:
        n = len(self.rows)
        if self.world_size > 1:
            n = (
                n // self.world_size
                if self.shuffle
                else len(self.rows.tensor_split(self.world_size)[self.rank])
            )
        return -(-n // self.chunk_rows)


class ChunkDataset(Dataset[Chunk | Batch]):
    """Indexed by a tensor of rows; returns those rows as a Chunk of mini-batches, or (`chunks`
    off) as one `(x, y)` batch."""

    def __init__(self, features: Tensor, targets: Tensor, batch_size: int, chunks: bool = True) -> None:
        self.features = features
        self.targets = targets
        self.batch_size = batch_size
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, rows: Tensor) -> Chunk | Batch:
        x, y = self.features[rows], self.targets[rows]
        if not self.chunks:
            return x, y
        return Chunk(zip(x.split(self.batch_size), y.split(self.batch_size), strict=True))


def _as_is(item: Any) -> Any:
    """No collate: the dataset already returns a whole Chunk or batch."""
    return item


def chunk_loader(
    features: Tensor,
    targets: Tensor,
    rows: Tensor,
    *,
    batch_size: int,
    batches_per_chunk: int,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    chunks: bool = True,
) -> DataLoader[Chunk | Batch]:
    """`chunks`: items are Chunks of `batches_per_chunk` batches; else plain batches (and
    `batches_per_chunk` is ignored)."""
    chunk_rows = batch_size * batches_per_chunk if chunks else batch_size
    sampler = ChunkSampler(rows, chunk_rows, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    dataset = ChunkDataset(features, targets, batch_size, chunks)
    return DataLoader(dataset, sampler=sampler, batch_size=None, collate_fn=_as_is, pin_memory=pin_memory)
