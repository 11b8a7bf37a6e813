"""A user's table as it comes: rows without a target, other encodings and separators, a saved
index, repeated names, an id as the target, inf. Each is read as meant or named in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kiln.data import TableDataModule
from kiln.data.tables import row_id_like
from kiln.errors import InvalidArgument, KilnError

WARNING = "kiln train: warning: "


def cars_like(n_rows: int = 406, seed: int = 0) -> pd.DataFrame:
    """The shape of vega's cars table: 406 cars, 8 without Miles_per_Gallon (the same rows as
    there), 6 without Horsepower, names and years as text."""
    rng = np.random.default_rng(seed)
    cylinders = rng.choice([4, 6, 8], size=n_rows, p=[0.5, 0.25, 0.25])
    weight = (1600 + cylinders * 350 + rng.normal(0, 250, n_rows)).round()
    horsepower = (cylinders * 14 + rng.normal(0, 12, n_rows)).round()
    origin = np.where(cylinders == 8, "USA", rng.choice(["USA", "Japan", "Europe"], size=n_rows))
    mpg = (58 - weight / 120 + (origin == "Japan") * 2 + rng.normal(0, 2, n_rows)).round(1)
    frame = pd.DataFrame(
        {
            "Name": [f"car {i}" for i in range(n_rows)],
            "Miles_per_Gallon": mpg,
            "Cylinders": cylinders,
            "Horsepower": horsepower,
            "Weight_in_lbs": weight.astype(int),
            "Year": rng.choice([f"19{y}-01-01" for y in range(70, 83)], size=n_rows),
            "Origin": origin,
        }
    )
    frame.loc[[10, 11, 12, 13, 14, 17, 39, 367], "Miles_per_Gallon"] = np.nan
    frame.loc[[38, 133, 337, 343, 361, 382], "Horsepower"] = np.nan
    return frame


def regression_table(n_rows: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n_rows).round(3), rng.normal(size=n_rows).round(3)
    return pd.DataFrame({"x1": x1, "x2": x2, "y": (2 * x1 - x2 + rng.normal(0, 0.1, n_rows)).round(3)})


def set_up(path: Path, target: str = "y", **settings: object) -> TableDataModule:
    data = TableDataModule(path=str(path), target=target, **settings)  # type: ignore[arg-type]
    data.setup()
    return data


def warnings_of(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith(WARNING) for line in lines), err
    return [line.removeprefix(WARNING) for line in lines]


# -- rows without a target value ---------------------------------------------------------------


def test_rows_without_a_target_are_left_out_with_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "cars.csv"
    cars_like().to_csv(path, index=False)
    data = set_up(path, "Miles_per_Gallon")
    assert data.task == "regression"
    assert data.targets is not None and len(data.targets) == 398
    assert data.splits is not None
    assert len(data.splits.train) + len(data.splits.val) + len(data.splits.test) == 398
    assert not np.isnan(data.targets.numpy()).any()
    data.load()  # again, as feature importance and the drift baseline do after training
    assert warnings_of(capsys) == [
        f"data.target=Miles_per_Gallon: 8 of 406 rows of data.path={path} have no target value and "
        "are left out (data rows 11, 12, 13, 14, 15, ...; data.missing_target=error refuses them instead)"
    ]


def test_rows_left_out_keep_the_files_row_numbers_in_later_messages(tmp_path: Path):
    frame = regression_table()
    frame["x1"] = frame["x1"].astype(object)
    frame.loc[[0, 1], "y"] = np.nan
    frame.loc[[5, 9], "x1"] = "?"
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(KilnError, match=r"holds text in 2 rows \('\?'; first in data row 6\)"):
        set_up(path)


def test_missing_target_error_refuses_the_file(tmp_path: Path):
    path = tmp_path / "cars.csv"
    cars_like().to_csv(path, index=False)
    with pytest.raises(KilnError) as error:
        set_up(path, "Miles_per_Gallon", missing_target="error")
    assert str(error.value) == (
        f"data.target=Miles_per_Gallon: 8 of 406 rows of data.path={path} have no target value (data "
        "rows 11, 12, 13, 14, 15, ...); drop or fill those rows, or set data.missing_target=drop to leave "
        "them out"
    )


def test_a_target_column_without_any_value_is_one_error(tmp_path: Path):
    frame = regression_table()
    frame["y"] = np.nan
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(KilnError) as error:
        set_up(path)
    assert str(error.value) == (
        f"data.target=y: none of the 60 rows of data.path={path} has a target value (the column is "
        "empty); check that data.target names the column to predict; columns: x1, x2, y"
    )


def test_missing_target_takes_drop_or_error():
    with pytest.raises(InvalidArgument) as error:
        TableDataModule(missing_target="skip")  # type: ignore[arg-type]
    assert error.value.argument == "missing_target" and "drop" in error.value.message


# -- encodings and separators ------------------------------------------------------------------


def latin1_table() -> bytes:
    rows = [f"{x:.2f},{'Zürich' if i % 2 else 'Genève'},{2 * x:.2f}" for i, x in enumerate(np.arange(40) / 7)]
    return ("x,city,y\n" + "\n".join(rows) + "\n").encode("latin-1")


def test_a_latin1_csv_says_it_is_not_utf8_and_how_to_read_it(tmp_path: Path):
    path = tmp_path / "latin.csv"
    path.write_bytes(latin1_table())
    with pytest.raises(KilnError) as error:
        set_up(path)
    assert str(error.value) == (
        f"data.path={path}: is not UTF-8 text (byte 0xe8 on line 2); save it as UTF-8, or read it as "
        "Latin-1 with data.encoding=latin-1 (or the encoding it was saved in, e.g. cp1252)"
    )


def test_data_encoding_reads_a_latin1_csv(tmp_path: Path):
    path = tmp_path / "latin.csv"
    path.write_bytes(latin1_table())
    data = set_up(path, encoding="latin-1")
    assert sorted(data.preprocessor.categories[0]) == ["Genève", "Zürich"]


def test_an_unknown_encoding_is_refused_before_reading():
    with pytest.raises(InvalidArgument) as error:
        TableDataModule(encoding="utf-9")
    assert error.value.argument == "encoding" and "'utf-9'" in error.value.message


def semicolon_csv(tmp_path: Path) -> Path:
    """As a German or French Excel saves it: semicolons between columns, decimal commas."""
    frame = regression_table(40)
    lines = [";".join(frame.columns)] + [
        ";".join(f"{v:.3f}".replace(".", ",") for v in row) for row in frame.itertuples(index=False)
    ]
    path = tmp_path / "semi.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_semicolon_csv_is_read_with_its_separator_and_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = semicolon_csv(tmp_path)
    data = set_up(path)
    assert data.raw_columns == ["x1", "x2"] and data.preprocessor.numeric_columns == ["x1", "x2"]
    expected = regression_table(40)
    features = data.load().features
    assert features["x1"].to_numpy() == pytest.approx(expected["x1"].to_numpy())
    assert data.targets is not None
    assert data.targets.numpy() == pytest.approx(expected["y"].to_numpy(np.float32))
    assert warnings_of(capsys) == [
        f"data.path={path}: its columns are separated by semicolons, not commas, so it is read with "
        "data.sep=';' (set that to say so and silence this line)",
        f"data.path={path}: numbers with a decimal comma (3,5 for 3.5) read as numbers in columns "
        "'x1', 'x2', 'y'",
    ]


def test_data_sep_reads_a_semicolon_csv_without_the_separator_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    data = set_up(semicolon_csv(tmp_path), sep=";")
    assert data.raw_columns == ["x1", "x2"]
    (line,) = warnings_of(capsys)
    assert "decimal comma" in line


def test_a_semicolon_csv_read_with_commas_says_to_set_data_sep(tmp_path: Path):
    path = semicolon_csv(tmp_path)
    with pytest.raises(KilnError) as error:
        set_up(path, sep=",")
    assert str(error.value) == (
        f"data.target=y: no such column in data.path={path}; columns: x1;x2;y (one column: its header "
        "holds semicolons; set data.sep=';')"
    )


def test_repeated_column_names_are_refused(tmp_path: Path):
    path = tmp_path / "dup.csv"
    path.write_text("x1,x2,x1,x2,x2,y\n" + "1,2,3,4,5,6\n" * 20)
    with pytest.raises(KilnError) as error:
        set_up(path)
    assert str(error.value) == (
        f"data.path={path}: the header repeats column names 'x1' (2 times), 'x2' (3 times); give each "
        "column its own name, or delete the copies (pandas would quietly rename them x1.1, ...)"
    )


# -- columns that are not what they seem --------------------------------------------------------


def test_a_saved_pandas_index_is_left_out_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    frame = regression_table()
    frame.loc[[4], "y"] = np.nan
    path = tmp_path / "indexed.csv"
    frame.to_csv(path)  # index=True: a first column with an empty header and 0..59
    data = set_up(path)
    assert data.raw_columns == ["x1", "x2"] and data.feature_names == ["x1", "x2"]
    assert warnings_of(capsys)[1] == (
        f"data.path={path}: its first column has no name and a different whole number in every row "
        "(0..59): a row index saved with the table (pandas' to_csv without index=False), not a feature, "
        "so it is left out (data.numeric_columns=['Unnamed: 0'] keeps it)"
    )
    kept = set_up(path, numeric_columns=["Unnamed: 0"])
    assert kept.raw_columns == ["Unnamed: 0", "x1", "x2"]


def test_an_unnamed_first_column_that_is_not_an_index_stays(tmp_path: Path):
    frame = regression_table()
    frame.insert(0, "", np.arange(60) % 3)  # an empty header over a code that repeats
    path = tmp_path / "codes.csv"
    frame.to_csv(path, index=False)
    assert set_up(path).raw_columns == ["Unnamed: 0", "x1", "x2"]


def test_a_regression_target_that_looks_like_a_row_id_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    frame = regression_table()
    frame["row"] = np.random.default_rng(1).permutation(60) + 1
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    data = set_up(path, "row")
    assert data.task == "regression"
    assert warnings_of(capsys) == [
        "data.target=row: every value is a different whole number (1..60, each once), as in a row id, not "
        "a quantity to predict; if so, set data.target to the column to predict (numeric columns: x1, x2, "
        "y) and leave the id out with data.drop_columns=[row]"
    ]


def test_a_quantity_in_distinct_whole_numbers_is_not_taken_for_an_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    frame = regression_table()
    frame["price"] = np.random.default_rng(2).choice(np.arange(10_000, 90_000), size=60, replace=False)
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    assert set_up(path, "price").task == "regression"
    assert warnings_of(capsys) == []


@pytest.mark.parametrize(
    ("name", "values", "looks_like"),
    [
        ("y", [5, 3, 1, 2, 4, 6, 9, 8, 7, 10], "1..10, each once"),
        ("y", [3, 10, 12, 40, 41, 57, 60, 99, 120, 121], "3..121, increasing row by row"),
        ("customer_id", [31, 7, 12, 40, 96, 57, 60, 99, 120, 1], "1..120, under an id-like name"),
        ("userId", [31, 7, 12, 40, 96, 57, 60, 99, 120, 1], "1..120, under an id-like name"),
        ("paid", [31, 7, 12, 40, 96, 57, 60, 99, 120, 1], None),  # a quantity that ends in 'id'
        ("y", [5, 3, 1, 2, 4, 6, 9, 8, 7, 7], None),  # a repeated value
        ("y", [5, 3, 1, 2, 4, 6, 9, 8, 7, 10.5], None),  # a fraction
        ("y", [5, 3, 1, 2, 4, 6, 9, 8, 7], None),  # too few rows to tell
    ],
)
def test_what_looks_like_a_row_id(name: str, values: list[float], looks_like: str | None):
    assert row_id_like(pd.Series(values, name=name)) == looks_like


def test_inf_names_the_column_the_file_the_row_and_the_fix(tmp_path: Path):
    frame = regression_table()
    frame.loc[7, "x2"] = np.inf
    frame.loc[30, "x2"] = -np.inf
    frame.loc[12, "x1"] = 1e39
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    assert pd.read_csv(path)["x2"].iloc[7] == np.inf  # what read_csv makes of the text 'inf'
    with pytest.raises(KilnError) as error:
        set_up(path)
    assert str(error.value) == (
        f"columns 'x1', 'x2' of data.path={path} hold inf or a number past float32's range in 3 rows "
        "(first inf in column 'x2', data row 8); replace those values with empty cells (imputed like "
        "missing values) or drop those rows"
    )


# -- through the CLI ---------------------------------------------------------------------------


@pytest.mark.slow
def test_the_readmes_cars_command_trains_on_a_table_with_missing_targets(kiln, tmp_path: Path):
    """README: `kiln train data=table data.path=cars.csv data.target=Miles_per_Gallon` as written
    (a table gets the MLP by default), on a table shaped like vega's cars: 8 of 406 cars have no
    mileage."""
    from kilntest import NO_COMPRESSION, assert_ok, read_run, run_dirs

    cars_like().to_csv(tmp_path / "cars.csv", index=False)
    result = kiln(
        "train",
        "data=table",
        "data.path=cars.csv",
        "data.target=Miles_per_Gallon",
        "trainer.max_epochs=30",
        "progress=lines",
        *NO_COMPRESSION,
    )
    assert_ok(result)
    others = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("epoch ")]
    assert others == [
        "kiln train: warning: data.target=Miles_per_Gallon: 8 of 406 rows of data.path=cars.csv have no "
        "target value and are left out (data rows 11, 12, 13, 14, 15, ...; data.missing_target=error "
        "refuses them instead)"
    ]
    (run_dir,) = run_dirs(tmp_path / "runs")
    # learned from the 398 rows with a mileage (0.50 with the default seed; the mean alone scores 0)
    assert read_run(run_dir)["test_metrics"]["test/r2"] > 0.3
