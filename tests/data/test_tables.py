"""Reading tables and typing their columns: each mistake in the data names the file or column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kiln.data.tables import column_types, infer_task, read_file, read_table
from kiln.errors import KilnError


def penguin_like() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "bill": [39.1, 39.5, np.nan, 36.7],
            "count": [1, 2, 3, 4],
            "ok": [True, False, True, True],
            "island": ["Biscoe", "Dream", None, "Dream"],
            "code": ["1", "2", "2", "1"],
            "species": ["Adelie", "Gentoo", "Adelie", "Gentoo"],
        }
    )


# -- column typing -----------------------------------------------------------------------------


def test_columns_are_detected_by_type():
    numeric, categorical = column_types(penguin_like(), "species", None, None, [])
    assert numeric == ["id", "bill", "count", "ok"]
    assert categorical == ["island", "code"]  # text that holds only numbers stays text: codes


def test_declared_columns_win_and_dropped_columns_go():
    numeric, categorical = column_types(penguin_like(), "species", ["code"], ["count"], ["id"])
    assert numeric == ["bill", "ok", "code"]  # in the order of the table
    assert categorical == ["count", "island"]


@pytest.mark.parametrize("key", ["numeric_columns", "categorical_columns", "drop_columns"])
def test_a_declared_column_that_is_absent_names_the_key_the_file_and_the_columns(key: str):
    declared: dict[str, list[str] | None] = {"numeric_columns": None, "categorical_columns": None}
    drop: list[str] = []
    if key == "drop_columns":
        drop = ["nosuch"]
    else:
        declared[key] = ["nosuch"]
    with pytest.raises(KilnError) as error:
        column_types(
            penguin_like(),
            "species",
            declared["numeric_columns"],
            declared["categorical_columns"],
            drop,
            "data.path=p.csv",
        )
    message = str(error.value)
    assert f"data.{key}" in message and "'nosuch'" in message and "data.path=p.csv" in message
    assert "columns: id, bill, count, ok, island, code, species" in message


def test_the_target_declared_as_a_feature_is_an_error():
    with pytest.raises(KilnError, match=r"data.categorical_columns: names the target column 'species'"):
        column_types(penguin_like(), "species", None, ["species"], [])


def test_a_column_declared_both_ways_is_an_error():
    with pytest.raises(KilnError, match=r"both name \['island'\]"):
        column_types(penguin_like(), "species", ["island"], ["island"], [])


def test_numbers_with_stray_text_are_an_error_not_a_category():
    frame = penguin_like()
    frame["bill"] = ["39.1", "?", "40.2", "n/a"]
    with pytest.raises(KilnError) as error:
        column_types(frame, "species", None, None, [], "data.path=p.csv")
    message = str(error.value)
    assert "column 'bill' of data.path=p.csv is numeric but holds text in 2 rows" in message
    assert "'?', 'n/a'" in message and "first in data row 2" in message
    assert "data.categorical_columns=[bill]" in message


def test_a_declared_numeric_column_with_text_is_an_error():
    with pytest.raises(KilnError, match=r"column 'island' .* numeric but holds text"):
        column_types(penguin_like(), "species", ["island"], None, [])


def test_mostly_text_with_a_few_numbers_is_a_category():
    frame = penguin_like()
    frame["island"] = ["Biscoe", "Dream", "3", "Dream"]
    _, categorical = column_types(frame, "species", None, None, [])
    assert "island" in categorical


def test_no_feature_columns_is_an_error():
    with pytest.raises(KilnError, match=r"data.path=p.csv: no feature columns besides the target 'species'"):
        column_types(penguin_like()[["species"]], "species", None, None, [], "data.path=p.csv")


# -- task inference ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "task"),
    [
        (["a", "b", "a"], "classification"),
        ([True, False, True], "classification"),
        ([0, 1, 2, 1, 0], "classification"),
        ([1.0, 2.0, 2.0], "classification"),  # integral floats: class codes
        ([0.5, 1.25, 3.0], "regression"),
        (list(range(50)), "regression"),  # more than 20 distinct integers: a quantity
        (list(range(20)), "classification"),
    ],
)
def test_task_is_inferred_from_the_target(values: list[object], task: str):
    assert infer_task(pd.Series(values)) == task


# -- reading -----------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.csv", "", "the file is empty"),
        ("ragged.csv", "a,b\n1,2\n3,4,5,6\n", "cannot read it as a csv table"),
        ("latin.csv", b"a,b\n\xff\xfe\xfa,1\n", "is not UTF-8 text (byte 0xff on line 2)"),
        ("data.xlsx", "a,b\n1,2\n", "unknown file type '.xlsx'"),
        ("bad.parquet", "not parquet", "cannot read it as a parquet table"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path: Path, name: str, content: str | bytes, expected: str):
    path = write(tmp_path, name, content)
    with pytest.raises(KilnError) as error:
        read_file(path)
    message = str(error.value)
    assert message.startswith(f"data.path={path}: ") and expected in message
    assert "\n" not in message


def test_a_missing_file_says_where_it_looked(tmp_path: Path):
    with pytest.raises(KilnError, match=r"file not found \(looked at .*nope.csv\)"):
        read_file(tmp_path / "nope.csv")


def test_a_directory_is_not_a_table(tmp_path: Path):
    with pytest.raises(KilnError, match="is a directory"):
        read_file(tmp_path)


def test_csv_and_tsv_are_read(tmp_path: Path):
    assert read_file(write(tmp_path, "a.csv", "x,y\n1,a\n")).columns.tolist() == ["x", "y"]
    assert read_file(write(tmp_path, "a.tsv", "x\ty\n1\ta\n")).columns.tolist() == ["x", "y"]


def test_read_table_checks_the_target(tmp_path: Path):
    path = write(tmp_path, "t.csv", "x,y\n1,a\n2,\n3,b\n")
    with pytest.raises(KilnError, match=r"data.target=z: no such column in data.path=.*; columns: x, y"):
        read_table(None, str(path), "z")
    with pytest.raises(
        KilnError, match=r"say which column to predict with data.target=COLUMN; columns: x, y"
    ):
        read_table(None, str(path), None)
    with pytest.raises(
        KilnError, match=r"data.target=y: 1 of 3 rows of .* have no target value \(data row 2\)"
    ):
        read_table(None, str(path), "y", missing_target="error")
    warnings: list[str] = []
    frame, _, _ = read_table(None, str(path), "y", warn=warnings.append)
    assert frame["y"].tolist() == ["a", "b"] and frame.index.tolist() == [0, 2]  # the file's rows
    assert len(warnings) == 1 and "1 of 3 rows of" in warnings[0] and "(data row 2;" in warnings[0]
    header_only = write(tmp_path, "h.csv", "x,y\n")
    with pytest.raises(KilnError, match="a header but no rows"):
        read_table(None, str(header_only), "y")


def test_builtin_tables(tmp_path: Path):
    frame, target, source = read_table("iris", None, None)
    assert target == "target" and source == "data.name=iris" and len(frame) == 150
    with pytest.raises(KilnError, match=r"data.name=nosuch: no such built-in table; built-in: breast_cancer"):
        read_table("nosuch", None, None)
