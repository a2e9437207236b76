"""The EDM-versus-DDPM notebook runs top to bottom without errors (nbclient, python3 kernel).

CI runs it shrunk: EDM_NOTEBOOK_SCALE (default here 0.25) scales its training budget and sample
counts; set EDM_NOTEBOOK_SCALE=1 to test the learner's default. Outputs go to a temporary folder.
The notebook's other data sources (a user's `label/filename.jpg` folder, MNIST IDX files) run on
small fixtures written by `data_fixtures`: at 16x16 in the default suite, at the notebook's
64x64 in the `slow` set.
"""

import json
import os
from pathlib import Path

import pytest
from data_fixtures import fake_mnist, make_image_folder, write_mnist
from PIL import Image

from edm_fast.device import resolve_device

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "edm_vs_ddpm.ipynb"


def _run_notebook(monkeypatch, out: Path, **env) -> list[str]:
    """Execute the notebook with EDM_NOTEBOOK_<KEY> variables; returns each code cell's text."""
    monkeypatch.setenv("EDM_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for key, value in env.items():
        monkeypatch.setenv(f"EDM_NOTEBOOK_{key.upper()}", str(value))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [out for cell in code for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors
    return ["".join(out.get("text", "")) for cell in code for out in cell.get("outputs", [])
            if out.get("output_type") == "stream"]


def test_notebook_runs(tmp_path, monkeypatch):
    _run_notebook(monkeypatch, tmp_path / "out",
                  scale=os.environ.get("EDM_NOTEBOOK_SCALE", "0.25"))
    assert (tmp_path / "out" / "trajectories.gif").exists()
    assert (tmp_path / "out" / "quality.png").exists()  # the digits comparison ran


def _trained_on(run: Path) -> tuple[list[int], int, str]:
    """(sample shape, number of classes, network preset) of a training run."""
    config = json.loads((run / "config.json").read_text())
    return config["sample_shape"], config["net"]["kwargs"]["label_dim"], config["train"]["preset"]


@pytest.mark.parametrize("source", ["folder", "mnist"])
def test_notebook_runs_on_a_users_data(tmp_path, monkeypatch, source):
    """DATA set to an image folder (mixed formats, a stray text file, fewer images than one
    batch) or to MNIST files: the data cell shows it, both nets train class-conditionally on it
    at RESOLUTION and sample from it; the digits-only comparison says it is skipped. The folder
    run leaves PRESET at "auto": the small `tiny` net on a CPU, `64px-ddpmpp` on a GPU."""
    if source == "folder":
        make_image_folder(tmp_path / "pets")
        data, shape, classes = tmp_path / "pets", [3, 16, 16], 2
    else:
        images, labels = fake_mnist(40)
        (tmp_path / "mnist").mkdir()
        write_mnist(tmp_path / "mnist", images, labels)
        data, shape, classes = f"mnist:{tmp_path / 'mnist'}", [1, 16, 16], 10  # MNIST's digits
    out = tmp_path / "out"
    preset = {} if source == "folder" else {"preset": "tiny"}
    net = "tiny" if source == "mnist" or resolve_device("auto").type == "cpu" else "64px-ddpmpp"
    texts = _run_notebook(monkeypatch, out, scale=0.05, data=data, resolution=16, **preset)
    assert (out / f"{source}.png").exists()
    assert sum("skipped: no" in text for text in texts) == 1  # only the other source's cell
    for loss in ("edm", "ddpm"):
        run = out / f"train-{loss}"
        assert _trained_on(run) == (shape, classes, net)
        assert len(list(run.glob("ckpt-*.safetensors"))) == 1
    assert any("no digit classifier for this data" in text for text in texts)
    assert not (out / "quality.png").exists()
    assert (out / "grid.png").exists()  # the sampling cell drew from the fresh nets


@pytest.mark.slow
def test_notebook_trains_on_a_64px_image_folder(tmp_path, monkeypatch):
    """The notebook's own folder resolution (64x64, RGB) with the `tiny` preset on a CPU."""
    make_image_folder(tmp_path / "pets")
    out = tmp_path / "out"
    _run_notebook(monkeypatch, out, scale=0.05, data=tmp_path / "pets", preset="tiny")
    assert _trained_on(out / "train-edm") == ([3, 64, 64], 2, "tiny")
    assert _trained_on(out / "train-ddpm") == ([3, 64, 64], 2, "tiny")
    with Image.open(out / "grid.png") as grid:  # 20 samples of 64x64 in one row, with padding
        assert grid.mode == "RGB" and grid.height >= 64 and grid.width >= 20 * 64
