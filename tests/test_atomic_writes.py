"""A signal that lands just after the temp file is made still leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln import runs


def test_an_interrupt_right_after_the_temp_file_exists_removes_it(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "predictions.csv"
    target.write_text("from an earlier run\n")
    real_close = os.close

    def interrupted_close(fd: int) -> None:  # Ctrl-C between making the file and writing it
        real_close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.os, "close", interrupted_close)
    with pytest.raises(KeyboardInterrupt), runs.replacing(target):
        pass
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]
    assert target.read_text() == "from an earlier run\n"


def test_a_completed_block_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with runs.replacing(target, prefix=".out.txt.42.") as temp:
        assert temp.name.startswith(".out.txt.42.") and temp.name.endswith(".tmp") and temp.is_file()
        temp.write_text("new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
