"""The compression steps: each one a config with a `_target_` (conf/compress/*.yaml), built and
checked like every other component, so `kiln train --cfg job` shows them and the config test
binds their arguments to these signatures.

    Pruning (on the torch module, then a fine-tune):   PruneStructured, PruneUnstructured
    Quantization (on the exported ONNX net, last):      QuantizeDynamic, QuantizeStatic

A step of your own is any class with the same shape: a `Pruning` subclass with `prune(net,
example)`, or a `Quantization` subclass with `quantize(source, target, calibration)`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import require


@dataclass(frozen=True)
class Pruning:
    """Removes or zeroes weights of the exported module in place, then fine-tunes the whole
    LightningModule through its own training_step."""

    finetune_epochs: int = 10
    patience: int = 3
    lr_scale: float = 0.3

    def __post_init__(self) -> None:
        require(
            isinstance(self.finetune_epochs, int) and self.finetune_epochs >= 0,
            "finetune_epochs",
            f"must be an integer >= 0, got {self.finetune_epochs!r}",
        )
        require(
            isinstance(self.patience, int) and self.patience >= 1,
            "patience",
            f"must be an integer >= 1, got {self.patience!r}",
        )
        require(
            _number(self.lr_scale) and self.lr_scale > 0, "lr_scale", f"must be > 0, got {self.lr_scale!r}"
        )

    def prune(self, net: Any, example: Any) -> None:
        raise NotImplementedError

    def note(self, before: int, net: Any, tuned: dict[str, Any], metric: str) -> str:
        """One line for the report: what the step did."""
        raise NotImplementedError


@dataclass(frozen=True)
class Quantization:
    """Rewrites the exported fp32 ONNX net as int8 with onnxruntime (always the last step)."""

    def quantize(
        self, source: Path, target: Path, calibration: Callable[[int, int], list[np.ndarray]]
    ) -> list[str]:
        """Write `target`; return warnings for the user. `calibration(batches, batch_size)` gives
        model inputs drawn from the training loader."""
        raise NotImplementedError


@dataclass(frozen=True)
class PruneStructured(Pruning):
    """Removes `ratio` of the channels and neurons of every layer but the output one (torch-pruning,
    L1 magnitude): the net really gets smaller and faster."""

    ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction(self.ratio, "ratio")

    def prune(self, net: Any, example: Any) -> None:
        from kiln.compression.pruning import prune_structured_in_place

        prune_structured_in_place(net, example, self.ratio)

    def note(self, before: int, net: Any, tuned: dict[str, Any], metric: str) -> str:
        from kiln.compression.pruning import count_parameters

        after = count_parameters(net)
        best = tuned["best_score"]
        return (
            f"prune_structured ratio {self.ratio}: parameters {before} -> {after} ({after / before:.0%}); "
            f"fine-tuned {tuned['epochs']} epochs (best {metric}={'n/a' if best is None else f'{best:.4f}'})"
            + budget_drops(tuned)
        )


@dataclass(frozen=True)
class PruneUnstructured(Pruning):
    """Zeroes the smallest `amount` of the weights by L1 magnitude (`scope`: global or per layer);
    the masks are folded in after the fine-tune. A dense ONNX file keeps its size and speed."""

    amount: float = 0.5
    scope: str = "global"
    finetune_epochs: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction(self.amount, "amount")
        require(self.scope in ("global", "layer"), "scope", f"must be global or layer, got {self.scope!r}")

    def prune(self, net: Any, example: Any) -> None:
        from kiln.compression.pruning import prune_unstructured_in_place

        prune_unstructured_in_place(net, self.amount, self.scope)

    def note(self, before: int, net: Any, tuned: dict[str, Any], metric: str) -> str:
        from kiln.compression.pruning import make_permanent, weight_sparsity

        make_permanent(net)
        return (
            f"prune_unstructured amount {self.amount} ({self.scope}): weight sparsity {weight_sparsity(net):.0%}, "
            f"fine-tuned {tuned['epochs']} epochs; a dense ONNX file keeps its size and speed (zeros are "
            "stored and multiplied like any weight)" + budget_drops(tuned)
        )


@dataclass(frozen=True)
class QuantizeDynamic(Quantization):
    """onnxruntime dynamic int8: weights int8, activations quantized on the fly; for Linear-heavy nets."""

    per_channel: bool = False

    def quantize(
        self, source: Path, target: Path, calibration: Callable[[int, int], list[np.ndarray]]
    ) -> list[str]:
        from kiln.compression.quantization import quantize_dynamic

        return quantize_dynamic(source, target, per_channel=self.per_channel)


@dataclass(frozen=True)
class QuantizeStatic(Quantization):
    """onnxruntime static QDQ int8, activation ranges calibrated on `calibration_batches` batches of
    `calibration_batch_size` training inputs. Accuracy-aware (compression/int8_search.py): each
    calibration choice (`calibration` x `per_channel` x `reduce_range`, each a value or a list) is
    judged on the validation split in the order given, the first within the budget kept; when none
    is, up to `max_fallback_attempts` retries keep the most sensitive layers in fp32 (`fallback`).
    `exclude`: layers always kept in fp32 (node names of the pre-processed graph)."""

    calibration_batches: int = 8
    calibration_batch_size: int = 64
    per_channel: bool | Sequence[bool] = True
    calibration: str | Sequence[str] = "minmax"
    reduce_range: bool | str | Sequence[bool] = False
    fallback: bool = True
    max_fallback_attempts: int = 4
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        require(
            isinstance(self.calibration_batches, int) and self.calibration_batches >= 1,
            "calibration_batches",
            "the calibration set would be empty; use 1 or more batches (8 is a good start)",
        )
        require(
            isinstance(self.calibration_batch_size, int) and self.calibration_batch_size >= 1,
            "calibration_batch_size",
            "the calibration set would be empty; use 1 or more rows",
        )
        from kiln.compression.quantization import CALIBRATION_METHODS

        methods = _as_tuple(self.calibration)
        require(
            bool(methods) and all(m in CALIBRATION_METHODS for m in methods),
            "calibration",
            f"unknown calibration method in {list(methods)}; use one or more of {', '.join(CALIBRATION_METHODS)}, "
            "e.g. [minmax, percentile]",
        )
        require(
            bool(_as_tuple(self.per_channel))
            and all(isinstance(v, bool) for v in _as_tuple(self.per_channel)),
            "per_channel",
            "use true, false or [true, false]",
        )
        reduce = _as_tuple(self.reduce_range)
        require(
            bool(reduce) and (reduce == ("auto",) or all(isinstance(v, bool) for v in reduce)),
            "reduce_range",
            "use false, true, [false, true] or auto (true where the CPU lacks VNNI)",
        )
        require(isinstance(self.fallback, bool), "fallback", "use true or false")
        require(
            isinstance(self.max_fallback_attempts, int)
            and not isinstance(self.max_fallback_attempts, bool)
            and self.max_fallback_attempts >= 1,
            "max_fallback_attempts",
            f"must be an integer >= 1, got {self.max_fallback_attempts!r} "
            "(compress.quantize_static.fallback=false turns the fallback off)",
        )
        require(
            all(isinstance(name, str) and name for name in _as_tuple(self.exclude)),
            "exclude",
            "use a list of layer names, e.g. [/features/0/Conv]",
        )
        for name in ("per_channel", "calibration", "reduce_range", "exclude"):  # lists from Hydra, hashable
            value = getattr(self, name)
            if not isinstance(value, str | bool):
                object.__setattr__(self, name, tuple(value))

    def choices(self) -> list[Any]:
        """The calibration choices, in the order they are tried (kiln.compression.quantization.StaticSettings)."""
        from kiln.compression.quantization import StaticSettings

        reduce = _as_tuple(self.reduce_range)
        if reduce == ("auto",):
            from kiln.compression.int8_search import cpu_instruction_set

            reduce = (cpu_instruction_set().get("vnni") is False,)  # 7-bit weights only without VNNI
        return [
            StaticSettings(str(method), bool(per_channel), bool(reduced), tuple(_as_tuple(self.exclude)))
            for method in _as_tuple(self.calibration)
            for per_channel in _as_tuple(self.per_channel)
            for reduced in reduce
        ]

    def quantize(
        self, source: Path, target: Path, calibration: Callable[[int, int], list[np.ndarray]]
    ) -> list[str]:
        """The first calibration choice, no judging (`search` judges)."""
        from kiln.compression.quantization import quantize_static

        batches = calibration(self.calibration_batches, self.calibration_batch_size)
        quantize_static(source, target, "input", batches, settings=self.choices()[0])
        return []

    def search(
        self, source: Path, target: Path, calibration: Callable[[int, int], list[np.ndarray]], judge: Any
    ) -> dict[str, Any]:
        """Accuracy-aware static int8 (kiln.compression.int8_search): writes `target`, returns the
        variant's record of the attempts."""
        from kiln.compression import int8_search

        batches = calibration(self.calibration_batches, self.calibration_batch_size)
        workdir = int8_search.work_directory(target)
        try:
            prepared = int8_search.prepared_net(source, workdir)
            int8_search.check_exclude(prepared, _as_tuple(self.exclude))
            attempts, outcome = int8_search.search(
                self.choices(),
                prepared,
                target,
                batches,
                judge,
                self.max_fallback_attempts if self.fallback else 0,
                workdir,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return {
            "outcome": outcome,
            "ranked_by": "relative squared error each layer adds in the int8 graph on a calibration batch",
            "attempts": [attempt.as_row() for attempt in attempts],
        }


# The steps a recipe may name without a config node of its own: built with their defaults.
BUILT_IN: dict[str, type[Pruning] | type[Quantization]] = {
    "prune_unstructured": PruneUnstructured,
    "prune_structured": PruneStructured,
    "quantize_dynamic": QuantizeDynamic,
    "quantize_static": QuantizeStatic,
}


def budget_drops(tuned: dict[str, Any]) -> str:
    """The budget's drop before the fine-tune and after each epoch, when the fine-tune followed it."""
    drops = tuned.get("budget_drops") or []
    return (
        f"; budget drop before the fine-tune, then by epoch: {', '.join(f'{d:g}' for d in drops)}"
        if drops
        else ""
    )


def _as_tuple(value: Any) -> tuple[Any, ...]:
    """A setting that may be one value or a list of them, as a tuple."""
    return (value,) if isinstance(value, str | bool | int | float) or value is None else tuple(value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_fraction(value: Any, name: str) -> None:
    require(
        _number(value) and 0 < value < 1,
        name,
        "must be between 0 and 1, exclusive (the fraction removed), e.g. 0.5",
    )
