"""A user's torchvision project, as the Lightning and torchvision docs teach it, for kiln to serve.

`write_torchvision_project(root)` writes, under root:

    tvpkg/
        lit.py          LitTimmClassifier: a small timm ResNet (resnet10t, narrowed) in a
                        LightningModule; no kiln import, no kiln attribute
        data.py         FolderDataModule: torchvision.datasets.ImageFolder over root/<split>/<class>/,
                        a transforms.v2 training transform with a random crop and an eval transform
                        Resize -> CenterCrop -> ToImage -> ToDtype -> Normalize;
                        LambdaFolderDataModule: the same with a Lambda in its eval transform
    my_configs/model/tv_resnet.yaml, my_configs/data/tv_folders.yaml, tv_folders_lambda.yaml
    images/{train,val,test}/<class>/<n>.png
                        sklearn's digits 0, 1 and 7, upscaled to sizes between 20 and 64 pixels
                        (not square), coloured: RGB PNGs of every size, as photos come
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

CLASSES = {"zero": 0, "one": 1, "seven": 7}
SPLITS = {"train": 40, "val": 20, "test": 100}  # images per class: a large test split, so that
# one answer in 300 moves the accuracy by a third of a point

LIT_PY = '''\
"""A small timm ResNet as a LightningModule, as the Lightning docs teach."""

from __future__ import annotations

import lightning as L
import timm
import torch
from torch.nn import functional as F


class LitTimmClassifier(L.LightningModule):
    def __init__(
        self,
        model_name: str = "resnet10t",
        num_classes: int = 3,
        channels: tuple[int, ...] = (16, 32, 64, 128),
        stem_width: int = 8,
        lr: float = 0.003,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = timm.create_model(
            model_name, num_classes=num_classes, channels=tuple(channels), stem_width=stem_width
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y))
        self.log(f"{stage}/acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
'''

DATA_PY = '''\
"""Image folders (root/<split>/<class>/<image>) read by torchvision, as a LightningDataModule."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class FolderDataModule(L.LightningDataModule):
    def __init__(self, root: str, batch_size: int = 16, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.classes, _ = datasets.folder.find_classes(self.root / "train")
        self.train_transform = v2.Compose(
            [
                v2.RandomResizedCrop(32, scale=(0.7, 1.0), antialias=True),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(MEAN, STD),
            ]
        )
        self.eval_transform = v2.Compose(
            [
                v2.Resize(36),
                v2.CenterCrop(32),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(MEAN, STD),
            ]
        )

    def setup(self, stage: str | None = None) -> None:
        self.train_set = datasets.ImageFolder(self.root / "train", transform=self.train_transform)
        self.val_set = datasets.ImageFolder(self.root / "val", transform=self.eval_transform)
        self.test_set = datasets.ImageFolder(self.root / "test", transform=self.eval_transform)

    def _loader(self, dataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)


def clamp_outliers(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-2.5, 2.5)


class LambdaFolderDataModule(FolderDataModule):
    """The same folders; its eval transform ends in a Lambda (any Python function)."""

    def __init__(self, root: str, batch_size: int = 16, num_workers: int = 0):
        super().__init__(root, batch_size, num_workers)
        self.eval_transform = v2.Compose([*self.eval_transform.transforms, v2.Lambda(clamp_outliers)])
'''

CONFIGS = {
    "model/tv_resnet.yaml": """
        _target_: tvpkg.lit.LitTimmClassifier
        model_name: resnet10t
        num_classes: 3
        channels: [8, 16, 32, 64]
        stem_width: 8
        lr: 0.003
        """,
    "data/tv_folders.yaml": """
        _target_: tvpkg.data.FolderDataModule
        root: {images}
        batch_size: 16
        num_workers: 0
        """,
    "data/tv_folders_lambda.yaml": """
        _target_: tvpkg.data.LambdaFolderDataModule
        root: {images}
        batch_size: 16
        num_workers: 0
        """,
}


def write_torchvision_project(root: Path, splits: dict[str, int] | None = None) -> Path:
    """Write the package, its Hydra configs and the image folders under root; return root."""
    root = Path(root)
    package = root / "tvpkg"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""My torchvision project."""\n')
    (package / "lit.py").write_text(LIT_PY)
    (package / "data.py").write_text(DATA_PY)
    images = root / "images"
    write_digit_folders(images, splits or SPLITS)
    for name, text in CONFIGS.items():
        path = root / "my_configs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text.format(images=images)).lstrip())
    return root


def write_digit_folders(directory: Path, splits: dict[str, int], seed: int = 0) -> None:
    """sklearn's digits of CLASSES as coloured RGB PNGs of varied sizes, disjoint across splits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for name, digit in CLASSES.items():
        pool = list(rng.permutation(np.flatnonzero(digits.target == digit)))
        for split, count in splits.items():
            folder = directory / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                ink = digits.images[pool.pop()] / 16.0
                height, width = (int(v) for v in rng.integers(20, 65, 2))
                glyph = Image.fromarray((ink * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
                shade = np.asarray(glyph, dtype=np.float32)[:, :, None] / 255.0
                paper, colour = rng.uniform(0, 80, 3), rng.uniform(150, 255, 3)
                pixels = paper + shade * (colour - paper) + rng.normal(0, 6, (height, width, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{n:03d}.png")
