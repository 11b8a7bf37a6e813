"""The settings every built-in DataModule shares (splits, batch sizes, seed) are declared once, in
kiln.data.settings.DataSettings and its config twin conf/data/_shared.yaml (issue 24, item 7)."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

import kiln.data
from kiln.config import config_dir
from kiln.data.settings import FIELDS, DataSettings, SharesDataSettings
from kiln.errors import InvalidArgument, KilnError, describe_user_error

BUILT_IN = [getattr(kiln.data, name) for name in kiln.data.__all__]
DATA_CONF = config_dir() / "data"
DATA_OPTIONS = sorted(p.stem for p in DATA_CONF.glob("*.yaml") if not p.stem.startswith("_"))


def own_arguments(cls: type) -> set[str]:
    """The arguments the class's own `__init__` declares, as written in its source."""
    init = cls.__init__  # type: ignore[misc]
    code = init.__code__
    return set(code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount])


def image_folder(root: Path) -> Path:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(6):
            pixels = np.full((8, 8, 3), 20 * index + (120 if label == "b" else 0), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    return root


def build_data(tmp_path: Path, *overrides: str) -> Any:
    from kiln.builder import build
    from kiln.config import compose

    cfg = compose("train", [*overrides, f"paths.output_dir={tmp_path / 'runs'}"])
    return build("data", cfg.data)


def where(option: str, tmp_path: Path) -> list[str]:
    """The overrides that make `data=<option>` buildable here (an image folder needs a folder)."""
    if option == "image_folder":
        return [f"data.path={image_folder(tmp_path / 'images')}", "data.num_workers=0"]
    return []


# -- one declaration -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", BUILT_IN, ids=lambda c: c.__name__)
def test_no_built_in_datamodule_redeclares_a_shared_setting_yet_each_takes_all_of_them(cls: type):
    assert issubclass(cls, SharesDataSettings)
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, SharesDataSettings):
            assert own_arguments(klass).isdisjoint(FIELDS), klass.__name__
    # ... and its signature (what config checks and cross-validation read) names every one, typed
    parameters = inspect.signature(cls).parameters
    types = typing.get_type_hints(DataSettings)
    defaults = dataclasses.asdict(cls.default_settings)
    for name in FIELDS:
        assert parameters[name].annotation == types[name], name
        assert parameters[name].default == defaults[name], name
    built = cls(**({"path": "."} if "path" in parameters and cls.__name__ == "ImageFolderDataModule" else {}))
    assert built.settings == cls.default_settings


def test_the_defaults_are_the_declarations_and_an_image_folder_evaluates_in_smaller_batches():
    assert dataclasses.asdict(DataSettings()) == {
        "batch_size": 64,
        "eval_batch_size": 1024,
        "val_fraction": 0.15,
        "test_fraction": 0.15,
        "num_folds": None,
        "fold": 0,
        "refit": False,
        "seed": 0,
    }
    images = kiln.data.ImageFolderDataModule(path=".", batch_size=16, seed=3)
    assert images.settings == DataSettings(batch_size=16, eval_batch_size=256, seed=3)
    digits = kiln.data.DigitsDataModule(batch_size=16, fold=1, num_folds=3)
    assert digits.settings == DataSettings(batch_size=16, num_folds=3, fold=1)


def test_the_shared_config_group_is_the_declarations_twin_and_every_data_config_includes_it():
    shared = yaml.safe_load((DATA_CONF / "_shared.yaml").read_text())
    assert tuple(shared) == FIELDS
    assert shared == {**dataclasses.asdict(DataSettings()), "seed": "${seed}"}
    for option in DATA_OPTIONS:
        assert "_shared" in included(option), f"conf/data/{option}.yaml does not include _shared"
        own = yaml.safe_load((DATA_CONF / f"{option}.yaml").read_text())
        repeated = {key for key in FIELDS if key in own and own[key] == shared[key]}
        assert not repeated, f"conf/data/{option}.yaml repeats {repeated} from _shared.yaml"


def included(option: str) -> set[str]:
    """The data group's configs that `option`'s defaults list includes, followed through."""
    config = yaml.safe_load((DATA_CONF / f"{option}.yaml").read_text())
    names = {entry for entry in config.get("defaults", []) if isinstance(entry, str) and entry != "_self_"}
    return names.union(*(included(name) for name in names))


# -- bad values: one line naming the key -----------------------------------------------------


@pytest.mark.parametrize(
    ("given", "argument"),
    [
        ({"val_fraction": "0.2"}, "val_fraction"),  # a string: once a TypeError deep in a comparison
        ({"eval_batch_size": "8"}, "eval_batch_size"),
        ({"num_folds": 2.5}, "num_folds"),
        ({"refit": "yes"}, "refit"),
        ({"batch_sise": 3}, "batch_sise"),  # a misspelling: named, with the valid names
    ],
)
@pytest.mark.parametrize(
    "cls", [kiln.data.TableDataModule, kiln.data.ImageFolderDataModule], ids=lambda c: c.__name__
)
def test_a_bad_shared_setting_in_python_names_its_argument(cls: type, given: dict[str, Any], argument: str):
    with pytest.raises(InvalidArgument) as raised:
        cls(**({"path": "."} if cls is kiln.data.ImageFolderDataModule else {}), **given)
    assert raised.value.argument == argument
    if argument == "batch_sise":
        assert "batch_size, eval_batch_size, val_fraction" in raised.value.message


@pytest.mark.parametrize("option", DATA_OPTIONS)
def test_a_bad_shared_setting_from_the_command_line_is_one_line_naming_the_key(tmp_path: Path, option: str):
    with pytest.raises(KilnError) as raised:
        build_data(tmp_path, f"data={option}", *where(option, tmp_path), "data.eval_batch_size=0")
    line = describe_user_error(raised.value)
    assert line == "data.eval_batch_size=0: must be >= 1, got 0"


# -- the README's overrides still reach the DataModule ---------------------------------------


def test_the_readme_data_overrides_compose_and_reach_the_table(tmp_path: Path):
    # README: k-fold (`data.num_folds=K data.fold=i`), the batch size, the chunk of mini-batches
    data = build_data(
        tmp_path,
        "data=table",
        "data.batch_size=32",
        "data.num_folds=5",
        "data.fold=2",
        "data.batches_per_chunk=4",
        "data.eval_batch_size=50",
        "seed=7",
    )
    assert data.settings == DataSettings(batch_size=32, eval_batch_size=50, num_folds=5, fold=2, seed=7)
    assert data.batches_per_chunk == 4
    data.setup("fit")
    assert data.splits is not None
    outside_test = len(data.splits.train) + len(data.splits.val)
    assert abs(len(data.splits.val) - outside_test / 5) <= 3  # fold 2 of 5 validates on a fifth
    first = next(iter(data.val_dataloader()))
    assert len(first[0]) == min(50, len(data.splits.val))


def test_the_readme_image_overrides_reach_the_image_folder(tmp_path: Path):
    data = build_data(
        tmp_path,
        "data=image_folder",
        *where("image_folder", tmp_path),
        "data.batch_size=4",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
    )
    assert data.settings == DataSettings(
        batch_size=4, eval_batch_size=256, val_fraction=0.25, test_fraction=0.25, seed=42
    )
    assert data.num_workers == 0
    data.setup("fit")
    assert data.splits is not None
    assert (len(data.splits.train), len(data.splits.val), len(data.splits.test)) == (6, 3, 3)
    assert [len(batch[1]) for batch in data.train_dataloader()] == [4, 2]


def test_an_unknown_data_option_lists_the_data_sets_not_the_shared_parts(tmp_path: Path):
    with pytest.raises(Exception) as raised:
        build_data(tmp_path, "data=nosuch")
    line = describe_user_error(raised.value)
    assert line is not None
    assert line.endswith("available: digit_images, digits, image_folder, synthetic, table"), line


# -- short functions -------------------------------------------------------------------------
