"""Fast tests: every recipe file reads into checked candidates; bad settings are one clear error;
the choice rule; pruning and quantization on small nets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kiln.compression.choose import choose, metric_drop
from kiln.compression.pruning import (
    count_parameters,
    fit_to_state_dict,
    make_permanent,
    prune_structured,
    prune_unstructured,
    weight_sparsity,
)
from kiln.compression.quantization import calibration_batches
from kiln.compression.recipes import read_recipe
from kiln.compression.steps import PruneStructured, QuantizeStatic
from kiln.config import config_dir
from kiln.errors import KilnError
from kiln.models.nets import cnn, mlp

RECIPES = sorted((config_dir() / "compress").glob("*.yaml"))


def recipe_config(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(config_dir() / "compress" / f"{name}.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_file_reads(path: Path):
    recipe = read_recipe(OmegaConf.to_container(OmegaConf.load(path)))
    assert recipe.name == path.stem
    assert recipe.max_metric_drop == 1.0
    if path.stem == "none":
        assert recipe.candidates == []
    elif path.stem == "auto":
        kinds = {tuple(c.step_names) for c in recipe.candidates}
        assert ("prune_structured", "quantize_static") in kinds
    else:
        assert [name for c in recipe.candidates for name in c.step_names] == [path.stem]


def test_the_recipe_files_cover_the_documented_ones():
    assert {p.stem for p in RECIPES} >= {
        "none",
        "prune_unstructured",
        "prune_structured",
        "quantize_dynamic",
        "quantize_static",
        "auto",
    }


def test_recipes_compose_prune_then_quantize():
    config = recipe_config("prune_structured")
    config["steps"] = ["prune_structured", "quantize_static"]
    (candidate,) = read_recipe(config).candidates
    assert candidate.name == "prune_structured+quantize_static"
    assert isinstance(candidate.quantize_step, QuantizeStatic) and candidate.quantize_step.per_channel is True
    config["steps"] = ["quantize_static", "prune_structured"]
    with pytest.raises(KilnError, match="quantize once, as the last step"):
        read_recipe(config)


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2])
def test_a_pruning_ratio_outside_zero_one_is_refused(ratio: float):
    config = recipe_config("prune_structured")
    config["prune_structured"]["ratio"] = ratio
    with pytest.raises(
        KilnError, match=rf"compress\.prune_structured\.ratio={ratio}: must be between 0 and 1"
    ):
        read_recipe(config)


def test_an_empty_calibration_set_is_refused():
    config = recipe_config("quantize_static")
    config["quantize_static"]["calibration_batches"] = 0
    with pytest.raises(KilnError, match="calibration_batches=0: the calibration set would be empty"):
        read_recipe(config)
    with pytest.raises(KilnError, match="calibration set is empty"):
        calibration_batches(np.zeros((0, 4), dtype=np.float32), 4, 8, seed=0)


def test_unknown_steps_and_settings_are_named():
    with pytest.raises(KilnError, match=r"compress\.steps\[0\]=prune_magic: no such compression step"):
        read_recipe({"recipe": "x", "steps": ["prune_magic"]})
    with pytest.raises(
        KilnError, match=r"compress\.prune_structured\.ratoi: PruneStructured has no argument 'ratoi'"
    ):
        read_recipe(
            {"recipe": "prune_structured", "steps": ["prune_structured"], "prune_structured": {"ratoi": 0.5}}
        )
    with pytest.raises(KilnError, match="max_metric_drop=-1"):
        read_recipe({"recipe": "none", "max_metric_drop": -1})


def test_a_step_is_a_target_config_and_a_candidate_may_override_its_settings():
    recipe = read_recipe(
        {
            "recipe": "auto",
            "candidates": {
                "light": ["prune_heavy"],
                "heavy": [{"prune_heavy": {"ratio": 0.8}}, "quantize_static"],
            },
            "prune_heavy": {"_target_": "kiln.compression.steps.PruneStructured", "ratio": 0.6},
        }
    )
    light, heavy = recipe.candidates
    assert light.steps == [("prune_heavy", PruneStructured(ratio=0.6))]
    assert heavy.prune_steps == [("prune_heavy", PruneStructured(ratio=0.8))]
    assert heavy.quantize_step == QuantizeStatic()  # a built-in step without a node: its defaults
    with pytest.raises(
        KilnError, match=r"compress\.not_a_step\._target_=kiln\.models\.nets\.mlp: not a compression step"
    ):
        read_recipe(
            {"recipe": "x", "steps": ["not_a_step"], "not_a_step": {"_target_": "kiln.models.nets.mlp"}}
        )


def variant(name: str, drop: float, speedup: float | None, size: int, passed: bool = True) -> dict:
    """`speedup`: over the fp32 graph at both batch sizes, with a 95% interval 10% either side."""
    measured = {"median": speedup, "ci95": [speedup * 0.9, speedup * 1.1], "rounds": 30} if speedup else None
    return {"name": name, "passed": passed, "reason": "" if passed else "parity failed", "val_drop": drop,
            "drop_ci95": None, "speedup": {"1": measured, "256": measured} if measured else None,
            "size_bytes": size}  # fmt: skip


def test_auto_ships_the_fastest_shown_faster_within_budget_and_ties_go_to_the_smallest():
    variants = [
        variant("fp32", 0.0, None, 160_000),
        variant("int8", 0.2, 2.1, 50_000),  # within 10% of pruned's median speed-up, and smaller
        variant("pruned", 0.5, 2.2, 55_000),
        variant("lossy", 3.0, 10.0, 10_000),  # fastest, over budget
        variant("broken", 0.0, 20.0, 5_000, passed=False),  # fastest, failed its check
        variant("slow", 0.0, 0.5, 1_000),  # smallest, slower than fp32
    ]
    assert choose(variants, auto=True, wanted=None, max_drop=1.0).name == "int8"
    assert choose(variants, auto=True, wanted=None, max_drop=0.0).name == "fp32"
    assert choose(variants, auto=True, wanted=None, max_drop=1.0, objective="size").name == "slow"


def test_a_lossy_variant_is_refused_with_a_zero_budget():
    choice = choose(
        [variant("fp32", 0.0, None, 1), variant("pruned", 0.4, 2.0, 1)],
        auto=False,
        wanted="pruned",
        max_drop=0,
    )
    assert choice.name is None and "over compress.max_metric_drop=0" in choice.reason
    assert "raise compress.max_metric_drop to at least 0.40, or use compress=auto" in choice.reason


@pytest.mark.parametrize(
    ("key", "value", "line"),
    [
        ("objective", "fast", "compress.objective=fast: use one of latency, size"),
        ("decision", "maybe", "compress.decision=maybe: use one of auto, point, upper_bound"),
        ("metric", 5, "compress.metric=5: name a metric the module logs on validation, e.g. val/acc, "
         "or null (a classifier's validation accuracy, else monitor.metric)"),
    ],
)  # fmt: skip
def test_how_auto_chooses_is_checked_before_anything_runs(key: str, value: object, line: str):
    config = recipe_config("auto")
    config[key] = value
    with pytest.raises(KilnError) as error:
        read_recipe(config)
    assert str(error.value) == line


def test_auto_decides_by_the_interval_for_latency_unless_told_otherwise():
    recipe = read_recipe(recipe_config("auto"))
    assert (recipe.decision, recipe.objective, recipe.metric) == ("auto", "latency", None)
    config = {**recipe_config("auto"), "objective": "size", "metric": "val/f1", "decision": "point"}
    recipe = read_recipe(config)
    assert (recipe.decision, recipe.objective, recipe.metric) == ("point", "size", "val/f1")


def test_metric_drop_follows_the_mode():
    assert metric_drop(0.97, 0.96, "max") == pytest.approx(1.0)
    assert metric_drop(0.10, 0.12, "min") == pytest.approx(2.0)
    assert metric_drop(0.10, 0.05, "min") < 0


def test_structured_pruning_shrinks_a_cnn_and_its_weights_reload():
    net = cnn((1, 8, 8), 10, channels=(8, 16), hidden_size=32).eval()
    pruned = prune_structured(net, (1, 8, 8), 0.5)
    assert count_parameters(pruned) < 0.4 * count_parameters(net)
    x = torch.rand(3, 1, 8, 8)
    assert pruned(x).shape == (3, 10)
    rebuilt = fit_to_state_dict(
        cnn((1, 8, 8), 10, channels=(8, 16), hidden_size=32), pruned.state_dict()
    ).eval()
    torch.testing.assert_close(rebuilt(x), pruned(x))


def test_a_pruned_timm_net_reloads_with_its_own_layers_not_rebuilt_defaults():
    # timm's BatchNormAct2d holds its activation (Hardswish, or none): a BatchNorm rebuilt at its
    # pruned size from the class's defaults got ReLU instead, and a distilled MobileNetV3 failed
    # parity (max |onnxruntime - torch| 2.42) because the reloaded torch net was another net.
    from kiln.models.backbones import backbone

    torch.manual_seed(0)
    net = backbone((3, 32, 32), 10, name="mobilenetv3_small_050").eval()
    pruned = prune_structured(net, (3, 32, 32), 0.3).eval()
    rebuilt = fit_to_state_dict(
        backbone((3, 32, 32), 10, name="mobilenetv3_small_050"), pruned.state_dict()
    ).eval()
    layers = [(name, type(module).__name__) for name, module in pruned.named_modules()]
    assert [(name, type(module).__name__) for name, module in rebuilt.named_modules()] == layers
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), pruned(x), rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_reaches_its_sparsity_and_is_made_permanent(scope: str):
    net = mlp((20,), 3, hidden_sizes=(32, 32))
    pruned = make_permanent(prune_unstructured(net, 0.6, scope))
    assert weight_sparsity(pruned) == pytest.approx(0.6, abs=0.02)
    assert count_parameters(pruned) == count_parameters(net)  # same dense size
    assert not any(name.endswith("_orig") for name, _ in pruned.named_parameters())
