"""Measuring a variant: metrics (the same definitions training logs), latency, size, parameters.

Latency is warm: a few untimed runs first, then the median of `repeats` timed runs, in
microseconds per call at each batch size. onnxruntime and torch use their default thread pools
unless `threads` is given (one value for both, for a fair comparison).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kiln.export.feeds import tile_rows

WARMUP = 3


def scores(
    task: str, class_names: Sequence[str], outputs: np.ndarray, targets: np.ndarray, split: str
) -> dict[str, float]:
    """`split/loss`, `split/acc`, ... from logits (classification) or predicted values (regression)."""
    from kiln.models.metrics import metric_collection

    out = torch.as_tensor(np.asarray(outputs, dtype=np.float32))
    if task == "classification":
        target = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        loss = torch.nn.functional.cross_entropy(out, target)
        collection = metric_collection(task, len(class_names), f"{split}/")
        collection.update(out.softmax(dim=-1), target)
    else:
        target = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
        loss = torch.nn.functional.mse_loss(out, target)
        collection = metric_collection(task, 0, f"{split}/")
        collection.update(out, target)
    metrics = {name: float(value) for name, value in collection.compute().items()}
    metrics[f"{split}/loss"] = float(loss)
    return dict(sorted(metrics.items()))


def timed(call: Callable[[], Any], repeats: int) -> float:
    """Median microseconds of `repeats` warm calls."""
    for _ in range(WARMUP):
        call()
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples) * 1e6)


def ort_latency(
    session: Any, feeds: dict[str, np.ndarray], batches: Sequence[int], repeats: int
) -> dict[str, float]:
    latency = {}
    for batch in batches:
        batch_feeds = tile_rows(feeds, batch)
        latency[str(batch)] = round(timed(functools.partial(session.run, None, batch_feeds), repeats), 1)
    return latency


def torch_latency(
    net: torch.nn.Module, features: torch.Tensor, batches: Sequence[int], repeats: int
) -> dict[str, float]:
    net.eval()
    latency = {}
    with torch.inference_mode():
        for batch in batches:
            reps = -(-batch // len(features))
            x = features.repeat(reps, *([1] * (features.dim() - 1)))[:batch].contiguous()
            latency[str(batch)] = round(timed(functools.partial(net, x), repeats), 1)
    return latency


def torch_outputs(
    net: torch.nn.Module, features: torch.Tensor, task: str, batch_size: int = 1024
) -> np.ndarray:
    net.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            out = net(features[start : start + batch_size])
            parts.append((out.squeeze(-1) if task == "regression" else out).float().numpy())
    return np.concatenate(parts, axis=0) if parts else np.zeros((0,), dtype=np.float32)


class Threads:
    """Run with torch limited to `threads` (None: leave as is), and restore after."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.previous = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads:
            torch.set_num_threads(int(self.threads))

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)
