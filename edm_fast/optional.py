"""Optional dependencies (the ``train`` extra: scikit-learn, matplotlib): one clear error that
names the package and the extra which installs it, instead of a ModuleNotFoundError deep in a
command that has already sampled or loaded data."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "pyplot", "require"]

# import name -> (pip name, extra of edm-fast that installs it)
_PACKAGES = {"sklearn": ("scikit-learn", "train"), "matplotlib": ("matplotlib", "train")}


class MissingDependency(ImportError):
    """An optional package is not installed; the message says how to install it."""


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


def pyplot(purpose: str = "plotting") -> ModuleType:
    """matplotlib.pyplot on the non-interactive Agg backend (files only, no display needed)."""
    matplotlib = require("matplotlib", purpose)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
