"""What `kiln predict` writes: one column per number a model answers, class names that match the
classes, cells a spreadsheet opens as text, files that follow the user's umask; and what it refuses
to read (a device, a file too large) or to judge (drift on too few rows).

The models are tiny ONNX graphs built here with onnx.helper (no torch, no training), carrying the
metadata kiln export writes.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from kiln.drift import MIN_ROWS, feature_baseline, image_statistics, to_metadata
from kiln.errors import KilnError
from kiln.runs import write_atomically
from kiln.stages import predict as predict_stage

WEIGHTS = np.array([[1.0, -2.0, 0.5, 0.0], [0.0, 1.0, -1.5, 2.0], [1.0, 0.0, 0.0, -1.0]], dtype=np.float32)
FORMULAS = ["=cmd|' -C calc'!A0", "@SUM(A1)", "+x", "-x", "\tx", "\rx"]
HARMLESS = ["-1", "plain"]  # a negative number is a number, not a formula


def save(graph: onnx.GraphProto, path: Path, metadata: dict[str, object]) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(
        model,
        {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()},
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def raw_model(path: Path) -> Path:
    """Three numbers in, four out (x @ WEIGHTS) as one `output` of shape (rows, 4): no class names."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weights"], ["output"])],
        "raw",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["rows", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["rows", 4])],
        [numpy_helper.from_array(WEIGHTS, "weights")],
    )
    return save(graph, path, {"kiln.input_kind": "array"})


def classifier_head(scores: str, classes: list[str]) -> list[onnx.NodeProto]:
    """kiln's classifier outputs from (rows, classes) scores: `probabilities` and the class name `label`."""
    names = helper.make_tensor(
        "class_names", TensorProto.STRING, [len(classes)], [c.encode() for c in classes]
    )
    return [
        helper.make_node("Softmax", [scores], ["probabilities"], axis=1),
        helper.make_node("ArgMax", [scores], ["index"], axis=1, keepdims=0),
        helper.make_node("Constant", [], ["class_names"], value=names),
        helper.make_node("Gather", ["class_names", "index"], ["label"], axis=0),
    ]


CLASSIFIER_OUTPUTS = [
    helper.make_tensor_value_info("label", TensorProto.STRING, ["rows"]),
    helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["rows", None]),
]


def array_classifier(path: Path, classes: list[str], metadata: dict[str, object]) -> Path:
    """One score per class in, the class of the largest out (row i of the identity is class i)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["scores"]), *classifier_head("scores", classes)],
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["rows", len(classes)])],
        CLASSIFIER_OUTPUTS,
    )
    return save(graph, path, {"kiln.input_kind": "array", "kiln.class_names": classes, **metadata})


def image_classifier(path: Path, classes: list[str], metadata: dict[str, object]) -> Path:
    """uint8 (rows, height, width, 3) images in; each channel's mean picks red, green or blue."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["pixels"], ["scores"], axes=[1, 2], keepdims=0),
            *classifier_head("scores", classes),
        ],
        "image",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["rows", "height", "width", 3])],
        CLASSIFIER_OUTPUTS,
    )
    image_input = {"size": [8, 8], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    meta = {"kiln.input_kind": "image", "kiln.image_input": image_input, "kiln.class_names": classes}
    return save(graph, path, {**meta, **metadata})


def predict(model: Path, source: Path, output: Path, **more: object) -> dict[str, object]:
    settings = {"model": str(model), "input": str(source), "output": str(output), "batch_size": 2}
    return predict_stage.run({"drift_threshold": None, **settings, **more})


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as stream:
        return list(csv.reader(stream))


def test_an_answer_of_several_numbers_gets_one_column_each_and_negatives_stay_numbers(tmp_path):
    rows = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], dtype=np.float32)
    np.save(tmp_path / "rows.npy", rows)
    output = tmp_path / "out.csv"
    result = predict(raw_model(tmp_path / "raw.onnx"), tmp_path / "rows.npy", output)
    header, *cells = read_rows(output)
    assert header == ["output_0", "output_1", "output_2", "output_3"]
    assert result["rows"] == 2
    assert np.array(cells, dtype=np.float64) == pytest.approx(rows @ WEIGHTS)
    assert cells == [["4", "0", "-2.5", "1"], ["-1", "2.5", "-1.25", "1"]]  # negatives: numbers, no quote


def test_class_names_that_do_not_match_the_classes_are_refused_and_nothing_is_written(tmp_path, capsys):
    model = array_classifier(tmp_path / "damaged.onnx", [f"c{i}" for i in range(10)], {})
    names = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert json.loads(names["kiln.class_names"]) == [f"c{i}" for i in range(10)]
    damaged = onnx.load(str(model))
    helper.set_model_props(damaged, {**names, "kiln.class_names": json.dumps(["a", "b", "c"])})
    onnx.save(damaged, str(model))
    np.save(tmp_path / "rows.npy", np.eye(10, dtype=np.float32)[:3])
    output = tmp_path / "out.csv"
    output.write_text("prediction\nfrom an earlier run\n")

    code = predict_stage.main([f"model={model}", f"input={tmp_path / 'rows.npy'}", f"output={output}"])

    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert line == (
        f"kiln predict: error: model={model}: its kiln.class_names metadata lists 3 class names but the "
        "model answers 10 classes; the file was changed after export: export it again with kiln export"
    )
    assert output.read_text() == "prediction\nfrom an earlier run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.onnx", "out.csv", "rows.npy"]


def test_cells_a_spreadsheet_would_run_as_formulas_are_quoted_and_numbers_are_not(tmp_path):
    classes = [*FORMULAS, *HARMLESS]
    model = array_classifier(tmp_path / "classes.onnx", classes, {})
    np.save(tmp_path / "rows.npy", np.eye(len(classes), dtype=np.float32) * 5)
    output = tmp_path / "out.csv"
    predict(model, tmp_path / "rows.npy", output)
    header, *cells = read_rows(output)
    assert header == ["prediction", *(f"probability_{name}" for name in classes)]
    assert [row[0] for row in cells] == [*("'" + name for name in FORMULAS), *HARMLESS]
    assert float(cells[0][1]) == pytest.approx(np.exp(5) / (np.exp(5) + len(classes) - 1), rel=1e-5)


def test_image_file_names_that_look_like_formulas_are_quoted(tmp_path):
    model = image_classifier(tmp_path / "image.onnx", ["red", "green", "blue"], {})
    folder = tmp_path / "photos"
    (folder / "=cmd").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), (200, 10, 10), dtype=np.uint8)).save(folder / "=cmd" / "-1+1.png")
    Image.fromarray(np.full((8, 8, 3), (10, 10, 200), dtype=np.uint8)).save(folder / "ok.png")
    output = tmp_path / "out.csv"
    predict(model, folder, output)
    assert read_rows(output)[1:] == [
        ["'=cmd/-1+1.png", "red", "1", "0", "0"],
        ["ok.png", "blue", "0", "0", "1"],
    ]


@pytest.fixture
def umask() -> Iterator[None]:
    """Restores the process's umask after a test sets its own."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def drift_model(path: Path) -> Path:
    """An array classifier whose drift baseline is 200 training rows of f0..f2 drawn from N(0, 1)."""
    training = np.random.default_rng(0).normal(size=(200, 3))
    baseline = feature_baseline({f"f{i}": training[:, i] for i in range(3)})
    meta = {"kiln.feature_names": ["f0", "f1", "f2"], "kiln.drift_baseline": to_metadata(baseline)}
    return array_classifier(path, ["a", "b", "c"], meta)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_predictions_and_drift_report_follow_the_umask(tmp_path, umask, mask, expected):
    np.save(tmp_path / "rows.npy", np.random.default_rng(1).normal(size=(MIN_ROWS, 3)).astype(np.float32))
    model = drift_model(tmp_path / "model.onnx")
    os.umask(mask)
    result = predict(model, tmp_path / "rows.npy", tmp_path / "out.csv", drift_threshold=0.2)
    assert result["drift"] is not None
    assert mode(tmp_path / "out.csv") == expected
    assert mode(tmp_path / "out.drift.json") == expected


def test_replacing_a_file_keeps_its_mode_whatever_the_umask(tmp_path, umask):
    np.save(tmp_path / "rows.npy", np.eye(3, dtype=np.float32))
    output = tmp_path / "out.csv"
    output.write_text("prediction\nshared\n")
    output.chmod(0o664)
    os.umask(0o077)
    predict(array_classifier(tmp_path / "model.onnx", ["a", "b", "c"], {}), tmp_path / "rows.npy", output)
    assert [row[0] for row in read_rows(output)] == ["prediction", "a", "b", "c"]
    assert mode(output) == 0o664


def test_the_run_directorys_atomic_writes_follow_the_umask(tmp_path, umask):
    modes = {}
    for mask in (0o022, 0o027):
        os.umask(mask)
        path = tmp_path / f"{mask:o}" / "run.json"
        write_atomically(path, "{}\n")
        assert path.read_text() == "{}\n"
        modes[mask] = mode(path)
    assert modes == {0o022: 0o644, 0o027: 0o640}


@pytest.mark.parametrize("name", ["zeros.npy", "zeros.csv"])
def test_an_input_that_never_ends_is_one_line_and_nothing_is_written(tmp_path, name):
    source = tmp_path / name
    source.symlink_to("/dev/zero")
    output = tmp_path / "out.csv"
    with pytest.raises(KilnError) as raised:
        predict(array_classifier(tmp_path / "model.onnx", ["a", "b", "c"], {}), source, output)
    assert str(raised.value) == (
        f"input={source}: not a regular file (a pipe or device, which may never end); save the rows to a "
        "file and give that"
    )
    assert not output.exists()


def test_an_input_past_the_size_limit_is_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(predict_stage, "MAX_INPUT_BYTES", 2**20)
    source = tmp_path / "rows.npy"
    np.save(source, np.zeros((2**20 // 12 + 100, 3), dtype=np.float32))  # just over 1 MiB
    output = tmp_path / "out.csv"
    with pytest.raises(KilnError) as raised:
        predict(array_classifier(tmp_path / "model.onnx", ["a", "b", "c"], {}), source, output)
    assert str(raised.value) == (
        f"input={source}: 1.0 MiB, more than kiln predict reads at once (1 MiB); split it into smaller "
        "files and predict each"
    )
    assert not output.exists()


def test_the_size_limit_is_the_one_the_readme_states():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"inputs up to {predict_stage.MAX_INPUT_BYTES // 2**20} MiB" in readme


def test_drift_on_one_image_is_one_line_saying_how_many_rows_it_needs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    training = rng.integers(0, 256, size=(100, 8, 8, 3), dtype=np.uint8)
    baseline = feature_baseline(image_statistics(training))
    model = image_classifier(
        tmp_path / "image.onnx", ["red", "green", "blue"], {"kiln.drift_baseline": to_metadata(baseline)}
    )
    Image.fromarray(np.full((8, 8, 3), 250, dtype=np.uint8)).save(tmp_path / "one.png")
    result = predict(model, tmp_path / "one.png", tmp_path / "out.csv", drift_threshold=0.2)
    assert result["drift"] is None and result["rows"] == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"kiln predict: no drift check: it needs at least {MIN_ROWS} rows to mean anything, got 1"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.onnx", "one.png", "out.csv"]


def test_a_table_fed_to_a_model_of_64_pixels_is_one_short_line(tmp_path):
    pixels = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    model = array_classifier(
        tmp_path / "digits.onnx", [str(i) for i in range(64)], {"kiln.feature_names": pixels}
    )
    columns = [
        "species",
        "island",
        "bill_length_mm",
        "bill_depth_mm",
        "flipper_length_mm",
        "body_mass_g",
        "sex",
        "year",
    ]
    source = tmp_path / "penguins.csv"
    source.write_text(",".join(columns) + "\n" + ",".join(["1"] * 8) + "\n")
    with pytest.raises(KilnError) as raised:
        predict(model, source, tmp_path / "out.csv")
    assert str(raised.value) == (
        f"input={source}: none of the model's columns; the model takes 64 columns: pixel_0_0, pixel_0_1, "
        "pixel_0_2, pixel_0_3 and 60 more; the file has 8: species, island, bill_length_mm, bill_depth_mm "
        "and 4 more; give rows with the model's columns"
    )
