"""`kiln predict`: onnxruntime only (run where `import torch` fails), its answers, and bad input.

Each bad input gives one clear line, exit code 2, and no output file.
"""

from __future__ import annotations

import csv
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).parent / "export"))
from kiln.drift import from_metadata
from kiln.export.feeds import specs_of, table_feeds
from kilntest import QUICK, TINY_PENGUINS, copy_run, kiln_cli, ok, trained_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def penguins_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(
        trained_run(tmp_path_factory, "penguins", TINY_PENGUINS), tmp_path_factory.mktemp("predict")
    )
    ok(
        kiln_cli(
            "compress",
            f"run={run}",
            "compress=quantize_static",
            "compress.max_metric_drop=100",
            "++compress.metric_unit=points",  # 100 points: any loss passes (a loss budget is percent by default)
            *QUICK,
            cwd=run.parent,
        )
    )
    return run / "model.onnx"


@pytest.fixture(scope="module")
def penguins_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pandas as pd
    from palmerpenguins import load_penguins

    rows = pd.concat([load_penguins()] * 3, ignore_index=True).head(1000)
    path = tmp_path_factory.mktemp("rows") / "penguins.csv"
    rows.to_csv(path, index=False)  # includes the target column (ignored) and missing values
    return path


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment in which `import torch` raises ImportError."""
    blocker = tmp_path_factory.mktemp("no-torch")
    (blocker / "torch").mkdir()
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked for kiln predict')\n")
    return {"PYTHONPATH": str(blocker)}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as stream:
        return list(csv.DictReader(stream))


def test_predict_runs_without_torch_and_matches_onnxruntime(
    penguins_model, penguins_rows, no_torch, tmp_path
):
    blocked = __import__("subprocess").run(
        [sys.executable, "-c", "import torch"],
        env={**__import__("os").environ, **no_torch},
        capture_output=True,
    )
    assert blocked.returncode != 0  # the blocker works
    output = tmp_path / "predictions.csv"
    started = time.perf_counter()
    result = ok(
        kiln_cli(
            "predict",
            f"model={penguins_model}",
            f"input={penguins_rows}",
            f"output={output}",
            cwd=tmp_path,
            env=no_torch,
        )
    )
    seconds = time.perf_counter() - started
    assert "1000 rows" in result.stdout
    assert seconds < 5, (
        f"kiln predict took {seconds:.1f} s for 1,000 rows"
    )  # ~0.5 s on an idle 2-core machine
    predicted = read_csv(output)
    import pandas as pd

    rows = pd.read_csv(penguins_rows)
    session = ort.InferenceSession(str(penguins_model), providers=["CPUExecutionProvider"])
    specs = specs_of(session.get_inputs())
    labels, probabilities, _ = session.run(None, table_feeds(rows, specs))
    assert [r["prediction"] for r in predicted] == labels.tolist()
    classes = ["Adelie", "Chinstrap", "Gentoo"]
    got = np.array([[float(r[f"probability_{c}"]) for c in classes] for r in predicted])
    np.testing.assert_allclose(got, probabilities, atol=1e-5)


def test_kiln_help_is_torch_free(no_torch, tmp_path):
    result = ok(kiln_cli("--help", cwd=tmp_path, env=no_torch))
    assert "predict" in result.stdout and "compress" in result.stdout


def one_error_line(result, *fragments: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing_column", ["missing column 'island'", "the model takes"]),
        ("extra_column", ["column 'colour' not taken by the model"]),
        ("wrong_dtype", ["column 'body_mass_g' must hold numbers", "'heavy'"]),
        ("empty_file", ["the file is empty"]),
        ("header_only", ["a header but no rows"]),
        ("corrupted_model", ["not a readable ONNX model"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    penguins_model, penguins_rows, no_torch, tmp_path, case, fragments
):
    import pandas as pd

    rows = pd.read_csv(penguins_rows).head(20)
    model = penguins_model
    source = tmp_path / "rows.csv"
    if case == "missing_column":
        rows = rows.drop(columns=["island"])
    elif case == "extra_column":
        rows["colour"] = "blue"
    elif case == "wrong_dtype":
        rows["body_mass_g"] = rows["body_mass_g"].astype(object)
        rows.loc[3, "body_mass_g"] = "heavy"
    if case == "empty_file":
        source.write_text("")
    elif case == "header_only":
        source.write_text(",".join(rows.columns) + "\n")
    else:
        rows.to_csv(source, index=False)
    if case == "corrupted_model":
        model = tmp_path / "model.onnx"
        data = penguins_model.read_bytes()
        model.write_bytes(data[: len(data) // 2])
    output = tmp_path / "out.csv"
    result = kiln_cli(
        "predict", f"model={model}", f"input={source}", f"output={output}", cwd=tmp_path, env=no_torch
    )
    one_error_line(result, *fragments)
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_an_array_model_predicts_from_npy_and_csv(tmp_path_factory, no_torch, tmp_path):
    from kilntest import TINY_DIGITS_CNN

    run = copy_run(trained_run(tmp_path_factory, "digits_cnn", TINY_DIGITS_CNN), tmp_path)
    ok(kiln_cli("export", f"run={run}", *QUICK, cwd=tmp_path))
    images = np.random.default_rng(0).random((50, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    with (tmp_path / "images.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(names)
        writer.writerows(images.reshape(50, -1).tolist())
    for name in ("images.npy", "images.csv"):
        output = tmp_path / f"{name}.out.csv"
        ok(
            kiln_cli(
                "predict",
                f"model={run / 'model.onnx'}",
                f"input={tmp_path / name}",
                f"output={output}",
                cwd=tmp_path,
                env=no_torch,
            )
        )
        assert len(read_csv(output)) == 50
    assert read_csv(tmp_path / "images.npy.out.csv") == read_csv(tmp_path / "images.csv.out.csv")
    shutil.rmtree(run)


def test_drift_is_checked_against_the_training_baseline_in_the_model(penguins_model, penguins_rows, tmp_path):
    import json

    import onnx
    import pandas as pd

    run = penguins_model.parent
    assert json.loads((run / "run.json").read_text())["drift_baseline"] == "drift_baseline.json"
    saved = json.loads((run / "drift_baseline.json").read_text())
    embedded = {p.key: p.value for p in onnx.load(str(penguins_model)).metadata_props}
    packed = from_metadata(embedded["kiln.drift_baseline"])  # packed: shares to 1e-5, edges to 7 digits
    assert packed["rows"] == saved["rows"] and packed["features"].keys() == saved["features"].keys()
    for name, summary in saved["features"].items():
        assert packed["features"][name]["kind"] == summary["kind"]
        shares = summary["fractions"]
        shares = shares.values() if isinstance(shares, dict) else shares
        packed_shares = packed["features"][name]["fractions"]
        packed_shares = packed_shares.values() if isinstance(packed_shares, dict) else packed_shares
        assert list(packed_shares) == pytest.approx(list(shares), abs=1e-5)
        assert packed["features"][name].get("edges", []) == pytest.approx(summary.get("edges", []), rel=1e-6)
    assert len(embedded["kiln.drift_baseline"]) < len(json.dumps(saved))
    assert set(saved["features"]) == {
        "bill_length_mm",
        "bill_depth_mm",
        "flipper_length_mm",
        "body_mass_g",
        "year",
        "island",
        "sex",
    }

    # The penguins themselves (training rows among them): nothing drifts.
    output = tmp_path / "same.csv"
    result = ok(
        kiln_cli(
            "predict", f"model={penguins_model}", f"input={penguins_rows}", f"output={output}", cwd=tmp_path
        )
    )
    same = json.loads((tmp_path / "same.drift.json").read_text())
    assert same["drifted"] == [] and max(same["psi"].values()) < 0.1, same
    assert "warning: drift" not in result.stderr and "0 of 7 features past PSI 0.2" in result.stderr

    # Longer bills and every bird on Torgersen: those two features are named, the others are not.
    shifted = pd.read_csv(penguins_rows)
    shifted["bill_length_mm"] += 15
    shifted["island"] = "Torgersen"
    shifted_path = tmp_path / "shifted_rows.csv"
    shifted.to_csv(shifted_path, index=False)
    output = tmp_path / "shifted.csv"
    result = ok(
        kiln_cli(
            "predict", f"model={penguins_model}", f"input={shifted_path}", f"output={output}", cwd=tmp_path
        )
    )
    report = json.loads((tmp_path / "shifted.drift.json").read_text())
    assert set(report["drifted"]) == {"bill_length_mm", "island"}, report
    assert report["psi"]["bill_depth_mm"] == pytest.approx(same["psi"]["bill_depth_mm"])
    warnings = [line for line in result.stderr.splitlines() if "warning: drift in" in line]
    assert len(warnings) == 2 and any("bill_length_mm" in w for w in warnings)
    assert output.is_file()  # drift warns; the predictions are still written

    # The check can be turned off, and a bad threshold is one line.
    ok(
        kiln_cli(
            "predict",
            f"model={penguins_model}",
            f"input={shifted_path}",
            f"output={tmp_path / 'off.csv'}",
            "drift_threshold=null",
            cwd=tmp_path,
        )
    )
    assert not (tmp_path / "off.drift.json").exists()
    bad = kiln_cli(
        "predict",
        f"model={penguins_model}",
        f"input={shifted_path}",
        f"output={tmp_path / 'bad.csv'}",
        "drift_threshold=-1",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "drift_threshold=-1: must be a positive PSI" in bad.stderr
    assert not (tmp_path / "bad.csv").exists()


def test_a_damaged_drift_baseline_skips_the_check_and_keeps_the_predictions(
    penguins_model, penguins_rows, tmp_path
):
    import onnx

    model = onnx.load(str(penguins_model))
    for entry in model.metadata_props:
        if entry.key == "kiln.drift_baseline":
            entry.value = "zlib+base64:" + entry.value[len("zlib+base64:") :][::-1]  # hand-edited
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    output = tmp_path / "out.csv"
    result = ok(
        kiln_cli("predict", f"model={damaged}", f"input={penguins_rows}", f"output={output}", cwd=tmp_path)
    )
    assert "no drift check: the kiln.drift_baseline metadata is damaged" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(read_csv(output)) == 1000 and not (tmp_path / "out.drift.json").exists()


def test_rows_missing_a_feature_name_it_and_write_nothing(penguins_model, penguins_rows, tmp_path):
    import pandas as pd

    rows = pd.read_csv(penguins_rows).drop(columns=["island"])
    path = tmp_path / "no_island.csv"
    rows.to_csv(path, index=False)
    result = kiln_cli(
        "predict", f"model={penguins_model}", f"input={path}", f"output={tmp_path / 'out.csv'}", cwd=tmp_path
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("kiln predict: error:") and "island" in line
    assert not list(tmp_path.glob("out*"))
