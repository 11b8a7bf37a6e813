"""`kiln predict` never destroys its inputs and never writes an answer it cannot stand behind:
an output that would replace the input or the model, inf in a row, damaged metadata and
unreadable image files; and an export killed mid-way leaves no staging folder behind for good.

The models are built here in a second (a small torch net, kiln's own graph assembly), so these
tests need no training run.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from kiln.errors import KilnError
from kiln.export.graphs import assemble, set_metadata
from kiln.export.onnx_export import export_net
from kilntest import QUICK, TINY_DIGITS, copy_run, kiln_cli, ok, trained_run

CLASSES = ["a", "b", "c"]
TABLE = {
    "numeric_columns": ["x1", "x2"],
    "categorical_columns": ["colour"],
    "numeric_fill": [0.5, -1.0],
    "offset": [0.0, 1.0],
    "scale": [1.0, 2.0],
    "categories": [["blue", "red"]],
    "categorical_fill": ["blue"],
    "kept": [],
}
FEATURES = ["f0", "f1", "f2", "f3"]
IMAGE_INPUT = {"size": [8, 8], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def save_model(
    tmp_path: Path,
    name: str,
    net: nn.Module,
    example: torch.Tensor,
    metadata: dict[str, object],
    table: dict[str, object] | None = None,
    image: dict[str, object] | None = None,
) -> Path:
    """A classifier of CLASSES as kiln export assembles one, with seeded random weights."""
    torch.manual_seed(0)
    for parameter in net.parameters():
        nn.init.normal_(parameter)
    graph = assemble(
        export_net(net, example, 20), task="classification", class_names=CLASSES, table=table, image=image
    )
    set_metadata(graph, {"kiln.class_names": CLASSES, **metadata})
    path = tmp_path / name
    onnx.save(graph, str(path))
    return path


@pytest.fixture(scope="module")
def table_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Columns x1, x2 (numbers) and colour (blue or red) -> class a, b or c."""
    return save_model(
        tmp_path_factory.mktemp("table"),
        "table.onnx",
        nn.Linear(4, 3),
        torch.zeros(2, 4),
        table=TABLE,
        metadata={"kiln.input_kind": "table", "kiln.feature_names": ["x1", "x2", "colour"]},
    )


@pytest.fixture(scope="module")
def array_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four numbers f0..f3 per row, shaped (2, 2) -> class a, b or c."""
    return save_model(
        tmp_path_factory.mktemp("array"),
        "array.onnx",
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
        torch.zeros(2, 2, 2),
        metadata={"kiln.input_kind": "array", "kiln.feature_names": FEATURES},
    )


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(
        tmp_path_factory.mktemp("image"),
        "image.onnx",
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
        torch.zeros(2, 3, 8, 8),
        image=IMAGE_INPUT,
        metadata={"kiln.input_kind": "image", "kiln.image_input": IMAGE_INPUT},
    )


def write_table(
    path: Path, rows: list[list[object]], header: tuple[str, ...] = ("x1", "x2", "colour")
) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


TABLE_ROWS: list[list[object]] = [[1.0, 2.0, "red"], [0.5, "", "blue"], [-1.0, 3.0, ""], [2.0, 0.0, "red"]]


def predict(model: Path, source: Path, output: Path, **more: object) -> dict[str, object]:
    from kiln.stages.predict import run

    settings = {
        "model": str(model),
        "input": str(source),
        "output": str(output),
        "batch_size": 2,
        "drift_threshold": None,
        **more,
    }
    return run(settings)


def read_predictions(path: Path) -> list[dict[str, str]]:
    with path.open() as stream:
        return list(csv.DictReader(stream))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def refused(model: Path, source: Path, output: Path, **more: object) -> str:
    """predict's one-line refusal, checked to have written nothing."""
    existed = output.exists()
    with pytest.raises(KilnError) as raised:
        predict(model, source, output, **more)
    message = str(raised.value)
    assert "\n" not in message
    assert output.exists() == existed
    assert leftovers(output.parent if output.parent.is_dir() else source.parent) == []
    return message


# -- 1. the output never replaces what predict reads -------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink", "hardlink"])
def test_an_output_that_is_the_input_is_refused_and_the_input_stays_intact(table_model, tmp_path, spelling):
    source = write_table(tmp_path / "rows.csv", TABLE_ROWS)
    before, model_before = source.read_bytes(), table_model.read_bytes()
    output = {
        "same": source,
        "dotted": tmp_path / "sub" / ".." / "rows.csv",
        "symlink": tmp_path / "link.csv",
        "hardlink": tmp_path / "hard.csv",
    }[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        output.symlink_to(source)
    elif spelling == "hardlink":
        os.link(source, output)
    message = refused(table_model, source, output)
    assert message == (
        f"output={output}: the same file as input={source}, which writing the predictions would replace; "
        "choose another file, e.g. output=predictions.csv"
    )
    assert source.read_bytes() == before and table_model.read_bytes() == model_before


def test_an_output_that_is_the_model_is_refused_and_the_model_stays_intact(table_model, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(table_model.read_bytes())
    source = write_table(tmp_path / "rows.csv", TABLE_ROWS)
    before = source.read_bytes()
    message = refused(model, source, model)
    assert message == (
        f"output={model}: the same file as model={model}, which writing the predictions would replace; "
        "choose another file, e.g. output=predictions.csv"
    )
    assert model.read_bytes() == table_model.read_bytes() and source.read_bytes() == before


def test_an_output_that_is_an_image_of_the_input_folder_is_refused(image_model, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "sub" / "0.png")
    before = (folder / "sub" / "0.png").read_bytes()
    message = refused(image_model, folder, folder / "sub" / "0.png")
    assert message.startswith(
        f"output={folder / 'sub' / '0.png'}: one of the image files read from input={folder}"
    )
    assert (folder / "sub" / "0.png").read_bytes() == before
    # a CSV in the folder is not one of its images: it is written, and the image is still predicted
    assert predict(image_model, folder, folder / "predictions.csv")["rows"] == 1


def test_an_output_that_is_a_directory_is_one_line_from_the_cli(table_model, tmp_path):
    source = write_table(tmp_path / "rows.csv", TABLE_ROWS)
    (tmp_path / "out").mkdir()
    result = kiln_cli("predict", f"model={table_model}", f"input={source}", "output=out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "kiln predict: error: output=out: a directory; give the CSV file to write, e.g. output=out/predictions.csv"
    ]
    assert list((tmp_path / "out").iterdir()) == [] and leftovers(tmp_path) == []


# -- 2. inf in a row is refused; a missing value in a table is not -----------------------------


def test_missing_values_in_a_table_are_predicted(table_model, tmp_path):
    source = write_table(tmp_path / "rows.csv", [*TABLE_ROWS, ["nan", "NA", "red"]])
    assert predict(table_model, source, tmp_path / "out.csv")["rows"] == 5
    rows = read_predictions(tmp_path / "out.csv")
    assert all(row["prediction"] in CLASSES for row in rows)
    assert all(np.isfinite([float(row[f"probability_{c}"]) for c in CLASSES]).all() for row in rows)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_inf_in_a_table_column_names_the_column_and_the_first_row(table_model, tmp_path, suffix):
    cells = [*TABLE_ROWS, [1.0, "-inf", "red"], [2.0, "inf", "blue"]]
    source = write_table(tmp_path / "rows.csv", cells)
    if suffix == ".parquet":
        import pandas as pd

        pd.read_csv(source).to_parquet(tmp_path / "rows.parquet")
        source.unlink()
        source = tmp_path / "rows.parquet"
    shown = "'-inf'" if suffix == ".csv" else "-inf"  # the cell as read: text in a CSV, a float in Parquet
    assert refused(table_model, source, tmp_path / "out.csv") == (
        f"input={source}: column 'x2' holds {shown} in row 5 (rows counted from 1 below the header); "
        "2 row(s) hold inf or -inf; replace it with a finite number, or leave the cell empty for a "
        "missing value"
    )


def test_inf_in_a_npy_array_names_its_position(array_model, tmp_path):
    values = np.zeros((4, 2, 2))
    values[2, 1, 0] = np.inf
    values[3, 0, 0] = np.nan
    np.save(tmp_path / "rows.npy", values)
    assert refused(array_model, tmp_path / "rows.npy", tmp_path / "out.csv") == (
        f"input={tmp_path / 'rows.npy'}: values[2, 1, 0] is inf; 2 row(s) hold NaN or inf; replace it "
        "with a finite number (an array model has no missing values to fill in)"
    )
    values = np.zeros((3, 4))  # flat rows; float64 that float32 cannot hold
    values[1, 3] = -1e300
    np.save(tmp_path / "big.npy", values)
    assert refused(array_model, tmp_path / "big.npy", tmp_path / "out.csv") == (
        f"input={tmp_path / 'big.npy'}: values[1, 3] is -1e+300 (beyond float32's range); 1 row(s) hold "
        "NaN or inf; replace it with a finite number (an array model has no missing values to fill in)"
    )


def test_inf_or_a_gap_in_an_array_models_csv_names_the_column(array_model, tmp_path):
    source = write_table(
        tmp_path / "rows.csv", [[0, 1, 2, 3], [0, 1, "", 3], [0, "inf", 2, 3]], header=tuple(FEATURES)
    )
    assert refused(array_model, source, tmp_path / "out.csv") == (
        f"input={source}: column 'f2' holds '' in row 2 (rows counted from 1 below the header); 2 row(s) "
        "hold a missing value or inf; replace it with a finite number (an array model has no missing "
        "values to fill in)"
    )


def test_an_answer_that_is_not_a_number_is_not_written(table_model, tmp_path):
    """1e308 is a float64, but the model computes in float32: its logits overflow to NaN."""
    source = write_table(tmp_path / "rows.csv", [*TABLE_ROWS, [1e308, 1.0, "red"]])
    assert refused(table_model, source, tmp_path / "out.csv") == (
        "the model's answer for row 5 (rows counted from 1) is not a number (1 row(s) like it), so "
        "nothing was written; check those rows for values far outside the training data"
    )


# -- 3. damaged metadata ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("kiln.class_names", '["a", "b"', 'is not JSON (\'["a", "b"\')'),
        ("kiln.class_names", '{"a": 1}', "is not a list of names ('{\"a\": 1}')"),
        ("kiln.feature_names", "[[1], 2]", "is not a list of names ('[[1], 2]')"),
    ],
)
def test_damaged_name_metadata_names_the_file_and_the_key(table_model, tmp_path, key, value, problem):
    graph = onnx.load(str(table_model))
    set_metadata(graph, {key: value})
    model = tmp_path / "edited.onnx"
    onnx.save(graph, str(model))
    source = write_table(tmp_path / "rows.csv", TABLE_ROWS)
    assert refused(model, source, tmp_path / "out.csv") == (
        f"model={model}: its {key} metadata {problem}; the file was changed after export: export it "
        "again with kiln export"
    )


# -- 4. unreadable images in a folder ------------------------------------------------------------


def image_folder(folder: Path, broken: list[str], good: list[str]) -> Path:
    for name in good:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 7 * len(name), dtype=np.uint8)).save(folder / name)
    for name in broken:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"not a png")
    return folder


def test_a_folder_skips_the_images_it_cannot_read_and_names_them(image_model, tmp_path, capsys):
    folder = image_folder(tmp_path / "photos", broken=["a/b.png"], good=["a/c.png", "d.png"])
    truncated = Image.new("RGB", (8, 8))
    truncated.save(folder / "e.png")
    (folder / "e.png").write_bytes((folder / "e.png").read_bytes()[:40])
    result = predict(image_model, folder, tmp_path / "out.csv")
    assert result["rows"] == 2
    assert [row["file"] for row in read_predictions(tmp_path / "out.csv")] == ["a/c.png", "d.png"]
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "cannot be read" in line]
    assert line.startswith(
        "kiln predict: skipped 2 image file(s) that cannot be read: a/b.png (UnidentifiedImageError: "
    )
    assert ", e.png (" in line


def test_a_folder_of_unreadable_images_is_one_error(image_model, tmp_path):
    folder = image_folder(tmp_path / "photos", broken=["x.png", "y.jpg"], good=[])
    message = refused(image_model, folder, tmp_path / "out.csv")
    assert message.startswith(
        f"input={folder}: none of its 2 image file(s) can be read as an image, e.g. x.png (UnidentifiedImageError: "
    )
    assert message.endswith("; remove or replace them")


def test_a_single_unreadable_image_file_is_an_error(image_model, tmp_path):
    source = image_folder(tmp_path, broken=["x.png"], good=[]) / "x.png"
    message = refused(image_model, source, tmp_path / "out.csv")
    assert message.startswith(f"input: {source} cannot be read as an image (UnidentifiedImageError: ")


# -- 5. every refusal through the CLI: one line, exit 2 ----------------------------------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("same_file", "output=rows.csv: the same file as input=rows.csv"),
        ("inf", "input=inf.csv: column 'x1' holds 'inf' in row 1"),
        ("batch_size", "batch_size=[: not a number"),
        ("runtime", "model=reshape.onnx: onnxruntime cannot run it on these rows ("),
    ],
)
def test_predict_refusals_are_one_line_and_exit_2_from_the_cli(table_model, tmp_path, case, expected):
    write_table(tmp_path / "rows.csv", TABLE_ROWS)
    write_table(tmp_path / "inf.csv", [["inf", 1.0, "red"]])
    model, source, more = str(table_model), "rows.csv", []
    output = "rows.csv" if case == "same_file" else "out.csv"
    if case == "inf":
        source = "inf.csv"
    elif case == "batch_size":
        more = ["batch_size=["]
    elif case == "runtime":  # a graph that only takes batches of an even size
        model, source = "reshape.onnx", "rows.npy"
        np.save(tmp_path / "rows.npy", np.zeros((3, 4), dtype=np.float32))
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Reshape", ["input", "pairs"], ["output"])],
            "pairs",
            [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 4])],
            [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [None, 8])],
            [onnx.numpy_helper.from_array(np.array([-1, 8], dtype=np.int64), "pairs")],
        )
        onnx.save(
            onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]),
            str(tmp_path / model),
        )
    before = (tmp_path / "rows.csv").read_bytes()
    result = kiln_cli("predict", f"model={model}", f"input={source}", f"output={output}", *more, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"kiln predict: error: {expected}"), line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.csv").exists() and leftovers(tmp_path) == []
    assert (tmp_path / "rows.csv").read_bytes() == before


# -- 6. an export killed mid-way leaves no staging folder behind for good ----------------------


def exited_pid() -> int:
    """The pid of a process that has ended (and been reaped): no process has it now."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_staging_folders_of_dead_exports_are_removed_and_live_ones_kept(tmp_path):
    from kiln.export.pipeline import remove_abandoned_staging

    # a live process: it waits for its stdin to close
    waiting = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        dead, live, parent = exited_pid(), waiting.pid, os.getpid()
        for name in (f".export.tmp-{dead}", f".export.tmp-{live}", f".export.tmp-{parent}", ".export.tmp-x1"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "fp32.onnx").write_bytes(b"half")
        (tmp_path / f".compress.tmp-{dead}").mkdir()  # another stage's: not export's to remove
        remove_abandoned_staging(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f".export.tmp-{live}", f".export.tmp-{parent}", ".export.tmp-x1", f".compress.tmp-{dead}"]
        )
    finally:
        waiting.kill()
        waiting.wait()


@pytest.mark.slow
def test_an_export_removes_a_killed_exports_staging_folder(tmp_path_factory, tmp_path):
    run = copy_run(trained_run(tmp_path_factory, "digits", TINY_DIGITS), tmp_path)
    dead, live = run / f".export.tmp-{exited_pid()}", run / f".export.tmp-{os.getpid()}"
    for staging in (dead, live):
        staging.mkdir()
        (staging / "fp32.onnx").write_bytes(b"half")
    ok(kiln_cli("export", f"run={run}", *QUICK, cwd=tmp_path))
    # the export holds the run's lock: no other process can be exporting into it, so every staging
    # folder but its own is abandoned, even one named after a process that is alive
    assert not dead.exists() and not live.exists()
    assert (run / "model.onnx").is_file()
    assert [p.name for p in run.iterdir() if p.name.startswith(".export")] == []
