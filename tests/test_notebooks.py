"""Every notebook in notebooks/ executes without error (nbclient), and is committed without outputs.

The kernel is this interpreter (a kernel spec written to a temporary JUPYTER_PATH), so the test
needs only ``pip install -e .[notebooks]``, not a user-installed ``python3`` kernel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "simspec-test-python"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "simspec test (this interpreter)", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let the kernel use its inline backend
    return KERNEL


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ has no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {i} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    # no SIMSPEC_SWEEP: the notebook builds its bundled example sweep, here under tmp_path
    monkeypatch.setenv("SIMSPEC_SWEEP", "")
    monkeypatch.setenv("SIMSPEC_EXAMPLE_OUT", str(tmp_path / "example-sweep"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, startup_timeout=180, kernel_name=kernel_name,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if "image/png" in o.get("data", {}))
    assert images >= 3, f"{path.name}: expected its plots, got {images} image(s)"
    if path.name == "sweep_analysis.ipynb":
        assert (tmp_path / "example-sweep" / "sweep.parquet").is_file()
