"""The recipes of conf/compress/, read into candidates: named lists of steps, checked up front.

A recipe file (`compress=<recipe>`) holds:

    recipe: prune_structured
    steps: [prune_structured]            # applied in order; compose: [prune_structured, quantize_static]
    max_metric_drop: 1.0                 # points of monitor.metric a variant may lose
    prune_structured: {ratio: 0.5, ...}  # settings of each step (defaults below for the rest)

`recipe: auto` has `candidates: {name: [steps...]}` instead of `steps`. A step is a name, or a
one-key mapping that overrides that step's settings for one candidate:
`{prune_structured: {ratio: 0.7}}`. Every mistake is reported before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError

STEP_DEFAULTS: dict[str, dict[str, Any]] = {
    "prune_unstructured": {
        "amount": 0.5,
        "scope": "global",
        "finetune_epochs": 3,
        "patience": 3,
        "lr_scale": 0.3,
    },
    "prune_structured": {"ratio": 0.5, "finetune_epochs": 10, "patience": 3, "lr_scale": 0.3},
    "quantize_dynamic": {"per_channel": False},
    "quantize_static": {"calibration_batches": 8, "calibration_batch_size": 64, "per_channel": True},
}
PRUNING = ("prune_unstructured", "prune_structured")
QUANTIZATION = ("quantize_dynamic", "quantize_static")
RECIPE_KEYS = {"recipe", "steps", "candidates", "max_metric_drop", *STEP_DEFAULTS}
FP32 = "fp32"  # the uncompressed model's variant, always built: the reference and auto's fallback


@dataclass(frozen=True)
class Step:
    kind: str
    settings: dict[str, Any]
    key: str  # where it came from, for messages: compress.prune_structured

    def identity(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        return self.kind, tuple(sorted(self.settings.items()))


@dataclass
class Candidate:
    name: str
    steps: list[Step]

    @property
    def prune_steps(self) -> list[Step]:
        return [s for s in self.steps if s.kind in PRUNING]

    @property
    def quantize_step(self) -> Step | None:
        return next((s for s in self.steps if s.kind in QUANTIZATION), None)


@dataclass
class Recipe:
    name: str
    candidates: list[Candidate]
    max_metric_drop: float
    notes: list[str] = field(default_factory=list)

    @property
    def auto(self) -> bool:
        return self.name == "auto"


def read_recipe(config: Mapping[str, Any]) -> Recipe:
    """The recipe from a plain `compress` config, every value checked (KilnError naming the key)."""
    unknown = sorted(set(config) - RECIPE_KEYS)
    if unknown:
        raise KilnError(
            f"compress.{unknown[0]}: no such recipe key; recipe keys: {', '.join(sorted(RECIPE_KEYS))}"
        )
    name = str(config.get("recipe", "none"))
    drop = config.get("max_metric_drop", 1.0)
    if not isinstance(drop, int | float) or isinstance(drop, bool) or drop < 0:
        raise KilnError(
            f"compress.max_metric_drop={drop}: must be a number >= 0 (points of the monitored metric)"
        )
    base = {
        kind: _settings(kind, config.get(kind), f"compress.{kind}", STEP_DEFAULTS[kind])
        for kind in STEP_DEFAULTS
    }
    if name == "auto":
        raw = config.get("candidates") or {}
        if not isinstance(raw, Mapping) or not raw:
            raise KilnError("compress.candidates: auto needs candidates, e.g. {int8: [quantize_static]}")
        candidates = [
            Candidate(str(cname), _steps(steps, f"compress.candidates.{cname}", base))
            for cname, steps in raw.items()
        ]
        if any(c.name == FP32 for c in candidates):
            raise KilnError(
                f"compress.candidates.{FP32}: the name is taken by the uncompressed model; rename it"
            )
    else:
        steps = _steps(config.get("steps") or [], "compress.steps", base)
        candidates = [Candidate("+".join(s.kind for s in steps), steps)] if steps else []
    return Recipe(name, candidates, float(drop))


def _steps(raw: Any, key: str, base: dict[str, dict[str, Any]]) -> list[Step]:
    if not isinstance(raw, list | tuple):
        raise KilnError(f"{key}={raw!r}: expected a list of steps, e.g. [prune_structured, quantize_static]")
    steps = []
    for index, entry in enumerate(raw):
        if isinstance(entry, Mapping) and len(entry) == 1:
            ((kind, overrides),) = entry.items()
        else:
            kind, overrides = entry, None
        kind = str(kind)
        if kind not in STEP_DEFAULTS:
            raise KilnError(
                f"{key}[{index}]={kind}: no such compression step; steps: {', '.join(STEP_DEFAULTS)}"
            )
        settings = _settings(kind, overrides, f"{key}[{index}].{kind}", base[kind])
        steps.append(
            Step(kind, settings, f"compress.{kind}" if overrides is None else f"{key}[{index}].{kind}")
        )
    kinds = [s.kind for s in steps]
    quantizers = [k for k in kinds if k in QUANTIZATION]
    if len(quantizers) > 1 or (quantizers and kinds[-1] not in QUANTIZATION):
        raise KilnError(f"{key}={kinds}: quantize once, as the last step (prune first, then quantize)")
    if len(set(kinds)) != len(kinds):
        raise KilnError(f"{key}={kinds}: a step appears twice")
    return steps


def _settings(kind: str, given: Any, key: str, base: Mapping[str, Any]) -> dict[str, Any]:
    settings = dict(base)
    if given is None:
        return settings
    if not isinstance(given, Mapping):
        raise KilnError(f"{key}={given!r}: expected the step's settings, e.g. {dict(STEP_DEFAULTS[kind])}")
    for name, value in given.items():
        if name not in STEP_DEFAULTS[kind]:
            raise KilnError(
                f"{key}.{name}: {kind} has no setting '{name}'; its settings: {', '.join(STEP_DEFAULTS[kind])}"
            )
        settings[str(name)] = value
    _check(kind, settings, key)
    return settings


def _check(kind: str, s: dict[str, Any], key: str) -> None:
    def number(name: str) -> Any:
        value = s[name]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise KilnError(f"{key}.{name}={value!r}: expected a number")
        return value

    if kind in PRUNING:
        name = "ratio" if kind == "prune_structured" else "amount"
        if not 0 < number(name) < 1:
            raise KilnError(
                f"{key}.{name}={s[name]}: must be between 0 and 1, exclusive (the fraction removed), e.g. 0.5"
            )
        if not isinstance(s["finetune_epochs"], int) or s["finetune_epochs"] < 0:
            raise KilnError(f"{key}.finetune_epochs={s['finetune_epochs']}: must be an integer >= 0")
        if not isinstance(s["patience"], int) or s["patience"] < 1:
            raise KilnError(f"{key}.patience={s['patience']}: must be an integer >= 1")
        if number("lr_scale") <= 0:
            raise KilnError(f"{key}.lr_scale={s['lr_scale']}: must be > 0")
        if kind == "prune_unstructured" and s["scope"] not in ("global", "layer"):
            raise KilnError(f"{key}.scope={s['scope']}: must be global or layer")
    if kind == "quantize_static":
        batches, size = s["calibration_batches"], s["calibration_batch_size"]
        if not isinstance(batches, int) or batches < 1:
            raise KilnError(
                f"{key}.calibration_batches={batches}: the calibration set would be empty; use 1 or more batches (8 is a good start)"
            )
        if not isinstance(size, int) or size < 1:
            raise KilnError(
                f"{key}.calibration_batch_size={size}: the calibration set would be empty; use 1 or more rows"
            )
