"""The recipes of conf/compress/, read into candidates: named lists of built, checked steps.

A recipe file (`compress=<recipe>`) holds:

    recipe: prune_structured
    steps: [prune_structured]            # applied in order; compose: [prune_structured, quantize_static]
    max_metric_drop: 1.0                 # how much worse monitor.metric may get (validation split)
    metric_unit: auto                    # of that budget: points (bounded scores) or percent (losses)
    decision: auto                       # upper_bound where the drop has a 95% interval, else point
    objective: latency                   # auto ships the highest speed-up shown above fp32; size: the smallest
    metric: null                         # the gate's metric; null: a classifier's val accuracy, else the monitor
    prune_structured:                    # a step: a config with a _target_ (kiln.compression.steps)
      _target_: kiln.compression.steps.PruneStructured
      ratio: 0.5

`recipe: auto` has `candidates: {name: [steps...]}` instead of `steps`. A step is named by its
key in the recipe; a built-in step's name (prune_structured, prune_unstructured, quantize_static,
quantize_dynamic) works without a node of its own, with its defaults. A candidate may override
a step's settings for itself: `{prune_structured: {ratio: 0.7}}`. Every mistake is reported,
naming its key, before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiln.compression.choose import DECISIONS, OBJECTIVES, UNITS
from kiln.compression.steps import BUILT_IN, Pruning, Quantization
from kiln.errors import KilnError

RECIPE_KEYS = {"recipe", "steps", "candidates", "max_metric_drop", "metric_unit", "decision", "keep_variants"}
RECIPE_KEYS |= {"objective", "metric"}  # how auto chooses, and the metric the budget holds
RECIPE_KEYS |= {"recovery_epochs", "distillation"}  # recovery by training (kiln.compression.recovery)
RECOVERY_EPOCHS = 2  # when the recipe does not say: short, since it runs only after a miss
DISTILLATION_DEFAULTS = {"temperature": 4.0, "alpha": 0.5, "required": False}
FP32 = "fp32"  # the uncompressed model's variant, always built: the reference and auto's fallback

Step = Pruning | Quantization


@dataclass
class Candidate:
    name: str
    steps: list[tuple[str, Step]]  # (the step's name in the recipe, the built step)

    @property
    def step_names(self) -> list[str]:
        return [name for name, _ in self.steps]

    @property
    def prune_steps(self) -> list[tuple[str, Pruning]]:
        return [(name, step) for name, step in self.steps if isinstance(step, Pruning)]

    @property
    def quantize_step(self) -> Quantization | None:
        return next((step for _, step in self.steps if isinstance(step, Quantization)), None)


@dataclass
class Recipe:
    name: str
    candidates: list[Candidate]
    max_metric_drop: float
    metric_unit: str = "auto"  # kiln.compression.choose.metric_unit: points, percent, or by the metric
    decision: str = "auto"  # auto, point or upper_bound (kiln.compression.choose)
    keep_variants: bool = False  # keep every variant's files after a delivery (kiln.delivery)
    config: dict[str, Any] | None = None  # the plain config it was read from
    objective: str = "latency"  # latency or size (kiln.compression.choose)
    metric: str | None = None  # the budget's metric (None: kiln.compression.choose.gate_metric picks)

    @property
    def auto(self) -> bool:
        return self.name == "auto"


def read_recipe(config: Mapping[str, Any]) -> Recipe:
    """The recipe from a plain `compress` config, every value checked (KilnError naming the key)."""
    nodes = {str(key): value for key, value in config.items() if key not in RECIPE_KEYS}
    for key, node in nodes.items():
        if not isinstance(node, Mapping) or ("_target_" not in node and key not in BUILT_IN):
            raise KilnError(
                f"compress.{key}: no such recipe key; recipe keys: {', '.join(sorted(RECIPE_KEYS))}, "
                f"and steps (a config with a _target_, or the settings of a built-in: {', '.join(BUILT_IN)})"
            )
    name = str(config.get("recipe", "none"))
    drop = config.get("max_metric_drop", 1.0)
    if not isinstance(drop, int | float) or isinstance(drop, bool) or drop < 0:
        raise KilnError(
            f"compress.max_metric_drop={drop}: must be a number >= 0 (points of a bounded score, "
            "percent of a loss: compress.metric_unit)"
        )
    unit, decision = str(config.get("metric_unit", "auto")), str(config.get("decision", "auto"))
    objective, metric = str(config.get("objective", "latency")), config.get("metric")
    if unit not in UNITS:
        raise KilnError(f"compress.metric_unit={unit}: use one of {', '.join(UNITS)}")
    if decision not in DECISIONS:
        raise KilnError(f"compress.decision={decision}: use one of {', '.join(DECISIONS)}")
    if objective not in OBJECTIVES:
        raise KilnError(f"compress.objective={objective}: use one of {', '.join(OBJECTIVES)}")
    if metric is not None and (not isinstance(metric, str) or "/" not in metric):
        raise KilnError(
            f"compress.metric={metric}: name a metric the module logs on validation, e.g. val/acc, "
            "or null (a classifier's validation accuracy, else monitor.metric)"
        )
    read_settings(config)  # compress.recovery_epochs and compress.distillation, checked before any work
    known = sorted({*BUILT_IN, *nodes})
    for key in nodes:  # every step node is checked, used or not: a typo must not wait for its turn
        build_step(key, nodes, {}, f"compress.{key}", known)
    if name == "auto":
        raw = config.get("candidates") or {}
        if not isinstance(raw, Mapping) or not raw:
            raise KilnError("compress.candidates: auto needs candidates, e.g. {int8: [quantize_static]}")
        candidates = [
            Candidate(str(cname), read_steps(steps, f"compress.candidates.{cname}", nodes, known))
            for cname, steps in raw.items()
        ]
        if any(c.name == FP32 for c in candidates):
            raise KilnError(
                f"compress.candidates.{FP32}: the name is taken by the uncompressed model; rename it"
            )
    else:
        steps = read_steps(config.get("steps") or [], "compress.steps", nodes, known)
        candidates = [Candidate("+".join(n for n, _ in steps), steps)] if steps else []
    keep = config.get("keep_variants", False)
    if not isinstance(keep, bool):
        raise KilnError(f"compress.keep_variants={keep}: use true (keep every variant's files) or false")
    return Recipe(
        name, candidates, float(drop), unit, decision, keep, dict(config), objective=objective, metric=metric
    )


def read_steps(raw: Any, key: str, nodes: Mapping[str, Any], known: list[str]) -> list[tuple[str, Step]]:
    if not isinstance(raw, list | tuple):
        raise KilnError(f"{key}={raw!r}: expected a list of steps, e.g. [prune_structured, quantize_static]")
    steps = []
    for index, entry in enumerate(raw):
        if isinstance(entry, Mapping) and len(entry) == 1:
            ((name, overrides),) = entry.items()
            if not isinstance(overrides, Mapping):
                raise KilnError(
                    f"{key}[{index}].{name}={overrides!r}: expected the step's settings, e.g. {{ratio: 0.7}}"
                )
        else:
            name, overrides = entry, {}
        name = str(name)
        where = f"{key}[{index}].{name}" if overrides else f"compress.{name}"
        if name not in known:
            raise KilnError(f"{key}[{index}]={name}: no such compression step; steps: {', '.join(known)}")
        steps.append((name, build_step(name, nodes, overrides, where, known)))
    quantizers = [isinstance(step, Quantization) for _, step in steps]
    names = [name for name, _ in steps]
    if sum(quantizers) > 1 or (any(quantizers) and not quantizers[-1]):
        raise KilnError(f"{key}={names}: quantize once, as the last step (prune first, then quantize)")
    if len(set(names)) != len(names):
        raise KilnError(f"{key}={names}: a step appears twice")
    return steps


def build_step(
    name: str, nodes: Mapping[str, Any], overrides: Mapping[str, Any], key: str, known: list[str]
) -> Step:
    """The step `name`: its node in the recipe (a `_target_`, or a built-in's settings), with a
    candidate's `overrides`, built and checked; a built-in with its defaults when it has no node."""
    from hydra.utils import get_object

    from kiln.builder import build

    node = dict(nodes.get(name) or {})
    if "_target_" not in node:
        builtin = BUILT_IN[name]
        node["_target_"] = f"{builtin.__module__}.{builtin.__qualname__}"
    try:
        target = get_object(str(node["_target_"]))
    except Exception:
        target = None  # build() names the import error
    if target is not None and not (isinstance(target, type) and issubclass(target, Pruning | Quantization)):
        raise KilnError(
            f"compress.{name}._target_={node['_target_']}: not a compression step; subclass "
            "kiln.compression.steps.Pruning or Quantization"
        )
    step: Step = build(key, {**node, **overrides})
    return step


# -- recovery by training (kiln.compression.recovery): its settings, read with the recipe --------


@dataclass(frozen=True)
class RecoverySettings:
    epochs: int
    temperature: float  # softens both models' logits: higher shares more of the teacher's ranking
    alpha: float  # weight of the distillation term; 1 - alpha stays on the module's own loss
    required: bool = False  # asked for explicitly: a module it cannot run on is refused before any work


def read_settings(config: Mapping[str, Any]) -> RecoverySettings:
    """`compress.recovery_epochs` and `compress.distillation` from a recipe config, checked."""
    epochs = config.get("recovery_epochs", RECOVERY_EPOCHS)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise KilnError(
            f"compress.recovery_epochs={epochs}: must be a whole number >= 0 (the epochs of the "
            "fine-tune that recovers a variant missing the budget; 0 turns recovery off), e.g. "
            "compress.recovery_epochs=2"
        )
    distillation = config.get("distillation") or {}
    unknown = (
        sorted(set(distillation) - set(DISTILLATION_DEFAULTS)) if isinstance(distillation, Mapping) else []
    )
    if not isinstance(distillation, Mapping) or unknown:
        raise KilnError(
            f"compress.distillation={distillation!r}: expected "
            f"{{temperature: 4.0, alpha: 0.5, required: false}}{f' (no key {unknown[0]})' if unknown else ''}"
        )
    values = {**DISTILLATION_DEFAULTS, **distillation}
    temperature, alpha, required = values["temperature"], values["alpha"], values["required"]
    if not _number(temperature) or temperature <= 0:
        raise KilnError(f"compress.distillation.temperature={temperature}: must be > 0, e.g. 4.0")
    if not _number(alpha) or not 0 <= alpha <= 1:
        raise KilnError(
            f"compress.distillation.alpha={alpha}: must be between 0 and 1 (the weight of the "
            "teacher's soft targets), e.g. 0.5"
        )
    check_required(required, epochs, str(config.get("recipe", "none")))
    return RecoverySettings(epochs, float(temperature), float(alpha), required)


def check_required(required: Any, epochs: int, recipe: str) -> None:
    """`compress.distillation.required=true` asks for distillation: it must be able to run."""
    key = (
        f"compress.distillation.required={str(required).lower() if isinstance(required, bool) else required}"
    )
    if not isinstance(required, bool):
        raise KilnError(f"{key}: use true (refuse a module distillation cannot run on) or false (skip it)")
    if required and recipe != "auto":
        raise KilnError(
            f"{key}: distillation is a recovery of compress=auto; use compress=auto or drop the key"
        )
    if required and epochs == 0:
        raise KilnError(
            f"{key}: compress.recovery_epochs=0 turns recovery off; set compress.recovery_epochs=2"
        )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
