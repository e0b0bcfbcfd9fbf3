"""The research notebooks run from top to bottom against the bundled model, as a reader would run them. Each
asserts what it shows (parity within float32 rounding and identical greedy text, router counts that add up,
the sampler's effects), so a cell that raises here is a broken claim, not only a broken cell."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_are_there_and_check_what_they_show():
    assert [p.stem for p in NOTEBOOKS] == ["parity", "quickstart", "router_analysis", "sampling"]
    for path in NOTEBOOKS:
        code = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")
        assert code.count("assert ") >= 3, f"{path.name} shows results without checking them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_without_errors(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    # Raises CellExecutionError, with the failing cell and its traceback, if any cell fails.
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code_cells = [cell for cell in book.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)
    assert any(output.get("output_type") == "display_data" for cell in code_cells for output in cell.outputs) or \
        path.stem == "quickstart", "the notebook should draw its plots"
