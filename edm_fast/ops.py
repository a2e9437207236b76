"""Thin Python side of the C++ extension ``edm_fast._C`` (csrc/): lazy loading and wrappers.

The extension registers ``torch.ops.edm_fast.*`` (schema strings in csrc/ops.cpp) and the class
``torch.classes.edm_fast.Sampler`` (Alg. 2 over an exported denoiser). Nothing here is loaded at
``import edm_fast``; the first call of ``cpp_available()`` or of a wrapper loads it.

``EDM_FAST_DISABLE_CPP=1`` makes ``cpp_available()`` return False (the fallback is the pure
PyTorch reference in ``edm_fast.samplers``). The ops are CompositeImplicitAutograd kernels made
of ATen calls, so they need no fake/meta registration to trace under torch.compile.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

import torch

__all__ = [
    "cpp_available", "load_error", "require_cpp", "edm_sigmas", "churn_gammas", "seed_noise",
    "churn", "euler_step", "heun_correct", "load_sampler",
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


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> torch.Tensor:
    """EDM time steps (Eq. 5) in C++: (num_steps + 1,) float64 on the CPU, the last one 0."""
    return _ops().edm_sigmas(int(num_steps), float(sigma_min), float(sigma_max), float(rho))


def churn_gammas(sigmas: Sequence[float], S_churn: float, S_min: float = 0.0,
                 S_max: float = float("inf")) -> list[float]:
    """gamma_i of Alg. 2 (its caption) in C++ for sigmas t_0..t_N: a list of N floats."""
    values = [float(s) for s in sigmas]
    return _ops().churn_gammas(values, float(S_churn), float(S_min), float(S_max)).tolist()


def seed_noise(seeds: Sequence[int], shape: Sequence[int], draws: int) -> torch.Tensor:
    """``draws`` successive draws of each seed's stream: (draws, N, *shape) float32 on the CPU.

    Draw 0 is the latent, draw k >= 1 the k-th churn draw; equal bit for bit to
    ``edm_fast.noise.SeedNoise(seeds, shape)`` drawn the same number of times. Seeds are
    TorchScript ints here, so 0 .. 2^63 - 1 (``SeedNoise`` and ``Sampler`` take 0 .. 2^64 - 1).
    """
    seeds = [int(s) for s in seeds]
    too_large = next((s for s in seeds if s >= 2**63), None)
    if too_large is not None:  # a TorchScript type error otherwise
        raise ValueError(f"seed {too_large} is >= 2^63, beyond the C++ ops' int64 seeds; "
                         "use edm_fast.Sampler (seeds up to 2^64 - 1) for it")
    return _ops().seed_noise(seeds, [int(n) for n in shape], int(draws))


def churn(x: torch.Tensor, eps: torch.Tensor, t_cur: float, t_hat: float,
          S_noise: float = 1.0) -> torch.Tensor:
    """x_hat = x + sqrt(t_hat^2 - t_cur^2) S_noise eps (Alg. 2 l.6). x, eps: (N, ...)."""
    return _ops().churn(x.contiguous(), eps.contiguous(), float(t_cur), float(t_hat),
                        float(S_noise))


def euler_step(x_hat: torch.Tensor, denoised: torch.Tensor, t_hat: float,
               t_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, d_cur) with d_cur = (x_hat - D)/t_hat, x_next = x_hat + (t_next - t_hat) d_cur
    (Alg. 2 l.7-8). x_hat, denoised: (N, ...), same dtype and device."""
    return _ops().euler_step(x_hat.contiguous(), denoised.contiguous(), float(t_hat),
                             float(t_next))


def heun_correct(x_hat: torch.Tensor, d_cur: torch.Tensor, x_next: torch.Tensor,
                 denoised_next: torch.Tensor, t_hat: float, t_next: float) -> torch.Tensor:
    """x_hat + (t_next - t_hat)(d_cur/2 + d_prime/2), d_prime = (x_next - D')/t_next
    (Alg. 2 l.10-11); ``denoised_next`` = D(x_next; t_next). All (N, ...); needs t_next > 0.
    The arguments come in the order of ``edm_fast.kernels.heun_correct``."""
    return _ops().heun_correct(x_hat.contiguous(), d_cur.contiguous(), x_next.contiguous(),
                               denoised_next.contiguous(), float(t_hat), float(t_next))


def load_sampler(model_path: str | os.PathLike, *, kind: str = "auto",
                 device: str | torch.device = "cpu"):
    """Load an exported denoiser into ``torch.classes.edm_fast.Sampler``.

    kind: 'aoti' (.pt2 from ``export.export_aoti``), 'torchscript' (``export_torchscript``) or
    'auto' (by the file suffix). Methods of the returned object:

    - ``sample(latents (N, *shape), sigmas [t_0..t_N], t_hats [N], gammas [N], S_noise, solver,
      churn_noise (K, N, *shape) | None, class_labels (N, label_dim) float | None,
      guidance float | None) -> (N, *shape)``: Alg. 2 (see csrc/sampler_loop.h);
    - ``sample_seeds(seeds, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max,
      S_noise, solver, class_labels | None, guidance | None) -> (N, *shape)``: schedule, seed
      noise and loop all in C++, as the standalone ``edm_fast_sample`` binary runs them (seeds
      0 .. 2^63 - 1, TorchScript ints);
    - ``denoise(x, sigma (N,), class_labels | None)``: one evaluation of D;
    - ``label_dim()``, ``sample_shape()``, ``device()``, ``kind()``, ``path()``.

    Calls on one Sampler are serialised by a mutex (thread-safe, not concurrent).
    """
    require_cpp()
    return torch.classes.edm_fast.Sampler(os.fspath(model_path), kind, str(torch.device(device)))
