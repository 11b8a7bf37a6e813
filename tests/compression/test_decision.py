"""Ship decisions with evidence: the budget's unit follows the metric, a paired bootstrap 95%
interval of every drop on the validation rows, `decision=point|upper_bound`, ties decided by the
latency spread, and a report that shows validation and test side by side."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, mean_absolute_error, r2_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kiln.compression.bootstrap import Rows, drop_interval, row_metric
from kiln.compression.choose import choose, gate_metric, metric_drop, metric_unit
from kiln.errors import KilnError
from kiln.export.report import markdown
from kiln.export.scoring import RowRecorder, evaluate


@pytest.mark.parametrize(
    ("metric", "unit"),
    [
        ("val/acc", "points"),
        ("val/f1", "points"),
        ("val/auroc", "points"),
        ("val/r2", "points"),
        ("val/top1_acc", "points"),
        ("val/mean_iou", "points"),
        ("val/loss", "percent"),
        ("val/mse", "percent"),
        ("val/mae", "percent"),
        ("val/nll", "percent"),
    ],
)
def test_the_budget_unit_follows_the_metric(metric: str, unit: str):
    assert metric_unit(metric) == unit
    assert metric_unit(metric, "points") == "points" and metric_unit(metric, "percent") == "percent"


def test_a_loss_drop_is_a_relative_change_and_a_score_drop_is_points():
    # the demo's pruned CNN: val/loss 0.0651 -> 0.0708 is 8.76% worse, not "0.57 points"
    assert metric_drop(0.0651, 0.0708, "min", "percent") == pytest.approx(8.7558, abs=1e-3)
    assert metric_drop(0.970, 0.962, "max", "points") == pytest.approx(0.8)
    assert metric_drop(0.970, 0.975, "max", "points") == pytest.approx(-0.5)  # a gain
    assert metric_drop(0.0, 0.01, "min", "percent") > 1e6  # any rise over a zero loss is over budget


def classification_rows(rows: int = 400, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, rows)
    logits = rng.normal(0, 1, (rows, classes))
    logits[np.arange(rows), targets] += 2.5  # mostly right, not always
    return logits.astype(np.float32), targets


def recomputed(name: str, task: str, outputs: np.ndarray, targets: np.ndarray) -> float:
    metric = row_metric(name, task, Rows(outputs, targets))
    assert metric is not None
    return float(metric(np.ones((1, len(targets)), dtype=np.float32))[0])


def test_per_row_metrics_equal_the_library_definitions():
    logits, targets = classification_rows()
    predicted = logits.argmax(1)
    probabilities = torch.softmax(torch.from_numpy(logits), 1).numpy()
    assert recomputed("acc", "classification", logits, targets) == pytest.approx(
        (predicted == targets).mean()
    )
    assert recomputed("f1", "classification", logits, targets) == pytest.approx(
        f1_score(targets, predicted, average="macro"), abs=1e-6
    )
    assert recomputed("auroc", "classification", logits, targets) == pytest.approx(
        roc_auc_score(targets, probabilities, multi_class="ovr", average="macro"), abs=1e-6
    )
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)).item()
    assert recomputed("loss", "classification", logits, targets) == pytest.approx(loss, abs=1e-5)

    rng = np.random.default_rng(1)
    y = rng.normal(3, 2, 300)
    prediction = (y + rng.normal(0, 0.7, 300)).astype(np.float32)
    assert recomputed("r2", "regression", prediction, y) == pytest.approx(r2_score(y, prediction), abs=1e-5)
    assert recomputed("mae", "regression", prediction, y) == pytest.approx(
        mean_absolute_error(y, prediction), abs=1e-5
    )
    assert row_metric("my_score", "classification", Rows(logits, targets)) is None


def test_the_paired_interval_matches_a_plain_index_bootstrap_and_holds_the_measured_drop():
    logits, targets = classification_rows()
    right = np.flatnonzero(logits.argmax(1) == targets)
    worse = logits.copy()
    for row in right[:10]:  # the variant gets 10 more of 400 rows wrong: 2.5 points of accuracy
        worse[row, targets[row]] = -10.0
    base_acc = (logits.argmax(1) == targets).mean()
    variant_acc = (worse.argmax(1) == targets).mean()
    drop = lambda b, v: metric_drop(b, v, "max", "points")  # noqa: E731
    interval = drop_interval(
        "val/acc",
        "classification",
        "max",
        drop,
        Rows(logits, targets),
        Rows(worse, targets),
        (base_acc, variant_acc),
    )
    measured = metric_drop(base_acc, variant_acc, "max", "points")
    assert measured == pytest.approx(2.5)
    assert interval.known and interval.low <= measured <= interval.high
    assert interval.low >= 0  # paired: the variant is never better on any resample
    # the same bootstrap written the plain way: resample row indices, recompute both accuracies
    rng = np.random.default_rng(7)
    correct_base, correct_variant = logits.argmax(1) == targets, worse.argmax(1) == targets
    drops = []
    for _ in range(2000):
        index = rng.integers(0, len(targets), len(targets))
        drops.append((correct_base[index].mean() - correct_variant[index].mean()) * 100)
    low, high = np.percentile(drops, [2.5, 97.5])
    assert interval.low == pytest.approx(low, abs=0.3) and interval.high == pytest.approx(high, abs=0.3)

    same = drop_interval(
        "val/acc",
        "classification",
        "max",
        drop,
        Rows(logits, targets),
        Rows(logits, targets),
        (base_acc,) * 2,
    )
    assert same.as_list() == [0.0, 0.0]


def test_no_interval_for_a_number_kiln_cannot_reproduce():
    logits, targets = classification_rows()
    acc = float((logits.argmax(1) == targets).mean())
    drop = lambda b, v: metric_drop(b, v, "max", "points")  # noqa: E731
    rows = Rows(logits, targets)
    logged_otherwise = drop_interval("val/acc", "classification", "max", drop, rows, rows, (acc, acc - 0.05))
    assert not logged_otherwise.known and "the module logged" in logged_otherwise.reason
    shuffled = Rows(logits[::-1].copy(), targets[::-1].copy())
    reordered = drop_interval("val/acc", "classification", "max", drop, rows, shuffled, (acc, acc))
    assert not reordered.known and "order" in reordered.reason
    own = drop_interval("val/my_score", "classification", "max", drop, rows, rows, (acc, acc))
    assert not own.known and "cannot recompute val/my_score" in own.reason


def speedup(median: float, low: float | None, high: float | None, rounds: int = 30) -> dict:
    return {"median": median, "ci95": None if low is None else [low, high], "rounds": rounds}


def variant(
    name: str,
    drop: float,
    interval: list[float] | None,
    speed: tuple[float, float | None, float | None] | None,
    size: int,
    **extra,
):
    """A scored variant; `speed`: its speed-up over the fp32 graph at batch 256 (median, low, high),
    and at batch 1 the same unless `speedup` is given; None for fp32 itself."""
    return {
        "name": name,
        "passed": True,
        "reason": "",
        "precision": "fp32" if name == "fp32" else "int8",
        "val_drop": drop,
        "drop_ci95": interval,
        "latency_us": {"1": 10.0, "256": 1000.0 / (speed[0] if speed else 1.0)},
        "latency_runs": {"1": 30, "256": 30},
        "speedup": None if speed is None else {"1": speedup(*speed), "256": speedup(*speed)},
        "size_bytes": size,
        "params": 10,
        "steps": [],
        "val_metrics": {"val/acc": 0.97 - drop / 100},
        "test_metrics": {"test/acc": 0.96},
        "check": "int8",
        "notes": [],
        **extra,
    }


FP32 = variant("fp32", 0.0, [0.0, 0.0], None, 400)


def test_upper_bound_refuses_a_variant_that_point_ships():
    # measured 0.5 points, but on few rows: the interval reaches 2.6 points
    candidates = [FP32, variant("int8_static", 0.5, [-1.4, 2.6], (3.3, 3.1, 3.5), 100)]
    point = choose(candidates, auto=True, wanted=None, max_drop=1.0, unit="points", decision="point")
    sure = choose(candidates, auto=True, wanted=None, max_drop=1.0, unit="points", decision="upper_bound")
    default = choose(candidates, auto=True, wanted=None, max_drop=1.0, unit="points")
    assert point.name == "int8_static"
    assert sure.name == "fp32" and default.name == "fp32"  # the default judges by the interval
    assert "95% interval of its drop reaches 2.60 points" in default.verdicts["int8_static"]
    fixed = choose(
        candidates[1:], auto=False, wanted="int8_static", max_drop=1.0, unit="points", decision="upper_bound"
    )
    assert fixed.name is None and "95% interval of its drop reaches 2.60 points" in fixed.reason
    assert "raise compress.max_metric_drop to at least 2.60" in fixed.reason  # the fix
    unknown = variant(
        "int8_static", 0.5, None, (3.3, 3.1, 3.5), 100, drop_ci95_reason="kiln cannot recompute val/x"
    )
    refused = choose([unknown], auto=False, wanted="int8_static", max_drop=1.0, decision="upper_bound")
    assert refused.name is None and "kiln cannot recompute val/x" in refused.reason
    # the default decides on the measured drop where kiln cannot put an interval around it
    assert choose([FP32, unknown], auto=True, wanted=None, max_drop=1.0).name == "int8_static"


def test_a_candidate_slower_than_fp32_never_ships_for_latency_but_ships_for_size():
    # the int8: a third of fp32's file, within budget, 25,076 us against fp32's 19,732 us
    int8 = variant("int8_static", 0.1, [-0.3, 0.4], (0.79, 0.74, 0.83), 100)
    latency = choose([FP32, int8], auto=True, wanted=None, max_drop=1.0)
    assert latency.name == "fp32"
    assert "measured slower than the fp32 graph: 0.79x [0.74, 0.83]" in latency.verdicts["int8_static"]
    assert (
        "fastest" not in latency.reason
        and "no candidate within the budget was shown faster" in latency.reason
    )
    size = choose([FP32, int8], auto=True, wanted=None, max_drop=1.0, objective="size")
    assert size.name == "int8_static" and "smallest file" in size.reason
    # faster at batch 256 but slower at batch 1: measured slower, so not shipped for latency
    mixed = variant("int8_static", 0.1, [-0.3, 0.4], (1.5, 1.3, 1.7), 100)
    mixed["speedup"]["1"] = speedup(0.6, 0.55, 0.66)
    choice = choose([FP32, mixed], auto=True, wanted=None, max_drop=1.0)
    assert choice.name == "fp32" and "batch 1," in choice.verdicts["int8_static"]


def test_a_speedup_whose_interval_straddles_one_is_not_faster():
    noisy = variant("pruned", 0.0, [0.0, 0.0], (1.4, 0.9, 2.1), 100)  # measured 1.4x, could be slower
    choice = choose([FP32, noisy], auto=True, wanted=None, max_drop=1.0)
    assert choice.name == "fp32"
    assert "not shown faster than the fp32 graph: 1.40x [0.90, 2.10]" in choice.verdicts["pruned"]
    few = variant("pruned", 0.0, [0.0, 0.0], (3.0, None, None), 100)  # too few rounds for an interval
    assert choose([FP32, few], auto=True, wanted=None, max_drop=1.0).name == "fp32"
    sure = variant("pruned", 0.0, [0.0, 0.0], (1.4, 1.1, 1.7), 100)
    shipped = choose([FP32, sure], auto=True, wanted=None, max_drop=1.0)
    assert shipped.name == "pruned"
    assert "speed-up over the fp32 graph 1.40x [1.10, 1.70] (95% interval, batch 256, 30 paired rounds)" in (
        shipped.reason
    )


def test_candidates_about_as_fast_tie_and_the_smaller_file_wins():
    pruned = variant("pruned", 0.2, [0.0, 0.5], (2.40, 2.2, 2.6), 400)
    both = variant("pruned_int8_static", 0.3, [0.0, 0.6], (2.25, 1.9, 2.5), 100)  # within 10%
    assert choose([FP32, pruned, both], auto=True, wanted=None, max_drop=1.0).name == "pruned_int8_static"
    # intervals that overlap do not tie: the medians decide (steadier from export to export)
    overlapping = variant("pruned_int8_static", 0.3, [0.0, 0.6], (1.9, 1.5, 2.3), 100)
    assert choose([FP32, pruned, overlapping], auto=True, wanted=None, max_drop=1.0).name == "pruned"
    clearly = variant("pruned_int8_static", 0.3, [0.0, 0.6], (1.9, 1.8, 2.0), 100)  # 21% slower than pruned
    choice = choose([FP32, pruned, clearly], auto=True, wanted=None, max_drop=1.0)
    assert choice.name == "pruned" and "the fastest" not in choice.reason  # no claim without its interval
    assert choice.reason.startswith(
        "the highest median speed-up, by over 10%, of 2 candidates within the budget shown faster than the "
        "fp32 graph: speed-up over the fp32 graph 2.40x [2.20, 2.60] (95% interval, batch 256, 30 paired rounds)"
    )
    alone = choose([FP32, pruned], auto=True, wanted=None, max_drop=1.0)
    assert alone.reason.startswith("the one candidate within the budget shown faster than the fp32 graph: ")
    assert "is faster (1.90x [1.80, 2.00]" in choice.verdicts["pruned_int8_static"]


def busy_rounds(rng: np.random.Generator, fp32_us: float, candidate_us: float, rounds: int = 30):
    """Paired timings on a machine whose load changes from round to round (both calls of a round
    share it) and jitters each call by 10%, one call in ten descheduled (1.5 to 3 times as long)."""
    load = rng.uniform(1.0, 3.0, rounds)

    def jitter() -> np.ndarray:
        interrupted = np.where(rng.random(rounds) < 0.1, rng.uniform(1.5, 3.0, rounds), 1.0)
        return rng.lognormal(0, 0.1, rounds) * interrupted

    return list(fp32_us * load * jitter()), list(candidate_us * load * jitter())


def test_the_same_timings_give_the_same_choice_and_a_busy_machine_does_not_flip_it():
    from kiln.export.measure import speedup_interval

    def measured(rng: np.random.Generator, name: str, true_speedup: float, size: int) -> dict:
        reference, candidate = busy_rounds(rng, 1000.0, 1000.0 / true_speedup)
        interval = speedup_interval(reference, candidate).as_dict()
        entry = variant(name, 0.2, [0.0, 0.5], None, size)
        entry["speedup"] = {"1": interval, "256": interval}
        return entry

    choices, separate = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        candidates = [
            FP32,
            measured(rng, "int8_static", 0.8, 100),  # slower: never
            measured(rng, "pruned", 2.4, 300),
            measured(rng, "pruned_int8_static", 1.6, 90),  # faster than fp32, clearly slower than pruned
            measured(rng, "barely", 1.02, 50),  # 2% faster: cannot be shown
        ]
        first = choose(candidates, auto=True, wanted=None, max_drop=1.0)
        assert choose(candidates, auto=True, wanted=None, max_drop=1.0) == first  # same inputs, same choice
        assert first.verdicts["int8_static"].startswith(
            ("int8_static measured slower", "int8_static was not shown")
        )
        choices.append(first.name)
    assert choices == ["pruned"] * 20
    # a candidate exactly as fast as fp32 is shown faster only as often as a 95% interval misses
    # (2.5% one-sided; the sign-test interval is conservative): fp32 ships nearly every time
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        same = [FP32, measured(rng, "as_fast", 1.0, 50)]
        separate.append(choose(same, auto=True, wanted=None, max_drop=1.0).name)
    assert separate.count("fp32") >= 194, separate.count("fp32")


def test_the_budget_holds_a_classifier_s_accuracy_unless_the_user_names_a_metric():
    logged = {"val/loss": 0.07, "val/acc": 0.98, "val/f1": 0.97}
    loss = {"metric": "val/loss", "mode": "min"}
    assert gate_metric(None, loss, "classification", logged) == ("val/acc", "max")
    assert gate_metric(None, loss, "classification", {"val/loss": 0.1, "val/f1": 0.9}) == ("val/f1", "max")
    assert gate_metric(None, loss, "regression", {"val/loss": 0.1, "val/r2": 0.9}) == ("val/loss", "min")
    assert gate_metric(None, {"metric": "val/f1", "mode": "max"}, "classification", logged) == (
        "val/f1",
        "max",
    )
    assert gate_metric("val/loss", loss, "classification", logged) == ("val/loss", "min")
    assert gate_metric("val/f1", loss, "classification", logged) == ("val/f1", "max")
    with pytest.raises(KilnError) as error:
        gate_metric("val/top5", loss, "classification", logged)
    assert str(error.value) == (
        "compress.metric=val/top5: the module's validation_step does not log it; it logs: val/acc, "
        "val/f1, val/loss; name one of them, or compress.metric=null"
    )


def test_a_variant_that_passes_on_validation_and_fails_on_test_ships_and_the_report_shows_both():
    baseline = {
        "name": "torch_fp32",
        "val_metrics": {"val/loss": 0.10, "val/acc": 0.95},
        "test_metrics": {"test/loss": 0.11, "test/acc": 0.95},
        "params": 10,
        "size_bytes": 1000,
        "latency_us": {"1": 10.0, "256": 2000.0},
        "note": "torch",
    }
    int8 = variant("int8_static", 0.5, [-0.5, 1.5], (6.7, 6.1, 7.2), 100, test_drop=12.0)
    int8.update(
        val_metrics={"val/loss": 0.1005, "val/acc": 0.95},
        test_metrics={"test/loss": 0.1232, "test/acc": 0.93},
    )
    choice = choose([FP32, int8], auto=True, wanted=None, max_drop=1.0, unit="percent", decision="point")
    assert choice.name == "int8_static"  # 12% worse on test: the test split never decides
    report = {
        "run": "/runs/x",
        "recipe": "auto",
        "monitor": {"metric": "val/loss", "mode": "min"},
        "max_metric_drop": 1.0,
        "metric_unit": "percent",
        "decision": "point",
        "shipped": choice.name,
        "model": "model.onnx",
        "reason": choice.reason,
        "verdicts": choice.verdicts,
        "latency_repeats": 30,
        "baseline": baseline,
        "variants": [FP32, int8],
    }
    text = markdown(report)
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert [c for c in (cell.strip() for cell in header.split("|")) if c.startswith(("val/", "test/"))] == [
        "val/loss",
        "val/acc",
        "test/loss",
        "test/acc",
    ]
    row = next(line for line in text.splitlines() if line.startswith("| int8_static (shipped)"))
    assert "0.1005" in row and "0.1232" in row and "0.9300" in row and "[-0.50, 1.50]" in row
    assert "at most 1% of validation `val/loss`" in text and "never chooses a variant" in text
    # the speed-up with its interval and rounds, and one sentence per variant on why
    assert "| 6.70x [6.10, 7.20] (30 rounds) |" in row and "| 150 [" not in row
    assert (
        "speed-up over the fp32 graph 6.70x [6.10, 7.20] (95% interval, batch 256, 30 paired rounds)" in text
    )
    assert "- fp32 is within the budget, and a candidate was shown faster." in text
    assert "- int8_static shipped." in text
    # no "fastest": the reason says what the interval shows, and gives it
    assert "fastest" not in text
    assert (
        "the one candidate within the budget shown faster than the fp32 graph: speed-up over the fp32 graph 6.70x"
        in text
    )


class Scored(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch, batch_index):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)


def test_the_recorder_keeps_each_validation_row_as_the_module_scored_it():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(70, 3, generator=generator)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)

    class Data(L.LightningDataModule):
        def val_dataloader(self):
            return loader

    module = Scored()
    rows = RowRecorder(module.net)
    metrics = evaluate(module, Data(), "val", rows)
    paired = rows.rows()
    assert paired is not None
    outputs, targets = paired
    assert outputs.shape == (70, 2) and np.array_equal(targets, y.numpy())
    assert metrics["val/acc"] == pytest.approx(
        recomputed("acc", "classification", outputs, targets), abs=1e-6
    )
    assert "validation_step" not in module.__dict__  # the patch is gone
