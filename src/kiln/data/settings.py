"""The settings every built-in DataModule shares, declared once: splits, batch sizes and seed.

    kiln train data=table data.batch_size=32 data.val_fraction=0.2 data.num_folds=5 data.fold=2

A built-in DataModule declares only its own arguments and takes these through `**settings`
(`SharesDataSettings.take_settings`); the class's signature, which config checks, cross-validation
and `inspect` read, lists both, so `data.batch_sise=3` is still named with the valid keys.
conf/data/_shared.yaml is the same declaration on the config side. A user's own DataModule needs
none of this: the contract is Lightning's (kiln.contract).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from kiln.data.splits import check_split_settings
from kiln.errors import require


@dataclass(frozen=True)
class DataSettings:
    """How rows are split, batched and seeded: the same keys for every built-in DataModule."""

    batch_size: int = 64  # training mini-batch
    eval_batch_size: int = 1024  # validation, test and prediction batches
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    num_folds: int | None = None  # k-fold: the rest of the rows outside the (fixed) test split
    fold: int = 0  # which fold validates, 0..num_folds-1
    refit: bool = False  # train on the training and validation rows together (cv.refit's final model)
    seed: int = 0  # splits and batch order

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            require(_is_int(value) and value >= 1, name, f"must be >= 1, got {value!r}")
        require(isinstance(self.refit, bool), "refit", f"must be true or false, got {self.refit!r}")
        require(_is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        check_split_settings(self.val_fraction, self.test_fraction, self.num_folds, self.fold)

    def updated(self, given: dict[str, Any]) -> DataSettings:
        """These settings with the `given` ones changed; an unknown name is refused by name."""
        for name in given:
            require(name in FIELDS, name, f"not a data setting; the shared settings are: {', '.join(FIELDS)}")
        return dataclasses.replace(self, **given)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FIELDS = tuple(field.name for field in dataclasses.fields(DataSettings))


class SharesDataSettings:
    """Mixed into each built-in DataModule: `take_settings(settings)` in `__init__`, and a class
    signature that names the shared settings beside the class's own arguments."""

    # The defaults this class gives the shared settings (an image folder evaluates in smaller batches).
    default_settings: ClassVar[DataSettings] = DataSettings()
    settings: DataSettings

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = signature_with_settings(cls)  # type: ignore[attr-defined]

    def take_settings(self, given: dict[str, Any]) -> None:
        self.settings = self.default_settings.updated(given)


def signature_with_settings(cls: type[SharesDataSettings]) -> inspect.Signature:
    """`cls.__init__`'s own arguments, then what its `**settings` pass on: the parent class's
    arguments (a DataModule built on another) or, at the first one, the shared settings, with
    this class's defaults. Keyword-only, as `**settings` takes them."""
    own = [p for p in _init_parameters(cls) if p.kind is not p.VAR_KEYWORD]
    if len(own) == len(_init_parameters(cls)):
        return inspect.Signature(own)  # takes no **settings: it fixes them itself
    taken = {p.name for p in own}
    passed_on = [p for p in _parent_parameters(cls) if p.name not in taken]
    return inspect.Signature(own + [p.replace(kind=p.KEYWORD_ONLY) for p in passed_on])


def _init_parameters(cls: type) -> list[inspect.Parameter]:
    try:  # real types, not the strings `from __future__ import annotations` leaves
        signature = inspect.signature(cls.__init__, eval_str=True)  # type: ignore[misc]
    except NameError:
        signature = inspect.signature(cls.__init__)  # type: ignore[misc]
    return list(signature.parameters.values())[1:]  # without self


def _parent_parameters(cls: type[SharesDataSettings]) -> list[inspect.Parameter]:
    parent = next(
        (
            base
            for base in cls.__mro__[1:]
            if issubclass(base, SharesDataSettings) and base is not SharesDataSettings
        ),
        None,
    )
    parameters = list(inspect.signature(parent).parameters.values()) if parent else _settings_parameters()
    defaults = dataclasses.asdict(cls.default_settings)
    return [p.replace(default=defaults[p.name]) if p.name in defaults else p for p in parameters]


def _settings_parameters() -> list[inspect.Parameter]:
    types = typing.get_type_hints(DataSettings)
    return [
        inspect.Parameter(
            field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=types[field.name]
        )
        for field in dataclasses.fields(DataSettings)
    ]
