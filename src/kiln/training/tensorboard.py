"""What kiln adds to TensorBoard once a run is tested: real final metrics in the hparams table
(no placeholder `hp_metric`) and a confusion matrix image for classification."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys with values TensorBoard's hparams table can show."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_params(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:  # lists and nulls: shown as text
            flat[name] = str(value)
    return flat


def log_hparams(writer: Any, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """One hparams session whose metric columns are the run's real final metrics.

    The metrics must also exist as scalar tags of the run (they do: the test stage logged them).
    """
    from torch.utils.tensorboard.summary import hparams

    experiment, session_start, session_end = hparams(dict(params), dict(metrics))
    file_writer = writer._get_file_writer()  # reopens the writer Lightning closed after fit
    for summary in (experiment, session_start, session_end):
        file_writer.add_summary(summary)
    writer.flush()


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(
            column, row, str(count), ha="center", va="center", color="white" if count > threshold else "black"
        )
    axes.set_title("test split: confusion matrix")
    figure.tight_layout()
    return figure


def log_confusion_matrix(
    writer: Any, targets: np.ndarray, predictions: np.ndarray, class_names: Sequence[str], step: int
) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(targets, predictions, labels=list(range(len(class_names))))
    writer.add_figure("test/confusion_matrix", confusion_matrix_figure(matrix, class_names), global_step=step)
    writer.flush()
    return matrix
