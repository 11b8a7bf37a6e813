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
from kiln.compression.choose import choose, metric_drop, metric_unit
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


def variant(name: str, drop: float, interval: list[float] | None, latency: float, size: int, **extra):
    return {
        "name": name,
        "passed": True,
        "reason": "",
        "precision": "int8",
        "val_drop": drop,
        "drop_ci95": interval,
        "latency_us": {"1": 10.0, "256": latency},
        "latency_spread_us": {"256": [latency * 0.97, latency, latency * 1.03]},
        "size_bytes": size,
        "params": 10,
        "steps": [],
        "val_metrics": {"val/acc": 0.97 - drop / 100},
        "test_metrics": {"test/acc": 0.96},
        "check": "int8",
        "notes": [],
        **extra,
    }


def test_upper_bound_refuses_a_variant_that_point_ships():
    # measured 0.5 points, but on few rows: the interval reaches 2.6 points
    candidates = [
        variant("fp32", 0.0, [0.0, 0.0], 1000.0, 400),
        variant("int8_static", 0.5, [-1.4, 2.6], 300.0, 100),
    ]
    point = choose(candidates, auto=True, wanted=None, max_drop=1.0, unit="points", decision="point")
    sure = choose(candidates, auto=True, wanted=None, max_drop=1.0, unit="points", decision="upper_bound")
    assert point.name == "int8_static"
    assert sure.name == "fp32"
    fixed = choose(
        candidates[1:], auto=False, wanted="int8_static", max_drop=1.0, unit="points", decision="upper_bound"
    )
    assert fixed.name is None and "95% interval of its drop reaches 2.60 points" in fixed.reason
    unknown = choose(
        [variant("int8_static", 0.5, None, 300.0, 100, drop_ci95_reason="kiln cannot recompute val/x")],
        auto=False,
        wanted="int8_static",
        max_drop=1.0,
        decision="upper_bound",
    )
    assert unknown.name is None and "kiln cannot recompute val/x" in unknown.reason


def test_latencies_the_repeats_cannot_tell_apart_tie_and_the_smaller_file_wins():
    fast = variant("pruned", 0.2, [0.0, 0.5], 1000.0, 400)  # runs 970 to 1030 us: quiet
    close = variant("int8_static", 0.2, [0.0, 0.5], 1040.0, 100)  # within 5%
    assert choose([fast, close], auto=True, wanted=None, max_drop=1.0).name == "int8_static"
    slower = variant("int8_static", 0.2, [0.0, 0.5], 1100.0, 100)  # 10% slower, 3% noise: slower
    assert choose([fast, slower], auto=True, wanted=None, max_drop=1.0).name == "pruned"
    # a busy machine: pruned's median sits 300 us above its quickest run, so 10% cannot be told
    busy = variant("pruned", 0.2, [0.0, 0.5], 1000.0, 400)
    busy["latency_spread_us"]["256"] = [700.0, 1000.0, 9000.0]
    assert choose([busy, slower], auto=True, wanted=None, max_drop=1.0).name == "int8_static"
    # but a variant 4x slower is slower however noisy (its own quick runs do not matter)
    much_slower = variant("int8_static", 0.2, [0.0, 0.5], 4000.0, 100)
    much_slower["latency_spread_us"]["256"] = [690.0, 4000.0, 9000.0]
    assert choose([busy, much_slower], auto=True, wanted=None, max_drop=1.0).name == "pruned"


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
    int8 = variant("int8_static", 0.5, [-0.5, 1.5], 300.0, 100, test_drop=12.0)
    int8.update(
        val_metrics={"val/loss": 0.1005, "val/acc": 0.95},
        test_metrics={"test/loss": 0.1232, "test/acc": 0.93},
    )
    choice = choose([int8], auto=True, wanted=None, max_drop=1.0, unit="percent")
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
        "latency_repeats": 30,
        "baseline": baseline,
        "variants": [int8],
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
    assert "at most 1% of `val/loss`" in text and "never chooses a variant" in text


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
