"""Images in folders on disk, decoded lazily in DataLoader workers: memory does not grow with them.

    data=image_folder data.path=DIR           DIR/<class>/<image>  (PNG, JPEG, WebP, BMP)
    data=image_folder data.index=FILE.csv     columns `path` and `label`; paths relative to the file

At set-up kiln lists the images and reads each one's header (not its pixels): a zero-byte file, a
file that is not an image, or an unreadable one is named and skipped with a count
(`bad_images: skip`) or refused (`bad_images: error`, which also decodes every image once).
Other files in a class folder (notes.txt) are skipped and counted; a class folder with no images
is left out, said out loud; fewer than two classes is refused. Grayscale, palette and RGBA images
are converted to `channels` (3: RGB, 1: grayscale), and the count of converted ones is said.

Each item is decoded with Pillow, augmented with albumentations (training only), resized to
`image_size`, scaled to [0, 1] and normalized by `mean`/`std`. The exported model repeats the
resize and normalization inside its graph (kiln.export.graphs), told by `image_input`, so it
takes images as a user has them: uint8 (batch, height, width, channels).

Splits are seeded and stratified, with k-fold, exactly as for tables (kiln.data.splits). Under
DDP, Lightning's DistributedSampler gives each rank its share (`shards_by_rank` is False).
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from kiln.data.settings import DataSettings, SharesDataSettings
from kiln.data.splits import Splits, split_indices
from kiln.errors import InvalidArgument, KilnError, require

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BAD_IMAGES = ("skip", "error")


@dataclass(frozen=True)
class ImageList:
    """What set-up found: readable images, their class indices, and what was left out."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    skipped: list[tuple[Path, str]]  # (file, why)
    converted: Counter[str]  # mode -> images converted from it
    smallest: Path | None  # the image with the fewest pixels: the one a crop would fail on


class ImageFolderDataModule(SharesDataSettings, L.LightningDataModule):
    """Takes the shared settings (kiln.data.settings: splits, batch sizes, seed) beside its own."""

    task = "classification"
    shards_by_rank = False  # Lightning's DistributedSampler splits these loaders under DDP
    default_settings = DataSettings(eval_batch_size=256)  # decoded images: smaller evaluation batches

    def __init__(
        self,
        path: str | None = None,
        index: str | None = None,
        image_size: int | Sequence[int] = 64,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        augment: dict[str, Any] | None = None,
        bad_images: str = "skip",
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        persistent_workers: bool = True,
        max_image_pixels: int | None = None,
        **settings: Any,  # the shared ones: kiln.data.settings
    ) -> None:
        super().__init__()
        from kiln.data.augment import check_augment, opencv_interpolation

        self.take_settings(settings)
        self.path, self.index = _source(path, index)
        self.image_size = _size(image_size)
        require(channels in (1, 3), "channels", f"must be 3 (RGB) or 1 (grayscale), got {channels}")
        self.channels = channels
        self.normalization_given = mean is not None or std is not None  # else a net's data config may set it
        self.mean = _per_channel(mean, IMAGENET_MEAN if channels == 3 else (0.5,), channels, "mean")
        self.std = _per_channel(std, IMAGENET_STD if channels == 3 else (0.5,), channels, "std")
        require(all(s > 0 for s in self.std), "std", f"must be > 0, got {list(self.std)}")
        self.interpolation_given = interpolation is not None  # else a net's data config may set it
        self.interpolation = interpolation or "bilinear"
        opencv_interpolation(self.interpolation)  # a name it does not know fails here, naming the key
        self.augment = check_augment(augment)
        require(bad_images in BAD_IMAGES, "bad_images", f"must be skip or error, got {bad_images!r}")
        self.bad_images = bad_images
        self.num_workers = _workers(num_workers)
        require(
            pin_memory in ("auto", True, False),
            "pin_memory",
            f"must be auto, true or false, got {pin_memory}",
        )
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.max_image_pixels = _pixel_limit(max_image_pixels)
        # filled by setup()
        self.images: ImageList | None = None
        self.splits: Splits | None = None
        self.class_names: list[str] = []
        self.fingerprint = ""

    # -- what kiln reads (kiln.contract) ---------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    @property
    def image_input(self) -> dict[str, Any]:
        """How a model input `x` is made from an image: resized to `size`, scaled to [0, 1], then
        (x - mean) / std per channel. The exported graph repeats it, so it takes uint8 images."""
        return {
            "size": list(self.image_size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    def use_net_data_config(self, data_config: dict[str, Any], net_name: str) -> None:
        """Take the net's own mean, std and interpolation (a timm data config) where the data config
        left data.mean/data.std and data.interpolation unset; training and the exported graph then
        both use them. The images keep data.image_size: timm's input size (224 pixels for most of
        its models) would make small images slow to train for nothing, so the line only says it.
        One line says what came from timm."""
        from kiln.data.augment import INTERPOLATIONS

        mean, std = data_config.get("mean"), data_config.get("std")
        taken, keys = [], []
        if not self.normalization_given and mean is not None and std is not None:
            if len(mean) != self.channels:  # timm gives RGB values; grayscale takes their average
                mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
            self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
            taken.append(f"mean={list(self.mean)}, std={list(self.std)}")
            keys += ["data.mean", "data.std"]
        interpolation = data_config.get("interpolation")
        if not self.interpolation_given and interpolation in INTERPOLATIONS:
            self.interpolation = str(interpolation)
            taken.append(f"interpolation={self.interpolation}")
            keys.append("data.interpolation")
        parts = []
        if taken:
            parts.append(
                f"from {net_name}'s timm data config: {', '.join(taken)} (set {', '.join(keys)} to choose others)"
            )
        timm_size = [int(s) for s in data_config.get("input_size", [])[-2:]]
        if len(timm_size) == 2 and timm_size != list(self.image_size):
            override = timm_size[0] if timm_size[0] == timm_size[1] else f"[{timm_size[0]},{timm_size[1]}]"
            parts.append(
                f"images stay {self.image_size[0]}x{self.image_size[1]} (data.image_size); {net_name}'s timm "
                f"data config is for {timm_size[0]}x{timm_size[1]}: data.image_size={override} trains at that, slower"
            )
        if parts:
            print(f"kiln: data: {'; '.join(parts)}", file=sys.stderr)

    @property
    def source(self) -> str:
        return f"data.index={self.index}" if self.index is not None else f"data.path={self.path}"

    # -- set-up ------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.images is not None:
            return
        if self.max_image_pixels is not None:  # Pillow's limit is a global; workers fork after this
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = self.max_image_pixels
        images = self.list_images()
        self.images = images
        self.class_names = images.class_names
        self._say_what_was_left_out(images)
        try:
            self.splits = split_indices(
                images.labels,
                stratify=True,
                val_fraction=self.settings.val_fraction,
                test_fraction=self.settings.test_fraction,
                seed=self.settings.seed,
                num_folds=self.settings.num_folds,
                fold=self.settings.fold,
                class_names=images.class_names,
            )
        except KilnError as exc:
            raise KilnError(
                f"{self.source}: {str(exc).replace(' rows', ' images').replace(' row', ' image')}"
            ) from exc
        if self.settings.refit:  # cv.refit's final model: the validation rows are trained on too
            train = np.sort(np.concatenate([self.splits.train, self.splits.val]))
            self.splits = Splits(train=train, val=self.splits.val, test=self.splits.test)
        self._check_transform(images)
        self.fingerprint = _fingerprint(images)

    def list_images(self) -> ImageList:
        """The readable images and their classes, from the folder or the index file."""
        entries = self._index_entries() if self.index is not None else self._folder_entries()
        class_names = sorted({label for _, label in entries if label is not None})
        if len(class_names) < 2:
            found = f"only class {class_names[0]!r}" if class_names else "no images"
            raise KilnError(
                f"{self.source}: found {found}; classification needs at least 2 classes "
                + (
                    "(one folder of images per class: DIR/<class>/<image>)"
                    if self.index is None
                    else "in column label"
                )
            )
        paths, labels, skipped, converted = [], [], [], Counter[str]()
        smallest, smallest_pixels = None, None
        number = {name: i for i, name in enumerate(class_names)}
        not_images = [(p, "not an image file (by its suffix)") for p, label in entries if label is None]
        for image_path, label in entries:
            if label is None:
                continue
            problem, mode, pixels = self._inspect_refusing_bombs(image_path)
            if problem is not None:
                if self.bad_images == "error":
                    raise KilnError(
                        f"{self.source}: {image_path} cannot be read as an image ({problem}); remove or replace "
                        "it, or set data.bad_images=skip to leave unreadable images out"
                    )
                skipped.append((image_path, problem))
                continue
            if mode not in _NATIVE_MODES[self.channels]:
                converted[mode or "?"] += 1
            if smallest_pixels is None or pixels < smallest_pixels:
                smallest, smallest_pixels = image_path, pixels
            paths.append(image_path)
            labels.append(number[label])
        left = sorted({class_names[i] for i in labels})
        if len(left) < 2:
            raise KilnError(
                f"{self.source}: only {len(left)} class has readable images after leaving out {len(skipped)} "
                "unreadable file(s); classification needs at least 2"
            )
        if left != class_names:  # a class whose every image was unreadable
            labels = [left.index(class_names[i]) for i in labels]
            class_names = left
        return ImageList(
            paths=paths,
            labels=np.asarray(labels, dtype=np.int64),
            class_names=class_names,
            skipped=not_images + skipped,
            converted=converted,
            smallest=smallest,
        )

    def _inspect_refusing_bombs(self, path: Path) -> tuple[str | None, str | None, int]:
        """`_inspect`, but a decompression bomb (a header declaring more pixels than Pillow will
        decode) stops the run whatever data.bad_images says: either it is hostile, or it is a
        genuine image that the user must allow, and training without it would hide either."""
        from PIL import Image

        try:
            return _inspect(path, decode=self.bad_images == "error")
        except Image.DecompressionBombError as exc:
            raise KilnError(_bomb_line(self.source, path)) from exc

    def _folder_entries(self) -> list[tuple[Path, str | None]]:
        root = self.path
        assert root is not None
        if not root.is_dir():
            raise KilnError(
                f"data.path={root}: {'no such directory' if not root.exists() else 'not a directory'}; give a "
                "folder with one subfolder of images per class (DIR/<class>/<image>)"
            )
        entries: list[tuple[Path, str | None]] = []
        empty = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
            is_image = {f: f.suffix.lower() in IMAGE_SUFFIXES for f in files}
            if not any(is_image.values()):
                empty.append(folder.name)
            entries += [(f, folder.name if is_image[f] else None) for f in files]
        if empty:
            print(
                f"kiln: {self.source}: left out {len(empty)} class folder(s) with no images: {', '.join(empty)}",
                file=sys.stderr,
            )
        return entries

    def _index_entries(self) -> list[tuple[Path, str | None]]:
        index = self.index
        assert index is not None
        if not index.is_file():
            raise KilnError(f"data.index={index}: no such file; give a CSV file with columns path and label")
        try:
            with index.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise KilnError(f"data.index={index}: not a readable UTF-8 CSV file ({exc})") from exc
        columns = set(rows[0]) if rows else set()
        if not {"path", "label"} <= columns:
            raise KilnError(
                f"data.index={index}: needs columns path and label, found {', '.join(sorted(columns)) or 'none'}"
            )
        entries: list[tuple[Path, str | None]] = []
        for row in rows:
            file = Path(row["path"]).expanduser()
            file = file if file.is_absolute() else index.parent / file
            entries.append((file, str(row["label"]).strip()))
        return entries

    def _say_what_was_left_out(self, images: ImageList) -> None:
        if images.skipped:
            shown = "; ".join(f"{path} ({why})" for path, why in images.skipped[:5])
            more = f"; and {len(images.skipped) - 5} more" if len(images.skipped) > 5 else ""
            print(
                f"kiln: {self.source}: skipped {len(images.skipped)} file(s) that are not readable images "
                f"(data.bad_images=error refuses them instead): {shown}{more}",
                file=sys.stderr,
            )
        if images.converted:
            modes = ", ".join(f"{count} {mode}" for mode, count in sorted(images.converted.items()))
            target = "RGB" if self.channels == 3 else "grayscale"
            print(
                f"kiln: {self.source}: converting {modes} image(s) to {target} (data.channels={self.channels})",
                file=sys.stderr,
            )

    def _check_transform(self, images: ImageList) -> None:
        """Run the training transform once on the smallest image, so a crop that does not fit fails
        now with the file and the setting named, not mid-epoch in a worker."""
        from kiln.data.augment import train_transform

        if images.smallest is None:
            return
        try:
            pixels = _decode(images.smallest, self.channels)
        except Exception:  # damaged past its header: the loaders leave it out and say so
            return
        try:
            train_transform(self.image_size, self.augment, self.interpolation)(image=pixels)
        except KilnError:
            raise
        except Exception as exc:
            raise KilnError(
                f"data.augment: the training transform fails on {images.smallest}, the smallest image "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); add "
                "albumentations.PadIfNeeded before the crop, or use a smaller crop"
            ) from exc

    # -- loaders -----------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader[Any]:
        from kiln.data.augment import train_transform

        return self._loader(
            "train",
            train_transform(self.image_size, self.augment, self.interpolation),
            self.settings.batch_size,
            shuffle=True,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader[Any]:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader[Any]:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader[Any]:
        from kiln.data.augment import eval_transform

        resize = eval_transform(self.image_size, self.interpolation)
        return self._loader(split, resize, self.settings.eval_batch_size, shuffle=False)

    def _collate(self, split: str) -> Any:
        """Training batches get mixup/CutMix when configured; evaluation batches never do."""
        from kiln.data.augment import MixCollate

        mixing = self.augment["mixup_alpha"] > 0 or self.augment["cutmix_alpha"] > 0
        if split != "train" or not mixing:
            return collate_readable
        return MixCollate(
            len(self.class_names), self.augment["mixup_alpha"], self.augment["cutmix_alpha"], collate_readable
        )

    def _loader(self, split: str, transform: Any, batch_size: int, *, shuffle: bool) -> DataLoader[Any]:
        assert self.images is not None and self.splits is not None, "call setup() first"
        rows = getattr(self.splits, split)
        dataset = ImageDataset(
            [self.images.paths[i] for i in rows],
            self.images.labels[rows],
            transform,
            channels=self.channels,
            mean=self.mean,
            std=self.std,
        )
        trainer = self.trainer
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        pin = on_gpu if self.pin_memory == "auto" else bool(self.pin_memory)
        workers = self.num_workers
        # albumentations draws from its own generator: seeded here (in-process loading) and in each
        # worker from the worker's torch seed (_worker_init), so a run's augmentations repeat
        transform.set_random_seed(self.settings.seed)
        generator = torch.Generator().manual_seed(self.settings.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=self._collate(split),
            worker_init_fn=_worker_init if workers > 0 else None,
            generator=generator if shuffle else None,
            drop_last=False,
        )

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "class_names": list(self.class_names), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.images is not None and state.get("class_names") != self.class_names:
            raise KilnError(
                f"the checkpoint was trained on classes {state.get('class_names')}; {self.source} has "
                f"{self.class_names}; resume with the images the checkpoint was made with"
            )


class ImageDataset(Dataset[tuple[Tensor, int] | None]):
    """Decodes one image per item: nothing but the paths is held in memory."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray,
        transform: Any,
        *,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.paths = list(paths)
        self.labels = labels
        self.transform = transform
        self.channels = channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path = self.paths[index]
        try:
            pixels = _decode(path, self.channels)
        except Exception as exc:  # damaged past its header: left out of this batch, named once
            print(
                f"kiln: skipped {path}: it cannot be decoded ({type(exc).__name__}: {exc})", file=sys.stderr
            )
            return None
        pixels = self.transform(image=pixels)["image"]
        return to_tensor(pixels, self.mean, self.std), int(self.labels[index])


def to_tensor(pixels: np.ndarray, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (height, width, channels) -> float (channels, height, width), scaled and normalized."""
    # contiguous: a permuted HWC image is channels_last in memory, and so would be the stacked
    # batch (5x slower convolutions on CPU here)
    image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float().div_(255.0)
    return image.sub_(mean).div_(std)


def collate_readable(items: list[tuple[Tensor, int] | None]) -> Any:
    """The default collate over the items that decoded (a damaged image gives None)."""
    kept = [item for item in items if item is not None]
    if not kept:
        return [torch.empty(0), torch.empty(0, dtype=torch.int64)]
    return default_collate(kept)


def _decode(path: Path, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        converted = image.convert("RGB" if channels == 3 else "L")
        pixels = np.asarray(converted, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _bomb_line(source: str, path: Path) -> str:
    """One line for an image over Pillow's decompression-bomb limit: its size, the limit, the fix."""
    from PIL import Image

    width, height = _declared_size(path)
    limit = 2 * int(Image.MAX_IMAGE_PIXELS or 0)  # Pillow refuses above twice MAX_IMAGE_PIXELS
    return (
        f"{source}: {path} declares {width}x{height} = {width * height} pixels, over Pillow's "
        f"decompression-bomb limit of {limit} (a small file that would decode to gigabytes); remove it, "
        f"or, if it is a genuine image, raise the limit with +data.max_image_pixels={width * height}"
    )


def _declared_size(path: Path) -> tuple[int, int]:
    """The width and height a bomb's header declares, read with Pillow's check off."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as image:
            return image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


# Pillow modes that need no conversion for each channel count
_NATIVE_MODES = {3: ("RGB",), 1: ("L",)}


def _inspect(path: Path, *, decode: bool) -> tuple[str | None, str | None, int]:
    """(problem or None, mode, pixel count) from the header; with `decode`, the pixels too."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return "an empty file", None, 0
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
            if decode:
                image.load()
    except UnidentifiedImageError:
        return "not an image Pillow can read", None, 0
    except (OSError, SyntaxError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'damaged'}", None, 0
    return None, mode, width * height


def _worker_init(worker_id: int) -> None:
    """One thread per worker (workers run side by side, and torch or OpenCV threads would fight),
    and the worker's augmentations seeded from its torch seed (which the loader derives from the
    run's seed): different in each worker, the same in every run."""
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, ImageDataset):
        info.dataset.transform.set_random_seed(info.seed % 2**32)
    try:
        import cv2

        cv2.setNumThreads(0)
    except ImportError:
        pass


def _source(path: str | None, index: str | None) -> tuple[Path | None, Path | None]:
    """The image folder or the index file: exactly one of them."""
    require(
        path is not None or index is not None,
        "path",
        "give an image folder (data.path=DIR) or data.index=FILE.csv",
    )
    require(path is None or index is None, "index", "give data.path or data.index, not both")
    return (
        Path(path).expanduser() if path is not None else None,
        Path(index).expanduser() if index is not None else None,
    )


def _pixel_limit(max_image_pixels: int | None) -> int | None:
    require(
        max_image_pixels is None or (isinstance(max_image_pixels, int) and max_image_pixels >= 1),
        "max_image_pixels",
        f"must be a number of pixels >= 1, or null for Pillow's default; got {max_image_pixels!r}",
    )
    return max_image_pixels


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    require(
        len(size) == 2 and all(s >= 8 for s in size),
        "image_size",
        f"must be a size >= 8 or [height, width], got {image_size}",
    )
    return size  # type: ignore[return-value]


def _per_channel(
    values: Sequence[float] | None, default: Sequence[float], channels: int, name: str
) -> tuple[float, ...]:
    chosen = tuple(float(v) for v in (default if values is None else values))
    if len(chosen) == 1:
        chosen = chosen * channels
    require(len(chosen) == channels, name, f"needs one value per channel ({channels}), got {list(chosen)}")
    return chosen


def _workers(num_workers: int | str) -> int:
    """`auto`: one worker per CPU core left after the training process, at most 8."""
    if num_workers == "auto":
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise InvalidArgument(
            "num_workers",
            f"must be auto or an integer >= 0 (0 decodes in the training process), got {num_workers}",
        )
    return num_workers


def _fingerprint(images: ImageList) -> str:
    """A hash of the file list, labels, sizes and modification times (not the pixels: cheap)."""
    digest = hashlib.blake2b(digest_size=16)
    for path, label in zip(images.paths, images.labels, strict=True):
        stat = path.stat()
        digest.update(f"{path.name}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def drift_columns(datamodule: Any, image: dict[str, Any], limit: int = 2000) -> dict[str, np.ndarray]:
    """Per-image statistics (kiln.drift.image_statistics) of up to `limit` training images."""
    from kiln.drift import image_statistics

    images = training_images(datamodule, image, limit)
    return image_statistics(images) if images else {}


def training_images(datamodule: Any, image: dict[str, Any], limit: int) -> list[np.ndarray]:
    """Up to `limit` uint8 (height, width, channels) training images as the model sees them,
    resized and not augmented: kiln's own image folders read their training split; any other
    datamodule with `image_input` gives its validation loader's inputs, turned back into uint8."""
    if isinstance(datamodule, ImageFolderDataModule) and datamodule.images is not None:
        from kiln.data.augment import eval_transform

        assert datamodule.splits is not None
        resize = eval_transform(datamodule.image_size, datamodule.interpolation)
        images = []
        for row in datamodule.splits.train[:limit]:
            try:
                images.append(
                    resize(image=_decode(datamodule.images.paths[row], datamodule.channels))["image"]
                )
            except Exception:  # damaged past its header: training left it out too
                continue
        return images
    mean = np.asarray(image["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(image["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    parts, count = [], 0
    for batch in datamodule.val_dataloader():
        x = (batch[0] if isinstance(batch, list | tuple) else batch).detach().float().cpu().numpy()
        pixels = np.clip(np.rint((x * std + mean) * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        parts.append(pixels)
        count += len(pixels)
        if count >= limit:
            break
    return list(np.concatenate(parts)[:limit]) if parts else []
