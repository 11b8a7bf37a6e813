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
