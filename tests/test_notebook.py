"""The EDM-versus-DDPM notebook runs top to bottom without errors (nbclient, python3 kernel).

CI runs it shrunk: EDM_NOTEBOOK_SCALE (default here 0.25) scales its training budget and sample
counts; set EDM_NOTEBOOK_SCALE=1 to test the learner's default. Outputs go to a temporary folder.
"""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "edm_vs_ddpm.ipynb"


def test_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("EDM_NOTEBOOK_SCALE", os.environ.get("EDM_NOTEBOOK_SCALE", "0.25"))
    monkeypatch.setenv("EDM_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    assert (tmp_path / "out" / "trajectories.gif").exists()
