"""Optional dependencies (the ``train`` extra: scikit-learn, matplotlib): one clear error that
names the package and the extra which installs it, instead of a ModuleNotFoundError deep in a
command that has already sampled or loaded data."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["Figures", "MissingDependency", "figures", "pyplot", "require"]

# import name -> (pip name, extra of edm-fast that installs it)
_PACKAGES = {"sklearn": ("scikit-learn", "train"), "matplotlib": ("matplotlib", "train"),
             "diffusers": ("diffusers", "vae")}


class MissingDependency(ImportError):
    """An optional package is not installed; the message says how to install it."""

    exit_code = 2  # the CLI prints the message as one line (edm_fast.errors)


def require(module: str, purpose: str) -> ModuleType:
    """``import module`` or raise MissingDependency naming ``purpose`` and the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        package, extra = _PACKAGES.get(top, (top, None))
        hint = f"pip install 'edm-fast[{extra}]' (or pip install {package})" if extra else \
            f"pip install {package}"
        raise MissingDependency(f"{purpose} needs {package}, which is not installed: "
                                f"{hint}") from exc


class Figures:
    """The figure-making part of ``matplotlib.pyplot`` (``subplots``, ``figure``, ``close``) for
    files only: each figure is a ``matplotlib.figure.Figure`` on its own Agg canvas, not
    registered with pyplot. Nothing switches matplotlib's backend, so the library works
    headless and an interactive session (Jupyter's inline backend, a GUI window) keeps its own:
    a later ``plt.show()`` still shows. Write a figure with ``fig.savefig`` (or
    ``edm_fast.io.samples.save_figure``)."""

    def __init__(self, matplotlib: ModuleType):
        self.matplotlib = matplotlib

    def figure(self, figsize=None, dpi=None, **kwargs):
        """A new Figure (pyplot.figure's size options) with an Agg canvas."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, dpi=dpi, **kwargs)
        FigureCanvasAgg(fig)
        return fig

    def subplots(self, nrows: int = 1, ncols: int = 1, *, sharex=False, sharey=False,
                 squeeze: bool = True, width_ratios=None, height_ratios=None, subplot_kw=None,
                 gridspec_kw=None, **fig_kw):
        """(fig, axes) as ``pyplot.subplots`` returns them, on an unregistered Figure."""
        fig = self.figure(**fig_kw)
        axes = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=squeeze,
                            width_ratios=width_ratios, height_ratios=height_ratios,
                            subplot_kw=subplot_kw, gridspec_kw=gridspec_kw)
        return fig, axes

    @staticmethod
    def close(fig) -> None:
        """Release ``fig``: only a figure that pyplot manages (made by the caller's own
        ``plt``) needs closing; figures from this object are freed with their last reference."""
        import sys

        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None and getattr(getattr(fig, "canvas", None), "manager", None) is not None:
            plt.close(fig)


def figures(purpose: str = "plotting") -> Figures:
    """Figures for writing image files (see ``Figures``), or MissingDependency without
    matplotlib."""
    matplotlib = require("matplotlib", purpose)
    require("matplotlib.figure", purpose)
    return Figures(matplotlib)


def pyplot(purpose: str = "plotting") -> Figures:
    """Kept for callers written against pyplot: the same as ``figures``. It used to switch the
    whole process to the Agg backend, which left every later ``plt.show()`` in a notebook
    blank; it now never touches the backend."""
    return figures(purpose)
