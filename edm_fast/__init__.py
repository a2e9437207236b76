"""edm-fast: EDM diffusion models (Karras et al. 2022), exact reference and fast samplers.

Importing this package never initialises CUDA and needs neither a GPU nor the compiled
extension: the public names below are imported lazily on first use.
"""

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
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edm_fast' has no attribute {name!r}")
