"""A built-in image folder: sklearn's 8x8 digits as RGB PNG files, for the image workflow's demo.

Each digit is upscaled to `size` x `size`, tinted (a random ink and paper colour), and moved by a
small random affine (rotation, shift, scale), then written as DIR/<digit>/<n>.png. The folder is
made once in a cache directory (KILN_CACHE_DIR, else ~/.cache/kiln) and reused; it is written
under a temporary name and renamed when complete, so a killed first run never leaves half a set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kiln.data.images import ImageFolderDataModule
from kiln.errors import require

FORMAT_VERSION = 1  # bump when the images change: a new folder, never a stale one


def cache_dir() -> Path:
    """Where built-in data sets are written once and reused."""
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln").expanduser()


def digit_images(size: int = 32, seed: int = 0, root: Path | None = None) -> Path:
    """The folder of digit images at `size` (made on first use)."""
    root = root or cache_dir()
    folder = root / f"digit_images_{size}px_seed{seed}_v{FORMAT_VERSION}"
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_digit_images(staging, size, seed)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: theirs is the same set
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_digit_images(folder: Path, size: int, seed: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        ink = (pixels / 16.0).astype(np.float32)
        glyph = Image.fromarray((ink * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
        angle = rng.uniform(-12, 12)
        scale = rng.uniform(0.85, 1.1)
        shift = rng.uniform(-0.08, 0.08, size=2) * size
        glyph = glyph.rotate(angle, resample=Image.Resampling.BILINEAR, translate=tuple(shift))
        if scale != 1.0:
            scaled = glyph.resize((round(size * scale),) * 2, Image.Resampling.BILINEAR)
            canvas = Image.new("L", (size, size))
            offset = (size - scaled.width) // 2
            canvas.paste(scaled, (offset, offset))
            glyph = canvas
        alpha = np.asarray(glyph, dtype=np.float32)[:, :, None] / 255.0
        paper = rng.uniform(170, 255, size=3)
        colour = rng.uniform(0, 90, size=3)
        rgb = paper * (1 - alpha) + colour * alpha + rng.normal(0, 4, size=(size, size, 3))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(
            folder / str(label) / f"{index}.png"
        )


class DigitImagesDataModule(ImageFolderDataModule):
    """`data=digit_images`: the built-in folder above, then everything as for any image folder."""

    def __init__(
        self, size: int = 32, path: str | None = None, index: str | None = None, **settings: Any
    ) -> None:
        require(
            path is None and index is None,
            "path",
            "data=digit_images is the built-in folder; for your own images use data=image_folder data.path=DIR",
        )
        require(
            isinstance(size, int) and 8 <= size <= 512, "size", f"must be an integer in 8..512, got {size}"
        )
        settings.setdefault("image_size", size)
        self.size = size
        super().__init__(path=str(cache_dir()), **settings)  # the real folder is made at set-up

    def setup(self, stage: str | None = None) -> None:
        if self.images is None:
            self.path = digit_images(self.size, seed=0)
        super().setup(stage)
