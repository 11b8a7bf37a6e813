"""A user project whose model takes several inputs: a small transformer text classifier.

`write_text_project(root)` writes, under root:

    textpkg/                      plain Lightning code: no kiln import, no kiln attribute
        lit.py                    TextClassifier: token embedding, one self-attention block,
                                  masked mean pooling, a linear head; forward(input_ids,
                                  attention_mask) -> logits. Built from its config (no download)
        data.py                   TokenDataModule: synthetic token sequences padded to
                                  `max_length`, dict batches {input_ids, attention_mask, labels};
                                  class "has_seven" when token 7 appears among the real tokens
    my_configs/model/text.yaml    Hydra configs that point kiln at them with `_target_`
    my_configs/data/tokens.yaml

`token_rows(...)` makes rows by the same rule, for files given to `kiln predict`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

CLASSES = ("no_seven", "has_seven")
SIGNAL_TOKEN = 7
VOCAB = 16  # token 0 is padding

LIT_PY = '''\
"""A small transformer text classifier, written as the Lightning docs teach."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F


class SelfAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(width // heads)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        scores = (q @ k.transpose(-2, -1)) * self.scale
        padding = (attention_mask == 0)[:, None, None, :]
        weights = scores.masked_fill(padding, -1e4).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).flatten(2)
        x = self.norm1(x + self.out(attended))
        return self.norm2(x + self.feed_forward(x))


class TextClassifier(L.LightningModule):
    def __init__(self, vocab_size: int = 16, width: int = 16, heads: int = 2, num_classes: int = 2, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, width)
        self.block = SelfAttentionBlock(width, heads)
        self.head = nn.Linear(width, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.block(self.embed(input_ids), attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # masked mean
        return self.head(pooled)  # logits

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train/loss", loss)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["labels"]), prog_bar=True)
        self.log(f"{stage}/acc", (logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
'''

DATA_PY = '''\
"""Synthetic token sequences, padded, as dict batches (the shape a tokenizer gives)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def token_rows(rows: int, max_length: int, seed: int, vocab: int = 16, signal: int = 7):
    """(input_ids, attention_mask, labels): half the rows hold `signal` among their real tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, max_length), dtype=np.int64)
    mask = np.zeros((rows, max_length), dtype=np.int64)
    labels = (np.arange(rows) % 2).astype(np.int64)
    rng.shuffle(labels)
    others = [t for t in range(1, vocab) if t != signal]
    for row in range(rows):
        length = int(rng.integers(3, max_length + 1))
        ids[row, :length] = rng.choice(others, size=length)
        if labels[row]:
            ids[row, int(rng.integers(0, length))] = signal
        mask[row, :length] = 1
    return ids, mask, labels


class Tokens(Dataset):
    def __init__(self, ids, mask, labels):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {
            "input_ids": torch.from_numpy(self.ids[index]),
            "attention_mask": torch.from_numpy(self.mask[index]),
            "labels": torch.tensor(self.labels[index]),
        }


class TokenDataModule(L.LightningDataModule):
    def __init__(self, rows: int = 600, max_length: int = 12, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.rows, self.max_length, self.batch_size, self.seed = rows, max_length, batch_size, seed
        self.class_names = ["no_seven", "has_seven"]

    def setup(self, stage=None):
        ids, mask, labels = token_rows(self.rows, self.max_length, self.seed)
        train, val = int(0.6 * self.rows), int(0.8 * self.rows)
        self.train_set = Tokens(ids[:train], mask[:train], labels[:train])
        self.val_set = Tokens(ids[train:val], mask[train:val], labels[train:val])
        self.test_set = Tokens(ids[val:], mask[val:], labels[val:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.batch_size)
'''

CONFIGS = {
    "model/text.yaml": """
        _target_: textpkg.lit.TextClassifier
        vocab_size: 16
        width: 16
        heads: 2
        num_classes: 2
        lr: 0.01
        """,
    "data/tokens.yaml": """
        _target_: textpkg.data.TokenDataModule
        rows: 600
        max_length: 12
        batch_size: 32
        """,
}


def write_text_project(root: Path) -> Path:
    """The project's package and configs under root (see the module docstring); returns root."""
    package = root / "textpkg"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "lit.py").write_text(LIT_PY)
    (package / "data.py").write_text(DATA_PY)
    for name, text in CONFIGS.items():
        path = root / "my_configs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def token_rows(root: Path, rows: int, max_length: int, seed: int) -> tuple[np.ndarray, ...]:
    """(input_ids, attention_mask, labels) by the project's own rule (root/textpkg/data.py), for
    files given to `kiln predict`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("textpkg_rows", root / "textpkg" / "data.py")
    assert spec is not None and spec.loader is not None
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    return tuple(data.token_rows(rows, max_length, seed))
