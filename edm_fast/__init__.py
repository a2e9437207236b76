"""edm-fast: EDM diffusion models (Karras et al. 2022), exact reference and fast samplers.

Importing this package never initialises CUDA and needs neither a GPU nor the compiled
extension: the public names below are imported lazily on first use.

Layers (each subpackage's docstring says what lives there and what it may import):
    core          the top-level modules: preconditioning, schedules, the plan and its program,
                  the solvers' planners, noise, guidance, losses, precision, device, errors
    nets/         the networks (SongUNet, DhariwalUNet, EDM2, MLP) and the exact toy denoiser
    kernels/      fused Triton ops, each with its pure-PyTorch twin
    io/           checkpoints, official snapshots, exports, sample writers
    sampling/     reference samplers, ``Sampler`` and its backends
    train/        the training loop, data, augmentation, EMA
    eval/         comparison, metrics, benchmark (the library never imports it)
    serve/        the HTTP server and its Ray Serve deployment
    cli/          the ``edm-fast`` command
Imports flow downwards only: cli, serve > eval > train > sampling > io > nets, kernels > core.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__version__ = "0.1.0"

_LAZY = {
    "Sampler": ("edm_fast.sampling.sampler", "Sampler"),
    "Denoiser": ("edm_fast.precond", "Denoiser"),
    "EDMPrecond": ("edm_fast.precond", "EDMPrecond"),
    "SeedNoise": ("edm_fast.noise", "SeedNoise"),
    "edm_sigmas": ("edm_fast.schedules", "edm_sigmas"),
    "sample_edm": ("edm_fast.sampling.reference", "sample_edm"),
    "load_denoiser": ("edm_fast.io.models", "load_denoiser"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edm_fast' has no attribute {name!r}")


# Module paths of 0.1.0, before the package had layers: importing one still works (one
# DeprecationWarning) and gives a view of the module at its new place. Removed in 0.3.
_MOVED = {
    "toy": "nets.toy", "precond_edm2": "nets.edm2_precond", "samplers": "sampling.reference",
    "sampler": "sampling.sampler", "ops": "sampling.cpp_extension",
    "backends": "sampling.backends", "checkpoints": "io.checkpoints", "official": "io.official",
    "official_edm2": "io.official_edm2", "models": "io.models", "images": "io.samples",
    "export": "io.export", "onnx_export": "io.onnx_export",
    "openvino_export": "io.openvino_export", "onnx_check": "io.onnx_check",
    "trusted_exports": "io.trusted_exports", "exported": "io.exported",
    "program_file": "io.program_file", "train_edm2": "train.edm2", "train_memory": "train.memory",
    "data": "train.data", "augment": "train.augment", "distributed": "train.distributed",
    "phema": "train.phema", "phema_snapshots": "train.phema_snapshots", "compare": "eval.compare",
    "metrics": "eval.metrics", "trajectories": "eval.trajectories", "benchmark": "eval.benchmark",
    "fid": "eval.fid", "feature_nets": "eval.feature_nets", "metric_images": "eval.metric_images",
    "cli_compare": "cli.compare", "cli_convert": "cli.convert",
    "cli_export": "cli.export", "cli_metrics": "cli.metrics", "cli_phema": "cli.phema",
    "cli_sampling": "cli.sampling_options", "cli_serve": "cli.serve",
}


def _new_location(fullname: str) -> str | None:
    """The module that an old path (or a module below an old package path) now is."""
    parts = fullname.split(".")
    if len(parts) < 2 or parts[0] != __name__ or parts[1] not in _MOVED:
        return None
    return ".".join([__name__, _MOVED[parts[1]], *parts[2:]])


class _MovedModule(types.ModuleType):
    """An old module path: attribute reads go to the module at its new place."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(_new_location(self.__name__)), name)

    def __dir__(self):
        return dir(importlib.import_module(_new_location(self.__name__)))


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        new = _new_location(fullname)
        target = None if new is None else importlib.util.find_spec(new)
        if target is None:
            return None
        return importlib.util.spec_from_loader(
            fullname, self, is_package=target.submodule_search_locations is not None)

    def create_module(self, spec):
        return _MovedModule(spec.name)

    def exec_module(self, module):
        new = _new_location(module.__name__)
        warnings.warn(f"{module.__name__} moved to {new}; the old path will be removed in "
                      "edm-fast 0.3", DeprecationWarning, stacklevel=3)
        importlib.import_module(new)


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
