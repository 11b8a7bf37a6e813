"""notebooks/quickstart.ipynb runs top to bottom, and is stored without outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from kilntest import ROOT

QUICKSTART = ROOT / "notebooks" / "quickstart.ipynb"


def execute(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel started in the notebook's directory; raises on a cell error."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    return notebook


def test_quickstart_is_stored_without_outputs() -> None:
    notebook = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for index, cell in enumerate(code_cells):
        assert cell.outputs == [], f"code cell {index} has outputs; clear them before committing"
        assert cell.execution_count is None, f"code cell {index} has an execution count; clear it"


def test_a_failing_cell_fails_the_run(tmp_path: Path) -> None:
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("x / 0")]
    )
    path = tmp_path / "broken.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        execute(path, timeout=120)


@pytest.mark.slow
def test_quickstart_runs(tmp_path: Path) -> None:
    # A copy in a temp directory: its runs/ and CSV files never land in the checkout.
    path = tmp_path / QUICKSTART.name
    shutil.copy(QUICKSTART, path)
    notebook = execute(path)
    runs = sorted((tmp_path / "runs" / "train").iterdir())
    assert len(runs) == 1
    assert (runs[0] / "model.onnx").is_file()
    assert (runs[0] / "predictions.csv").is_file()
    # The report table and the plot were shown.
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in outputs)
    assert any("text/html" in output.get("data", {}) for output in outputs)
