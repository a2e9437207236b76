"""Thin Python side of the C++ extension ``edm_fast._C`` (csrc/): lazy loading and wrappers.

The extension registers ``torch.ops.edm_fast.seed_noise`` (schema in csrc/ops.cpp) and the class
``torch.classes.edm_fast.Sampler`` (the program executor over an exported denoiser, and
optionally an exported autoguidance guide). Nothing here
is loaded at ``import edm_fast``; the first call of ``cpp_available()`` or of a wrapper loads it.

``EDM_FAST_DISABLE_CPP=1`` makes ``cpp_available()`` return False (the fallback is the pure
PyTorch executor in ``edm_fast.sampling.backends.executor``). The op is a CompositeImplicitAutograd
kernel made of ATen calls, so it needs no fake/meta registration to trace under torch.compile.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

import torch

__all__ = [
    "cpp_available", "load_error", "require_cpp", "seed_noise", "program_args", "load_sampler",
]

_STATE: dict = {}  # "loaded": bool, "error": str | None


def _load() -> bool:
    if "loaded" not in _STATE:
        try:
            importlib.import_module("edm_fast._C")  # runs the TORCH_LIBRARY registration
            _STATE.update(loaded=True, error=None)
        except (ImportError, OSError) as exc:  # not built, or built against another torch
            _STATE.update(loaded=False, error=f"{type(exc).__name__}: {exc}")
    return _STATE["loaded"]


def cpp_available() -> bool:
    """True when the C++ extension loads and ``EDM_FAST_DISABLE_CPP`` is not "1"."""
    if os.environ.get("EDM_FAST_DISABLE_CPP", "0") == "1":
        return False
    return _load()


def load_error() -> str | None:
    """Why the extension is unavailable (None when it loaded or was not tried yet)."""
    if os.environ.get("EDM_FAST_DISABLE_CPP", "0") == "1":
        return "disabled by EDM_FAST_DISABLE_CPP=1"
    _load()
    return _STATE.get("error")


def require_cpp() -> None:
    """Raise a RuntimeError saying how to get the extension when it is unavailable."""
    if not cpp_available():
        raise RuntimeError(
            f"the edm_fast C++ extension is unavailable ({load_error()}); build it with "
            "`EDM_FAST_FORCE_CPP_BUILD=1 python setup.py build_ext --inplace` or "
            "`pip install --no-build-isolation -e .`")


def _ops():
    require_cpp()
    return torch.ops.edm_fast


def seed_noise(seeds: Sequence[int], shape: Sequence[int], draws: int) -> torch.Tensor:
    """``draws`` successive draws of each seed's stream: (draws, N, *shape) float32 on the CPU.

    Draw 0 is the latent, draw k >= 1 the program's (k-1)-th injected noise draw (source
    ``noise_source(k - 1)``); equal bit for bit to
    ``edm_fast.noise.SeedNoise(seeds, shape)`` drawn the same number of times. Seeds are
    TorchScript ints here, so 0 .. 2^63 - 1 (``SeedNoise`` and ``Sampler`` take 0 .. 2^64 - 1).
    """
    seeds = [int(s) for s in seeds]
    too_large = next((s for s in seeds if s >= 2**63), None)
    if too_large is not None:  # a TorchScript type error otherwise
        raise ValueError(f"seed {too_large} is >= 2^63, beyond the C++ ops' int64 seeds; "
                         "use edm_fast.Sampler (seeds up to 2^64 - 1) for it")
    return _ops().seed_noise(seeds, [int(n) for n in shape], int(draws))


def program_args(program) -> tuple:
    """``program`` (``edm_fast.program.Program``) as the arguments the Sampler's ``run_program``
    and ``sample_seeds`` take after their first one: (kinds, dsts, sigmas, guided, term_start,
    srcs, coefs, num_registers, output, num_noise)."""
    a = program.arrays()
    return (a["kinds"], a["dsts"], [float(v) for v in a["sigmas"]], a["guided"],
            a["term_start"], a["srcs"], [float(v) for v in a["coefs"]], a["num_registers"],
            a["output"], a["num_noise"])


def load_sampler(model_path: str | os.PathLike, *, kind: str = "auto",
                 device: str | torch.device = "cpu", guide: str | os.PathLike | None = None,
                 guide_kind: str = "auto"):
    """Load an exported denoiser into ``torch.classes.edm_fast.Sampler``.

    kind: 'aoti' (.pt2 from ``export.export_aoti``), 'torchscript' (``export_torchscript``) or
    'auto' (by the file suffix). guide: an exported autoguidance guide (Karras et al. 2024,
    arXiv 2406.02507) of the same task, loaded with ``load_guide(guide, guide_kind)``.
    Methods of the returned object:

    - ``run_program(latents (N, *shape), *program_args(program), noise (K, N, *shape) | None,
      class_labels (N, label_dim) float | None, guidance float | None) -> (N, *shape)``: the
      program (``edm_fast.program``) through the C++ executor (csrc/program_executor.h), with
      K = program.num_noise and guidance at the evaluations the program flags guided:
      classifier-free (one batch of 2N, labels then zero labels), or with a guide loaded
      autoguidance D_g + w (D - D_g) (Eq. 1; both networks on the N samples, same labels);
    - ``load_guide(path, kind)``: load the guide (same device; the same dtype, sample shape and
      label_dim as the model, else a RuntimeError naming what differs); replaces an earlier one;
    - ``has_guide()``, ``guide_path()`` ('' without a guide);
    - ``sample_seeds(seeds, *program_args(program), class_labels | None, guidance | None)
      -> (N, *shape)``: seed noise (latent, then K draws per seed) and program all in C++, as
      the standalone ``edm_fast_sample`` binary runs them (seeds 0 .. 2^63 - 1, TorchScript
      ints);
    - ``denoise(x, sigma (N,), class_labels | None)``: one evaluation of D;
    - ``label_dim()``, ``sample_shape()``, ``device()``, ``kind()``, ``path()``.

    Calls on one Sampler are serialised by a mutex (thread-safe, not concurrent).
    """
    require_cpp()
    sampler = torch.classes.edm_fast.Sampler(os.fspath(model_path), kind,
                                             str(torch.device(device)))
    if guide is not None:
        sampler.load_guide(os.fspath(guide), guide_kind)
    return sampler
