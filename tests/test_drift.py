"""kiln.drift: per-feature training baselines and the PSI of new data against them."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.drift import OTHER, drift_of, feature_baseline, feature_psi


@pytest.fixture
def training() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    numbers = rng.normal(size=5000)
    numbers[:250] = np.nan  # 5% missing
    colors = rng.choice(
        np.array(["red", "green", "blue", ""], dtype=object), p=[0.5, 0.3, 0.15, 0.05], size=5000
    )
    return {"size": numbers, "color": colors}


def test_baseline_summarizes_deciles_categories_and_missing(training):
    baseline = feature_baseline(training)
    assert baseline["rows"] == 5000
    size = baseline["features"]["size"]
    assert size["kind"] == "numeric" and len(size["edges"]) == 9 and len(size["fractions"]) == 10
    assert size["missing"] == pytest.approx(0.05)
    assert np.allclose(size["fractions"], 0.1, atol=0.002)  # deciles: a tenth of the rows in each bin
    color = baseline["features"]["color"]
    assert color["kind"] == "categorical"
    assert color["missing"] == pytest.approx(0.05, abs=0.01)
    assert color["fractions"]["red"] == pytest.approx(0.5 / 0.95, abs=0.02)
    assert color["fractions"][OTHER] == pytest.approx(0.0)


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift(training):
    baseline = feature_baseline(training)["features"]
    rng = np.random.default_rng(1)
    same = rng.normal(size=5000)
    same[:250] = np.nan
    assert feature_psi(baseline["size"], same) < 0.02
    assert feature_psi(baseline["size"], same + 1.0) > 0.25  # one standard deviation: a large shift
    assert 0.1 < feature_psi(baseline["size"], same + 0.4) < 0.25  # a moderate one
    # all missing: the missing bin carries the whole shift
    assert feature_psi(baseline["size"], np.full(1000, np.nan)) > 1.0


def test_categorical_psi_counts_unseen_categories_as_other(training):
    baseline = feature_baseline(training)["features"]["color"]
    assert feature_psi(baseline, training["color"]) == pytest.approx(0.0, abs=1e-9)
    purple = np.array(["purple"] * 1000, dtype=object)
    assert feature_psi(baseline, purple) > 2.0
    mostly_red = np.array(["red"] * 950 + [""] * 50, dtype=object)
    assert feature_psi(baseline, mostly_red) > 0.25


def test_a_baseline_survives_packing_into_model_metadata_and_plain_json_still_reads():
    import json

    from kiln.drift import PACKED, from_metadata, to_metadata

    rng = np.random.default_rng(0)
    columns: dict[str, np.ndarray] = {f"x{i}": rng.normal(size=2000) for i in range(20)}
    columns |= {
        "pixel": rng.integers(0, 17, size=2000).astype(float) / 16,
        "colour": np.asarray(rng.choice(["red", "green", "blue", ""], size=2000), dtype=object),
    }
    baseline = feature_baseline(columns)
    packed = to_metadata(baseline)
    assert packed.startswith(PACKED) and len(packed) < len(json.dumps(baseline)) / 3
    restored = from_metadata(packed)
    assert from_metadata(json.dumps(baseline)) == baseline  # models exported before packing
    new_rows = {name: values[:500] for name, values in columns.items()}
    exact, rounded = drift_of(baseline, new_rows), drift_of(restored, new_rows)
    assert rounded == pytest.approx(exact, abs=1e-4)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("zlib+base64:not base64 at all!", "is damaged"),
        ("zlib+base64:aGVsbG8=", "is damaged"),  # valid base64, not zlib data
        ("{not json", "is damaged"),
        ('{"rows": 3}', "is not a drift baseline"),
    ],
)
def test_a_damaged_baseline_in_model_metadata_is_one_value_error(entry: str, says: str):
    from kiln.drift import from_metadata

    with pytest.raises(ValueError, match=f"kiln.drift_baseline metadata {says}"):
        from_metadata(entry)


@pytest.mark.slow
def test_a_baseline_that_inflates_to_hundreds_of_megabytes_is_refused_without_expanding_it():
    import base64
    import resource
    import zlib

    from kiln.drift import PACKED, from_metadata

    bomb = PACKED + base64.b64encode(zlib.compress(b" " * (400 * 2**20), 9)).decode()
    assert len(bomb) < 2**20  # a few hundred KB in a model file
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="inflates past 32 MB"):
        from_metadata(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: not 400 MB


def test_an_embedding_baseline_projects_new_rows_and_sees_a_shift_of_content():
    from kiln.drift import embedding_baseline, embedding_columns, from_metadata, to_metadata

    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(64, 3)))[0].T  # three orthonormal directions

    def embeddings(rows: int, shift: float = 0.0) -> np.ndarray:
        return rng.normal(size=(rows, 3)) * [5, 3, 1] @ directions + rng.normal(shift, 0.1, size=(rows, 64))

    training = embeddings(800)
    projection = embedding_baseline(training, "pooled")
    columns = embedding_columns(training, projection)
    assert set(columns) == {
        "embedding_pc1",
        "embedding_pc2",
        "embedding_pc3",
        "embedding_pc4",
        "embedding_distance",
    }
    assert np.std(columns["embedding_pc1"]) == pytest.approx(5, rel=0.1)  # the widest direction first
    assert np.median(columns["embedding_distance"]) == pytest.approx(1.0)
    baseline = feature_baseline(columns) | {"embedding": projection}
    restored = from_metadata(to_metadata(baseline))  # packed with the model, as kiln export does
    same = embedding_columns(embeddings(400), restored["embedding"])
    moved = embedding_columns(embeddings(400, shift=1.0), restored["embedding"])
    assert max(drift_of(restored, same).values()) < 0.2
    assert drift_of(restored, moved)["embedding_distance"] > 1.0
    with pytest.raises(ValueError, match="embedding has 32 values, its baseline 64"):
        embedding_columns(np.zeros((2, 32)), projection)
