"""Permutation importance of raw table columns (kiln.training.importance), without any training run:
small synthetic tables where we know which one column matters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import r2_score

from kiln.data.preprocessing import TablePreprocessor
from kiln.training.importance import monitored_score, permutation_importance


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs.argmax(dim=-1) == targets).float().mean())


def r2(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(r2_score(targets.numpy(), outputs.numpy()))


def fitted_linear(features: torch.Tensor, targets: torch.Tensor, outputs: int, loss: torch.nn.Module):
    """A linear model trained on ALL columns, noise included: it must learn to ignore the noise."""
    torch.manual_seed(0)
    model = torch.nn.Linear(features.shape[1], outputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        out = model(features)
        loss(out.squeeze(-1) if outputs == 1 else out, targets).backward()
        optimizer.step()
    return model


@pytest.fixture
def numeric_signal() -> tuple[pd.DataFrame, torch.Tensor]:
    """A class decided by `signal` alone; three columns of noise, one of them categorical with NaNs."""
    rng = np.random.default_rng(1)
    rows = 600
    frame = pd.DataFrame(
        {
            "noise_a": rng.normal(size=rows),
            "signal": rng.normal(size=rows),
            "noise_b": rng.uniform(-3, 3, size=rows),
            "noise_colour": rng.choice(np.array(["red", "green", "blue", None], dtype=object), size=rows),
        }
    )
    targets = torch.tensor((frame["signal"] > 0).to_numpy(), dtype=torch.int64)
    return frame, targets


@pytest.mark.slow
def test_the_one_column_that_matters_ranks_first_and_noise_is_near_zero(numeric_signal):
    frame, targets = numeric_signal
    preprocessor = TablePreprocessor(["noise_a", "signal", "noise_b"], ["noise_colour"]).fit(
        frame, targets.numpy(), "classification"
    )

    def to_tensor(raw: pd.DataFrame) -> torch.Tensor:
        return torch.as_tensor(preprocessor.transform(raw))

    model = fitted_linear(to_tensor(frame), targets, 2, torch.nn.CrossEntropyLoss())
    importance = permutation_importance(model, to_tensor, frame, targets, accuracy, repeats=5, seed=7)

    assert importance[0]["feature"] == "signal"
    assert {item["feature"] for item in importance} == set(frame.columns)  # one entry per raw column
    by_name = {item["feature"]: item for item in importance}
    assert by_name["signal"]["mean"] > 0.3  # shuffling it leaves a coin toss (accuracy ~1 -> ~0.5)
    for noise in ("noise_a", "noise_b", "noise_colour"):
        assert abs(by_name[noise]["mean"]) < 0.03, by_name[noise]
    assert all(item["std"] >= 0 for item in importance)
    means = [item["mean"] for item in importance]
    assert means == sorted(means, reverse=True)


def test_a_categorical_column_is_shuffled_raw_and_preprocessed_again():
    """Regression on a text column with missing values: the raw labels are shuffled, then imputed
    and one-hot encoded by the fitted preprocessor, as at training time."""
    rng = np.random.default_rng(2)
    rows = 500
    levels = {"low": -2.0, "mid": 0.0, "high": 2.0}
    colour = rng.choice(np.array(list(levels), dtype=object), size=rows)
    frame = pd.DataFrame({"size": colour, "noise": rng.normal(size=rows)})
    targets = torch.as_tensor([levels[value] for value in colour], dtype=torch.float32)
    frame.loc[rng.choice(rows, 20, replace=False), "size"] = None  # imputed: most frequent level
    preprocessor = TablePreprocessor(["noise"], ["size"]).fit(frame, targets.numpy(), "regression")

    def to_tensor(raw: pd.DataFrame) -> torch.Tensor:
        return torch.as_tensor(preprocessor.transform(raw))

    model = fitted_linear(to_tensor(frame), targets, 1, torch.nn.MSELoss())

    def predict(features: torch.Tensor) -> torch.Tensor:
        return model(features).squeeze(-1)

    importance = permutation_importance(predict, to_tensor, frame, targets, r2, repeats=4, seed=0)
    assert [item["feature"] for item in importance] == ["size", "noise"]
    assert importance[0]["mean"] > 1.0  # R2 from ~0.9 to below 0 once sizes are shuffled
    assert abs(importance[1]["mean"]) < 0.02


def test_the_same_seed_gives_the_same_numbers_and_the_frame_is_left_alone(numeric_signal):
    frame, targets = numeric_signal
    before = frame.copy()

    def to_tensor(raw: pd.DataFrame) -> torch.Tensor:
        return torch.tensor(raw[["signal"]].to_numpy(np.float32))

    def model(features: torch.Tensor) -> torch.Tensor:
        return torch.cat([-features, features], dim=1)

    first = permutation_importance(model, to_tensor, frame, targets, accuracy, repeats=3, seed=11)
    again = permutation_importance(model, to_tensor, frame, targets, accuracy, repeats=3, seed=11)
    other = permutation_importance(model, to_tensor, frame, targets, accuracy, repeats=3, seed=12)
    assert first == again
    assert first != other
    pd.testing.assert_frame_equal(frame, before)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        permutation_importance(model, to_tensor, frame, targets, accuracy, repeats=0)


def test_the_monitored_metric_is_the_score_and_a_loss_counts_as_a_rise():
    from kiln.models import KilnModule

    net = torch.nn.Linear(3, 1)
    module = KilnModule(net, "regression", input_shape=[3])
    outputs, targets = torch.tensor([1.0, 2.0, 3.5, 4.0]), torch.tensor([1.0, 2.5, 3.0, 4.0])

    measure, score = monitored_score(module, "val/r2", "max")
    assert measure == "drop in val/r2"
    assert score(outputs, targets) == pytest.approx(r2_score(targets.numpy(), outputs.numpy()), abs=1e-6)

    measure, score = monitored_score(module, "val/loss", "min")
    assert measure == "rise in val/loss"
    assert score(outputs, targets) == pytest.approx(-float(torch.mean((outputs - targets) ** 2)))

    measure, _ = monitored_score(module, "val/something_else", "min")  # not computable here
    assert measure == "drop in val/r2"
