"""Optional dependencies (the `train` extra): a missing one gives one error that names the pip
command, before any work is done, not a ModuleNotFoundError from deep inside a command."""

import sys

import pytest

from edm_fast.optional import MissingDependency, pyplot, require


def _block(monkeypatch, *modules):
    for name in modules:  # None in sys.modules makes `import name` raise ModuleNotFoundError
        monkeypatch.setitem(sys.modules, name, None)


def test_require_names_the_package_and_the_extra(monkeypatch):
    _block(monkeypatch, "sklearn", "sklearn.datasets")
    with pytest.raises(MissingDependency, match=r"the digits data set needs scikit-learn.*"
                       r"pip install 'edm-fast\[train\]'"):
        require("sklearn.datasets", "the digits data set")
    assert require("math", "arithmetic").sqrt(4.0) == 2.0


def test_pyplot_missing_is_a_missing_dependency(monkeypatch):
    _block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(MissingDependency, match="matplotlib"):
        pyplot()


def test_digits_without_sklearn(monkeypatch):
    from edm_fast.train.data import load_digits

    _block(monkeypatch, "sklearn", "sklearn.datasets")
    with pytest.raises(MissingDependency, match="scikit-learn"):
        load_digits()


def test_cli_toy_plot_without_matplotlib_fails_before_sampling(monkeypatch, tmp_path, capsys):
    """A toy .png needs matplotlib: exit 2 with the pip command, and nothing sampled or written;
    the same run to .npz needs nothing more and works."""
    from edm_fast.cli.main import main

    _block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    args = ["sample", "--model", "toy-gmm", "--steps", "4", "--seeds", "0-3"]
    assert main([*args, "--out", str(tmp_path / "toy.png")]) == 2
    captured = capsys.readouterr()
    assert "pip install 'edm-fast[train]'" in captured.err and "samples" not in captured.out
    assert not (tmp_path / "toy.png").exists()
    assert main([*args, "--out", str(tmp_path / "toy.npz")]) == 0
    assert (tmp_path / "toy.npz").stat().st_size > 0


def test_figures_leave_the_backend_alone(monkeypatch, tmp_path):
    """The library's .png plots are drawn on figures of their own: they never switch
    matplotlib's backend (which blanked every later plt.show() in a notebook) and are not
    registered with pyplot (nothing left open for plt.show())."""
    import matplotlib
    import matplotlib.pyplot as plt
    import torch

    from edm_fast.io.samples import plot_toy, save_figure
    from edm_fast.optional import figures

    def refuse(*args, **kwargs):
        raise AssertionError("the backend was switched")

    monkeypatch.setattr(matplotlib, "use", refuse)
    monkeypatch.setattr(plt, "switch_backend", refuse)
    open_before = plt.get_fignums()
    fig, axes = figures("a test").subplots(1, 2, figsize=(4, 2), dpi=50, squeeze=False)
    assert axes.shape == (1, 2)
    axes[0, 0].plot([0, 1])
    assert save_figure(fig, tmp_path / "fig.png").stat().st_size > 0
    assert plot_toy(torch.randn(20, 2), tmp_path / "toy.png").stat().st_size > 0
    assert plt.get_fignums() == open_before


def test_sampling_cli_runs_without_the_serve_and_openvino_extras(tmp_path):
    """`edm-fast sample` (the README's main job) and `--help` of every command build without
    the optional extras: FastAPI, uvicorn, pydantic, prometheus_client, Ray, OpenVINO, ONNX
    Runtime absent (blocked in a fresh interpreter); serve then names its extra."""
    import subprocess

    blocked = ["fastapi", "uvicorn", "pydantic", "prometheus_client", "ray", "openvino",
               "onnxruntime", "starlette", "diffusers"]
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "from edm_fast.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "s.png"
    res = subprocess.run([sys.executable, "-c", code, "sample", "--steps", "2", "--seeds", "0-1",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.exists()
    res = subprocess.run([sys.executable, "-c", code, "serve"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "edm-fast[serve]" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
