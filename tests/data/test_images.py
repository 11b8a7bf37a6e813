"""Image folders on disk: listing, splits, loaders, and every kind of bad input named in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.data.images import ImageFolderDataModule
from kiln.errors import InvalidArgument, KilnError


def write_image(path: Path, seed: int, size: int = 16, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    pixels = rng.integers(0, 255, (size, size, channels) if channels > 1 else (size, size), dtype=np.uint8)
    image = Image.fromarray(pixels, "L" if channels == 1 else mode)
    if mode == "P":
        image = image.convert("P")
    image.save(path)
    return path


def image_folder(root: Path, classes: dict[str, int], size: int = 16) -> Path:
    seed = 0
    for name, count in classes.items():
        for index in range(count):
            seed += 1
            write_image(root / name / f"{index}.png", seed, size)
    return root


def datamodule(path: Path, **settings) -> ImageFolderDataModule:
    settings.setdefault("num_workers", 0)
    settings.setdefault("image_size", 16)
    return ImageFolderDataModule(path=str(path), **settings)


def test_folder_classes_splits_and_batches(tmp_path):
    root = image_folder(tmp_path / "imgs", {"cat": 20, "dog": 20, "eel": 20})
    dm = datamodule(root, batch_size=8, mean=[0.5], std=[0.25])
    dm.setup()
    assert dm.class_names == ["cat", "dog", "eel"]
    assert dm.input_shape == (3, 16, 16) and dm.num_outputs == 3
    splits = dm.splits
    assert len(splits.train) + len(splits.val) + len(splits.test) == 60
    assert not set(splits.train) & set(splits.val) and not set(splits.val) & set(splits.test)
    labels = dm.images.labels
    for split in (splits.val, splits.test):  # stratified: every class in every evaluation split
        assert set(labels[split]) == {0, 1, 2}
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (len(splits.val), 3, 16, 16) and x.dtype == torch.float32
    assert x.is_contiguous()  # not channels_last by accident: 5x slower convolutions on CPU
    # scaled to [0, 1] and normalized by (x - 0.5) / 0.25: the pixels of the first validation image
    first = dm.images.paths[splits.val[0]]
    expected = (np.asarray(Image.open(first), dtype=np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.25
    assert np.allclose(x[0].numpy(), expected, atol=1e-6)
    assert y[0].item() == labels[splits.val[0]]
    train_x, _ = next(iter(dm.train_dataloader()))
    assert train_x.shape == (8, 3, 16, 16)
    # seeded: the same splits again
    again = datamodule(root)
    again.setup()
    assert np.array_equal(again.splits.test, splits.test)
    assert dm.image_input == {
        "size": [16, 16],
        "channels": 3,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "interpolation": "bilinear",
    }


def test_k_fold_validation_folds_are_disjoint_and_cover_the_rest(tmp_path):
    root = image_folder(tmp_path / "imgs", {"a": 15, "b": 15})
    vals, tests = [], []
    for fold in range(3):
        dm = datamodule(root, num_folds=3, fold=fold)
        dm.setup()
        vals.append(set(dm.splits.val.tolist()))
        tests.append(dm.splits.test.tolist())
    assert all(t == tests[0] for t in tests)  # the test split never moves
    assert not (vals[0] & vals[1]) and not (vals[1] & vals[2]) and not (vals[0] & vals[2])
    assert len(vals[0] | vals[1] | vals[2]) == 30 - len(tests[0])


def test_index_file_with_relative_paths(tmp_path):
    root = image_folder(tmp_path / "imgs", {"a": 10, "b": 10})
    rows = ["path,label"] + [
        f"imgs/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.rglob("*.png"))
    ]
    (tmp_path / "index.csv").write_text("\n".join(rows) + "\n")
    dm = ImageFolderDataModule(index=str(tmp_path / "index.csv"), image_size=16, num_workers=0)
    dm.setup()
    assert dm.class_names == ["a", "b"] and len(dm.images.paths) == 20
    (tmp_path / "bad.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(KilnError, match=r"bad.csv: needs columns path and label, found class, file"):
        ImageFolderDataModule(index=str(tmp_path / "bad.csv"), num_workers=0).setup()


def unreadable_files(root: Path) -> dict[str, Path]:
    files = {
        "zero_byte": root / "a" / "empty.png",
        "text_as_png": root / "b" / "fake.png",
        "not_an_image": root / "a" / "notes.txt",
    }
    files["zero_byte"].write_bytes(b"")
    files["text_as_png"].write_text("this is not a PNG")
    files["not_an_image"].write_text("labels checked by hand")
    return files


def test_unreadable_files_are_named_counted_and_skipped(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", {"a": 10, "b": 10})
    files = unreadable_files(root)
    dm = datamodule(root)
    dm.setup()
    err = capsys.readouterr().err
    assert "skipped 3 file(s) that are not readable images" in err
    for path in files.values():
        assert str(path) in err
        assert path not in dm.images.paths
    assert len(dm.images.paths) == 20


def test_bad_images_error_refuses_the_first_unreadable_file(tmp_path):
    root = image_folder(tmp_path / "imgs", {"a": 10, "b": 10})
    (root / "b" / "fake.png").write_text("this is not a PNG")
    with pytest.raises(
        KilnError, match=r"fake.png cannot be read as an image .*data.bad_images=skip"
    ) as raised:
        datamodule(root, bad_images="error").setup()
    assert "\n" not in str(raised.value)


def test_image_damaged_past_its_header_is_left_out_of_its_batch_not_a_crash(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", {"a": 10, "b": 10}, size=32)
    damaged = root / "a" / "0.png"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # the header reads; the pixels do not
    dm = datamodule(root, val_fraction=0.3, test_fraction=0.3, image_size=32)
    dm.setup()
    assert damaged in dm.images.paths  # the header check cannot tell
    rows = sum(len(y) for split in ("train", "val", "test") for _, y in getattr(dm, f"{split}_dataloader")())
    assert rows == 19
    assert f"skipped {damaged}: it cannot be decoded" in capsys.readouterr().err
    with pytest.raises(KilnError, match=r"0\.png cannot be read as an image"):
        datamodule(root, bad_images="error").setup()  # strict mode decodes every image at set-up


def test_empty_class_folder_is_left_out_out_loud(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", {"a": 10, "b": 10})
    (root / "c").mkdir()
    dm = datamodule(root)
    dm.setup()
    assert dm.class_names == ["a", "b"]
    assert "left out 1 class folder(s) with no images: c" in capsys.readouterr().err


def test_one_class_is_refused(tmp_path):
    root = image_folder(tmp_path / "imgs", {"only": 10})
    with pytest.raises(KilnError, match=r"found only class 'only'; classification needs at least 2 classes"):
        datamodule(root).setup()


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(KilnError, match=r"data.path=.*nowhere: no such directory"):
        datamodule(tmp_path / "nowhere").setup()


def test_grayscale_palette_and_rgba_images_are_converted_and_said(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", {"a": 10, "b": 10})
    write_image(root / "a" / "gray.png", 100, mode="L")
    write_image(root / "a" / "alpha.png", 101, mode="RGBA")
    write_image(root / "b" / "palette.png", 102, mode="P")
    dm = datamodule(root, val_fraction=0.3, test_fraction=0.3)
    dm.setup()
    assert "converting 1 L, 1 P, 1 RGBA image(s) to RGB" in capsys.readouterr().err
    shapes = {
        tuple(x.shape[1:])
        for split in ("train", "val", "test")
        for x, _ in getattr(dm, f"{split}_dataloader")()
    }
    assert shapes == {(3, 16, 16)}


def test_image_too_small_for_the_crop_is_named_at_setup(tmp_path):
    root = image_folder(tmp_path / "imgs", {"a": 10, "b": 10}, size=16)
    write_image(root / "b" / "tiny.png", 7, size=8)
    augment = {"extra": [{"_target_": "albumentations.RandomCrop", "height": 24, "width": 24}]}
    with pytest.raises(KilnError, match=r"fails on .*tiny.png, the smallest image .*PadIfNeeded"):
        datamodule(root, augment=augment).setup()


@pytest.mark.parametrize(
    ("settings", "argument"),
    [
        ({"num_workers": -1}, "num_workers"),
        ({"image_size": 4}, "image_size"),
        ({"channels": 2}, "channels"),
        ({"augment": {"crop": 1}}, "augment.crop"),
        ({"augment": {"policy": "auto"}}, "augment.policy"),
        ({"bad_images": "ignore"}, "bad_images"),
    ],
)
def test_bad_settings_name_their_argument(tmp_path, settings, argument):
    with pytest.raises(InvalidArgument) as raised:
        datamodule(tmp_path, **settings)
    assert raised.value.argument == argument


def test_num_workers_minus_one_is_one_line_naming_the_key(tmp_path):
    from kiln.builder import build
    from kiln.config import compose

    cfg = compose("train", ["data=image_folder", f"data.path={tmp_path}", "data.num_workers=-1"])
    with pytest.raises(KilnError, match=r"^data.num_workers=-1: must be auto or an integer >= 0"):
        build("data", cfg.data)


def test_augmentation_policies_keep_the_size_and_change_the_pixels(tmp_path):
    from kiln.data.augment import eval_transform, train_transform

    image = np.asarray(Image.open(write_image(tmp_path / "x.png", 3, size=24)))
    for augment in (
        {"policy": "trivial"},
        {"policy": "rand", "rand_ops": 2},
        {"crop_scale": [0.5, 0.9], "color_jitter": 0.3},
    ):
        outputs = [train_transform((16, 16), augment)(image=image)["image"] for _ in range(8)]
        assert all(o.shape == (16, 16, 3) and o.dtype == np.uint8 for o in outputs)
        assert len({o.tobytes() for o in outputs}) > 1, augment  # random: not the same every time
    resized = eval_transform((16, 16))(image=image)["image"]
    assert np.array_equal(
        resized, eval_transform((16, 16))(image=image)["image"]
    )  # evaluation: no randomness


def test_memory_does_not_hold_the_pixels(tmp_path):
    """The dataset keeps paths; pixels exist only while a batch is made."""
    root = image_folder(tmp_path / "imgs", {"a": 10, "b": 10})
    dm = datamodule(root)
    dm.setup()
    dataset = dm.train_dataloader().dataset
    held = [value for value in vars(dataset).values() if isinstance(value, torch.Tensor | np.ndarray)]
    assert sum(getattr(v, "nbytes", 0) or v.numel() * v.element_size() for v in held) < 1024


@pytest.mark.parametrize("workers", [0, 1])
def test_augmented_batches_repeat_with_the_seed(tmp_path, workers):
    root = image_folder(tmp_path / "imgs", {"a": 10, "b": 10})
    augment = {"crop_scale": [0.3, 0.6], "policy": "trivial"}

    def first_batch(seed: int) -> torch.Tensor:
        dm = datamodule(root, augment=augment, num_workers=workers, seed=seed, persistent_workers=False)
        dm.setup()
        return next(iter(dm.train_dataloader()))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_mixup_and_cutmix_give_soft_targets_and_mixed_images():
    """Image i is a constant plane of value i with label i: the mixed pixels must agree with the soft
    labels exactly (mixup: the value is the labels' weighted mean; CutMix: the pasted area is the
    label share that moved)."""
    from kiln.data.augment import MixCollate
    from kiln.data.images import collate_readable

    torch.manual_seed(0)
    items = [(torch.full((3, 8, 8), float(i)), i) for i in range(6)]
    plain = torch.stack([x for x, _ in items])
    own = torch.arange(6)
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0)):
        x, y = MixCollate(6, mixup, cutmix, collate_readable)([*items, None])  # None: an undecodable image
        assert x.shape == (6, 3, 8, 8) and y.shape == (6, 6)
        assert torch.allclose(y.sum(dim=1), torch.ones(6))
        if mixup:
            assert torch.allclose(x.mean(dim=(1, 2, 3)), y @ own.float(), atol=1e-5)
            assert torch.allclose(x.amax(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)))  # blended, not pasted
        else:
            changed = (x != plain).flatten(1).float().mean(dim=1)
            assert torch.allclose(changed, 1 - y[own, own], atol=1e-6)
        assert not torch.equal(x, plain)


def test_kiln_module_trains_on_mixed_batches(tmp_path):
    import functools

    import lightning as L

    from kiln.models.module import KilnModule
    from kiln.models.nets import cnn

    root = image_folder(tmp_path / "imgs", {"a": 12, "b": 12, "c": 12})
    dm = datamodule(root, batch_size=8, augment={"mixup_alpha": 0.4, "cutmix_alpha": 1.0})
    dm.setup()
    _, y = next(iter(dm.train_dataloader()))
    assert y.shape == (8, 3) and y.is_floating_point()
    _, y_val = next(iter(dm.val_dataloader()))
    assert y_val.dtype == torch.int64  # evaluation batches are never mixed
    module = KilnModule(
        cnn((3, 16, 16), 3, channels=[4], hidden_size=8),
        "classification",
        (3, 16, 16),
        dm.class_names,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
        label_smoothing=0.1,
    )
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"]) and 0 <= float(logged["train/acc"]) <= 1
