"""Drift: does new data still look like the training data? Per-feature baselines and PSI.

At training, `feature_baseline` summarizes each input feature over the training split (for
images: per-image colour, contrast and sharpness statistics, `image_statistics`): a numeric
feature by its deciles (the bin edges) and the share of rows in each bin, a categorical one by the
share of each category (the 30 most frequent; the rest pooled), both with the share missing. The
baseline is saved with the run (drift_baseline.json) and embedded in every exported ONNX file
(`kiln.drift_baseline`, packed: see `to_metadata`), so `kiln predict` can compare what it is
given with no run directory.

Images also get an embedding-level summary (`embedding_baseline`), made at export from the shipped
model itself: the output of its penultimate layer (what its head classifies) for the training
images, projected on its first principal components, plus each image's distance from the training
mean. Those are features like any other, so they get PSI too; new kinds of content move them even
when colour and sharpness stay put.

The comparison is the population stability index, PSI = sum((new - base) * ln(new / base)) over
the bins (missing values are a bin of their own). Usual reading: under 0.1 stable, 0.1 to 0.25 a
moderate shift, above 0.25 a large one. It needs a few hundred rows to mean much: with fewer,
kiln says so, and under MIN_ROWS it makes no check at all (one line instead of a warning per
feature).

numpy only: `kiln predict` imports this and stays free of torch and pandas.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

BASELINE_FILE = "drift_baseline.json"
METADATA_KEY = "kiln.drift_baseline"
DECILES = np.linspace(0.1, 0.9, 9)
MAX_CATEGORIES = 30
OTHER = "(other)"
EPSILON = 1e-4  # an empty bin counts as this share, so that ln() stays finite
FEW_ROWS = 200  # below this PSI is noisy, and kiln predict says so
# Below MIN_ROWS kiln predict makes no drift check. PSI of a sample against its own distribution
# (measured, one normal feature): 0.23 at 50 rows, 0.10 at 100, 0.05 at 200: sampling noise alone.
MIN_ROWS = 50
PACKED = "zlib+base64:"  # the prefix of a packed baseline in ONNX metadata
MAX_UNPACKED = 32 * 2**20  # a packed baseline that inflates past this is refused (a zip bomb in metadata)
EMBEDDING_COMPONENTS = 4


def feature_baseline(columns: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Summaries of the training rows: float columns (NaN missing) are numeric, others categorical
    ("" missing), exactly as kiln.export.feeds prepares the columns `kiln predict` is given."""
    features = {}
    for name, values in columns.items():
        values = np.asarray(values).reshape(len(values))
        features[name] = _numeric(values) if values.dtype.kind in "fiub" else _categorical(values)
    rows = len(next(iter(columns.values()))) if columns else 0
    return {"rows": rows, "features": features}


def image_statistics(images: list[np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """What drift means for images, per image: each channel's mean and spread (colour, brightness,
    contrast) and the mean gradient magnitude (sharpness: blur and noise move it), from uint8
    (height, width, channels) arrays. Per-pixel features would say nothing: pixels move with the
    subject, and their PSI is noise."""
    names = {1: ["gray"], 3: ["red", "green", "blue"]}
    columns: dict[str, list[float]] = {}
    for image in images:
        pixels = np.asarray(image, dtype=np.float32)
        channels = names.get(pixels.shape[-1], [f"channel{i}" for i in range(pixels.shape[-1])])
        for index, name in enumerate(channels):
            plane = pixels[:, :, index]
            columns.setdefault(f"{name}_mean", []).append(float(plane.mean()))
            columns.setdefault(f"{name}_std", []).append(float(plane.std()))
        gray = pixels.mean(axis=-1)
        sharpness = np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()
        columns.setdefault("sharpness", []).append(float(sharpness))
    return {name: np.asarray(values) for name, values in columns.items()}


def embedding_baseline(embeddings: np.ndarray, tensor: str) -> dict[str, Any]:
    """How to turn the model's `tensor` into drift features: the training embeddings' mean, their
    first EMBEDDING_COMPONENTS principal directions, and the median distance from the mean (the
    unit of `embedding_distance`)."""
    flat = embeddings.reshape(len(embeddings), -1).astype(np.float64)
    mean = flat.mean(axis=0)
    centered = flat - mean
    _, _, directions = np.linalg.svd(centered, full_matrices=False)
    scale = float(np.median(np.linalg.norm(centered, axis=1)))
    return {
        "tensor": tensor,
        "mean": mean.tolist(),
        "components": directions[:EMBEDDING_COMPONENTS].tolist(),
        "scale": scale if scale > 0 else 1.0,
    }


def embedding_columns(embeddings: np.ndarray, projection: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`embedding_pc1..k` (the position along each principal direction) and `embedding_distance`
    (from the training mean, in median training distances) for each row of `embeddings`."""
    flat = embeddings.reshape(len(embeddings), -1).astype(np.float64)
    mean = np.asarray(projection["mean"], dtype=np.float64)
    if flat.shape[1] != len(mean):
        raise ValueError(f"the model's embedding has {flat.shape[1]} values, its baseline {len(mean)}")
    centered = flat - mean
    columns = {
        f"embedding_pc{index + 1}": centered @ np.asarray(direction)
        for index, direction in enumerate(projection["components"])
    }
    columns["embedding_distance"] = np.linalg.norm(centered, axis=1) / float(projection["scale"])
    return columns


def _numeric(values: np.ndarray) -> dict[str, Any]:
    values = values.astype(np.float64)
    present = values[~np.isnan(values)]
    edges = np.unique(np.quantile(present, DECILES)).tolist() if len(present) else []
    return {
        "kind": "numeric",
        "edges": edges,
        "fractions": _bin_fractions(present, edges).tolist(),
        "missing": float(1 - len(present) / len(values)) if len(values) else 0.0,
    }


def _bin_fractions(present: np.ndarray, edges: list[float]) -> np.ndarray:
    counts = np.bincount(np.searchsorted(np.asarray(edges), present, side="right"), minlength=len(edges) + 1)
    return counts / max(len(present), 1)


def _categorical(values: np.ndarray) -> dict[str, Any]:
    text = np.asarray([str(v) for v in values], dtype=object)
    present = text[text != ""]
    names, counts = np.unique(present.astype(str), return_counts=True)
    order = np.argsort(-counts, kind="stable")[:MAX_CATEGORIES]
    fractions = {str(names[i]): float(counts[i] / len(present)) for i in order}
    fractions[OTHER] = max(0.0, 1.0 - sum(fractions.values()))
    return {"kind": "categorical", "fractions": fractions, "missing": float(1 - len(present) / len(text))}


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    expected = np.clip(expected, EPSILON, None)
    actual = np.clip(actual, EPSILON, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def feature_psi(summary: Mapping[str, Any], values: np.ndarray) -> float:
    """PSI of one feature's new values against its training summary."""
    values = np.asarray(values).reshape(len(values))
    missing = float(summary["missing"])
    if summary["kind"] == "numeric":
        numbers = values.astype(np.float64)
        present = numbers[~np.isnan(numbers)]
        new_missing = 1 - len(present) / len(numbers)
        base = np.asarray(summary["fractions"]) * (1 - missing)
        new = _bin_fractions(present, summary["edges"]) * (1 - new_missing)
    else:
        text = [str(v) for v in values]
        given = [v for v in text if v != ""]
        new_missing = 1 - len(given) / len(text)
        known = [name for name in summary["fractions"] if name != OTHER]
        counts = {name: 0 for name in [*known, OTHER]}
        for value in given:
            counts[value if value in counts and value != OTHER else OTHER] += 1
        base = np.asarray([summary["fractions"][name] for name in counts]) * (1 - missing)
        new = np.asarray([counts[name] for name in counts]) / max(len(given), 1) * (1 - new_missing)
    return psi(np.append(base, missing), np.append(new, new_missing))


def drift_of(baseline: Mapping[str, Any], columns: Mapping[str, np.ndarray]) -> dict[str, float]:
    """PSI of every feature the baseline knows; a feature missing from `columns` is a KeyError the
    caller names (kiln predict checks the columns before it gets here)."""
    return {name: feature_psi(summary, columns[name]) for name, summary in baseline["features"].items()}


def to_metadata(baseline: Mapping[str, Any]) -> str:
    """The baseline as compact ONNX metadata: shares rounded to 1e-5 and bin edges to 7 significant
    digits (PSI needs no more), deflated and base64-encoded. The 64 pixels of a digits model take
    2 KB instead of 14.6 KB, which would otherwise be a quarter of a pruned CNN's file."""
    packed: dict[str, Any] = {
        "rows": baseline["rows"],
        "features": {name: _rounded(summary) for name, summary in baseline["features"].items()},
    }
    if "embedding" in baseline:
        projection = baseline["embedding"]
        packed["embedding"] = dict(
            projection,
            mean=[float(f"{v:.6g}") for v in projection["mean"]],
            components=[[float(f"{v:.6g}") for v in row] for row in projection["components"]],
        )
    text = json.dumps(packed, separators=(",", ":"))
    return PACKED + base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def from_metadata(text: str) -> dict[str, Any]:
    """A baseline read back from ONNX metadata, packed or (models exported before packing) plain
    JSON. A damaged entry (a hand-edited file) is a ValueError that says what is wrong."""
    try:
        if text.startswith(PACKED):
            inflate = zlib.decompressobj()
            unpacked = inflate.decompress(base64.b64decode(text[len(PACKED) :], validate=True), MAX_UNPACKED)
            if inflate.unconsumed_tail:
                raise ValueError(f"it inflates past {MAX_UNPACKED // 2**20} MB, far more than any baseline")
            text = unpacked.decode()
        baseline = json.loads(text)
    except (ValueError, zlib.error) as exc:  # binascii.Error and JSONDecodeError are ValueErrors
        raise ValueError(f"the {METADATA_KEY} metadata is damaged ({exc})") from exc
    if not isinstance(baseline, dict) or not isinstance(baseline.get("features"), dict):
        raise ValueError(f"the {METADATA_KEY} metadata is not a drift baseline (no 'features' map)")
    embedding = baseline.get("embedding")
    if embedding is not None and not (
        isinstance(embedding, dict) and {"tensor", "mean", "components", "scale"} <= set(embedding)
    ):
        raise ValueError(f"the {METADATA_KEY} metadata's embedding entry is damaged")
    return baseline


def _rounded(summary: Mapping[str, Any]) -> dict[str, Any]:
    rounded = dict(summary, missing=round(summary["missing"], 5))
    if summary["kind"] == "numeric":
        rounded["edges"] = [float(f"{edge:.7g}") for edge in summary["edges"]]
        rounded["fractions"] = [round(share, 5) for share in summary["fractions"]]
    else:
        rounded["fractions"] = {name: round(share, 5) for name, share in summary["fractions"].items()}
    return rounded
