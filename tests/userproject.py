"""A small user project, as someone who already writes Lightning code would bring it to kiln.

`write_user_project(root)` writes, under root:

    userpkg/                      plain Lightning code: no kiln import, no kiln attribute
        lit.py                    LitClassifier (a small CNN), UnexportableClassifier (its forward
                                  uses torch.median, which the ONNX exporter cannot translate)
        data.py                   ImageFolderDataModule (root/<class>/<file>.png, decoded lazily),
                                  NoTestDataModule (train and validation loaders only)
    my_configs/model/*.yaml       Hydra configs that point kiln at them with `_target_`
    my_configs/data/*.yaml
    images/<class>/<n>.png        3 classes of synthetic grayscale images, easy to tell apart

The sources are written as the Lightning docs teach; they double as the example of "your own
Lightning code" that kiln trains, compresses and exports.
"""

from __future__ import annotations

import struct
import textwrap
import zlib
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "stripes")

LIT_PY = '''\
"""A small image classifier, written as the Lightning docs teach."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F


class LitClassifier(L.LightningModule):
    def __init__(
        self,
        num_classes: int = 3,
        hidden: int = 32,
        lr: float = 0.01,
        record_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # logits

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        if self.hparams.record_dir is not None:  # which images this process trained on
            record = Path(self.hparams.record_dir) / f"rank{self.global_rank}.txt"
            with record.open("a") as stream:
                stream.writelines(f"{i}\\n" for i in idx.tolist())
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        x, y, _ = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{stage}/loss", loss, sync_dist=True)
        self.log(f"{stage}/acc", acc, prog_bar=True, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class UnexportableClassifier(LitClassifier):
    """Subtracts each image's median brightness first. It trains like any other module, but the
    ONNX exporter has no translation for torch.median (aten.median.dim)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        background = x.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
        return self.net(x - background)
'''

DATA_PY = '''\
"""Images in folders, one per class (torchvision's ImageFolder layout), as a LightningDataModule."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageFiles(Dataset):
    """(path, label, index) samples, each decoded only when asked for: (image, label, index)."""

    def __init__(self, samples: list[tuple[str, int, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label, index = self.samples[i]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).unsqueeze(0), label, index


class ImageFolderDataModule(L.LightningDataModule):
    """root/<class>/<image>: a seeded 60/20/20 train/val/test split within each class."""

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 2, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        # (path, class index) for every image, in a fixed order; a sample's index is its place here
        self.samples = [
            (str(path), label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in EXTENSIONS
        ]
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.hparams.seed)
        splits: dict[str, list[tuple[str, int, int]]] = {"train": [], "val": [], "test": []}
        for label in range(len(self.classes)):
            indices = [i for i, (_, y) in enumerate(self.samples) if y == label]
            order = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
            n_train, n_val = round(0.6 * len(order)), round(0.2 * len(order))
            parts = {
                "train": order[:n_train],
                "val": order[n_train : n_train + n_val],
                "test": order[n_train + n_val :],
            }
            for split, part in parts.items():
                splits[split] += [(self.samples[i][0], label, i) for i in part]
        self.train_set = ImageFiles(splits["train"])
        self.val_set = ImageFiles(splits["val"])
        self.test_set = ImageFiles(splits["test"])

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)


class NoTestDataModule(L.LightningDataModule):
    """The same images with training and validation loaders only: no test split to report on."""

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 2, seed: int = 0):
        super().__init__()
        self.images = ImageFolderDataModule(root, batch_size, num_workers, seed)
        self.classes = self.images.classes

    def setup(self, stage: str | None = None) -> None:
        self.images.setup(stage)

    def train_dataloader(self) -> DataLoader:
        return self.images.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.images.val_dataloader()
'''


def write_user_project(root: Path, *, images_per_class: int = 40, size: int = 16) -> Path:
    """Write the package, its Hydra configs and the images under root; return root."""
    root = Path(root)
    package = root / "userpkg"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""My own Lightning code."""\n')
    (package / "lit.py").write_text(LIT_PY)
    (package / "data.py").write_text(DATA_PY)

    images = root / "images"
    write_images(images, images_per_class, size)

    configs = {
        "model/my_lit.yaml": """
            _target_: userpkg.lit.LitClassifier
            num_classes: 3
            hidden: 32
            lr: 0.01
            record_dir: null  # a directory: each rank writes the indices it trained on there
            """,
        "model/unexportable.yaml": """
            _target_: userpkg.lit.UnexportableClassifier
            num_classes: 3
            hidden: 32
            lr: 0.01
            """,
        "data/my_images.yaml": f"""
            _target_: userpkg.data.ImageFolderDataModule
            root: {images}
            batch_size: 32
            num_workers: 2
            """,
        "data/no_test.yaml": f"""
            _target_: userpkg.data.NoTestDataModule
            root: {images}
            batch_size: 32
            num_workers: 2
            """,
    }
    for name, text in configs.items():
        path = root / "my_configs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


# -- the images ------------------------------------------------------------------------------------


def write_images(directory: Path, per_class: int, size: int, seed: int = 0) -> None:
    """`per_class` noisy grayscale images of each class in CLASSES, as directory/<class>/<n>.png."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    for name in CLASSES:
        (directory / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            image = draw(name, rows, cols, size, rng)
            image = np.clip(image + rng.normal(0.0, 0.08, image.shape), 0.0, 1.0)
            write_png(directory / name / f"{n:03d}.png", (image * 255).round().astype(np.uint8))


def draw(name: str, rows: np.ndarray, cols: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    brightness = rng.uniform(0.7, 1.0)
    if name == "circle":  # a filled disc somewhere near the middle
        radius = rng.uniform(0.3, 0.42) * size
        centre = rng.uniform(0.4, 0.6, 2) * size
        inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
        return brightness * inside.astype(np.float32)
    if name == "square":  # a hollow square outline
        half = int(rng.integers(size // 5, size // 3 + 1))
        top, left = (int(v) for v in rng.integers(1, size - 2 * half - 1, 2))
        image = np.zeros((size, size), np.float32)
        image[top : top + 2 * half + 1, left : left + 2 * half + 1] = brightness
        image[top + 1 : top + 2 * half, left + 1 : left + 2 * half] = 0.0
        return image
    if name == "stripes":  # horizontal stripes, 2 pixels each, at a random phase
        phase = int(rng.integers(0, 4))
        return brightness * (((rows.astype(int) + phase) // 2) % 2).astype(np.float32)
    raise ValueError(name)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """An 8-bit grayscale PNG, without an imaging library."""
    height, width = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))  # filter 0 per row
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
