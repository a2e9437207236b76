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


# Jupyter's own inline backend (what ipykernel picks when MPLBACKEND is unset), also where the
# machine running the tests sets MPLBACKEND=Agg: plt.show() must put a PNG into the cell's output
INLINE = "module://matplotlib_inline.backend_inline"
LOSS_CURVE_CELL = "4dedcca7"  # the cell that plots both runs' log.jsonl after training


def _execute(monkeypatch, nb) -> list:
    """Run a notebook (nbformat node) in a python3 kernel with the inline matplotlib backend;
    returns its code cells, outputs filled in, after checking that none raised."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", INLINE)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [out for cell in code for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors
    return code


def _has_png(cell) -> bool:
    return any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def _run_notebook(monkeypatch, out: Path, **env) -> list[str]:
    """Execute the notebook with EDM_NOTEBOOK_<KEY> variables; returns each code cell's text."""
    monkeypatch.setenv("EDM_NOTEBOOK_OUT", str(out))
    for key, value in env.items():
        monkeypatch.setenv(f"EDM_NOTEBOOK_{key.upper()}", str(value))
    code = _execute(monkeypatch, nbformat.read(NOTEBOOK, as_version=4))
    loss_curve = [cell for cell in code if cell.get("id") == LOSS_CURVE_CELL]
    assert len(loss_curve) == 1 and "log.jsonl" in loss_curve[0].source
    # train() wrote loss.png before this cell: the plot still shows in the notebook
    assert _has_png(loss_curve[0]), loss_curve[0].get("outputs")
    return ["".join(out.get("text", "")) for cell in code for out in cell.get("outputs", [])
            if out.get("output_type") == "stream"]


def test_notebook_runs(tmp_path, monkeypatch):
    texts = _run_notebook(monkeypatch, tmp_path / "out",
                          scale=os.environ.get("EDM_NOTEBOOK_SCALE", "0.25"))
    assert (tmp_path / "out" / "trajectories.gif").exists()
    assert (tmp_path / "out" / "quality.png").exists()  # the digits comparison ran
    for loss in ("edm", "ddpm"):  # the training cell's closing loss is the last one logged
        lines = (tmp_path / "out" / f"train-{loss}" / "log.jsonl").read_text().splitlines()
        last = [json.loads(line) for line in lines if '"loss"' in line][-1]["loss"]
        assert any(f"{loss}: " in t and f"final loss {last:.4f} (mean of the last" in t
                   for t in texts), texts


def test_library_plots_leave_the_notebook_backend_alone(tmp_path, monkeypatch):
    """The library writes its .png plots (the loss curve of a training run, a toy scatter)
    without switching matplotlib's backend: a later plt.show() in the kernel still shows."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "kimg": s / 10, "loss": 1 / s}) + "\n"
                           for s in range(1, 6)))
    cells = [
        "import matplotlib.pyplot as plt\nplt.plot([0, 1]); plt.show()",
        ("from pathlib import Path\nimport torch\nfrom edm_fast.io.samples import plot_toy\n"
         "from edm_fast.train.reporting import plot_losses as _plot_losses\n"
         f"_plot_losses(Path({str(tmp_path)!r}))\n"
         f"plot_toy(torch.randn(50, 2), Path({str(tmp_path / 'toy.png')!r}))"),
        "import matplotlib\nprint(matplotlib.get_backend())\nplt.plot([1, 0]); plt.show()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    first, library, last = _execute(monkeypatch, nb)
    assert (tmp_path / "loss.png").stat().st_size and (tmp_path / "toy.png").stat().st_size
    assert _has_png(first)
    assert _has_png(last), last.get("outputs")
    assert not _has_png(library)  # files only, no figure left open to show


def _trained_on(run: Path) -> tuple[list[int], int, str]:
    """(sample shape, number of classes, network preset) of a training run."""
    config = json.loads((run / "config.json").read_text())
    return config["sample_shape"], config["net"]["kwargs"]["label_dim"], config["train"]["preset"]


@pytest.mark.parametrize("source", ["folder", "mnist"])
def test_notebook_runs_on_a_users_data(tmp_path, monkeypatch, source):
    """DATA set to an image folder (mixed formats, a stray text file, fewer images than one
    batch) or to MNIST files: the data cell shows it, both nets train class-conditionally on it
    at RESOLUTION and sample from it; the comparison scores them with a classifier trained on
    the same data (LabelledDataScorer). The folder
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
        # own data on a CPU: the CPU recipe's batch and budget-sized schedule (OWN_PICTURES.md)
        train_options = json.loads((run / "config.json").read_text())["train"]
        if resolve_device("auto").type == "cpu":
            assert train_options["batch"] == 32
            assert train_options["ema_halflife_kimg"] == pytest.approx(
                train_options["kimg"] / 10)
        else:
            assert train_options["batch"] == 128
    assert any("scoring classifier: accuracy" in text for text in texts)
    assert (out / "quality.png").exists()  # scored by a classifier of this data
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
