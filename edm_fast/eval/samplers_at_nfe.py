"""Sampling at a given NFE: the five samplers of the EDM-versus-DDPM comparison by name.

Samplers (N = number of steps; NFE = denoiser evaluations per sample):

| name       | function (sampling.reference)       | sigma grid                        | NFE    |
|------------|-------------------------------------|-----------------------------------|--------|
| edm_heun   | sample_edm, S_churn = 0 (Alg. 1)    | edm_sigmas, rho = 7 (Eq. 5)       | 2N - 1 |
| edm_euler  | sample_euler (Eq. 4, Euler steps)   | edm_sigmas                        | N      |
| edm_churn  | sample_edm with churn (Alg. 2)      | edm_sigmas                        | 2N - 1 |
| ddpm       | sample_ddpm (Ho et al., Alg. 2)     | ddpm_sigmas (strided t = T-1..0)  | N      |
| ddim       | sample_ddim, eta = 0 (Song et al.)  | ddpm_sigmas                       | N      |

Any denoiser works with any sampler: a DDPM-trained net under ``DDPMPrecond`` (EDM Table 1, VP
row with discrete t) is sampled by EDM's Heun through ``round_sigma``, which snaps every sigma
to the nearest trained level, as EDM does for its iDDPM and VP baselines (Sec. 3, Fig. 2).

Every sample depends on its seed only (``SeedNoise``), not on the batch it was drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..noise import SeedNoise, parse_seeds
from ..precond import DDPMPrecond
from ..sampling.reference import sample_ddim, sample_ddpm, sample_edm, sample_euler
from ..schedules import ddpm_sigmas, edm_sigmas

__all__ = [
    "CHURN",
    "SAMPLER_LABELS",
    "SAMPLER_NAMES",
    "SECOND_ORDER",
    "nfe_for_steps",
    "sample_at_nfe",
    "sigma_grid",
    "steps_for_nfe",
]

SAMPLER_NAMES = ("edm_heun", "edm_euler", "edm_churn", "ddpm", "ddim")
SECOND_ORDER = ("edm_heun", "edm_churn")
SAMPLER_LABELS = {"edm_heun": "EDM Heun", "edm_euler": "EDM Euler", "edm_churn": "EDM Heun+churn",
                  "ddpm": "DDPM ancestral", "ddim": "DDIM"}
# Alg. 2's stochasticity as in the EDM README's ImageNet-64 example (S_churn=40, S_min=0.05,
# S_max=50, S_noise=1.003); gamma_i = min(S_churn/N, sqrt(2)-1) inside [S_min, S_max].
CHURN = {"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLER_NAMES)}")


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Number of steps N giving ``nfe`` evaluations: Heun's last step is Euler (Alg. 1 l.6), so
    NFE = 2N - 1 for the second-order samplers and N for the others."""
    _check_sampler(sampler)
    if sampler in SECOND_ORDER:
        if nfe < 1 or nfe % 2 == 0:
            raise ValueError(f"{sampler} needs an odd NFE (2N - 1), got {nfe}")
        return (nfe + 1) // 2
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    return int(nfe)


def nfe_for_steps(sampler: str, steps: int) -> int:
    """Inverse of ``steps_for_nfe``."""
    _check_sampler(sampler)
    return 2 * steps - 1 if sampler in SECOND_ORDER else int(steps)


def sigma_grid(sampler: str, denoiser, steps: int) -> torch.Tensor:
    """The sigma grid a sampler walks: EDM's rho = 7 steps (Eq. 5) clipped to the denoiser's
    trained range (sigma_min >= 0.002, sigma_max <= 80, Sec. 3), or DDPM's own strided levels
    (its precond's T and betas when it has them, else the standard linear schedule)."""
    _check_sampler(sampler)
    if sampler in ("ddpm", "ddim"):
        precond = getattr(denoiser, "precond", None)
        if isinstance(precond, DDPMPrecond):
            return ddpm_sigmas(steps, precond.num_timesteps, precond.beta_start, precond.beta_end)
        return ddpm_sigmas(steps)
    sigma_min = max(0.002, float(getattr(denoiser, "sigma_min", 0.0)))
    sigma_max = min(80.0, float(getattr(denoiser, "sigma_max", math.inf)))
    return edm_sigmas(steps, sigma_min, sigma_max, rho=7.0)


def _sampler_call(sampler: str, churn: dict) -> tuple[Callable, dict]:
    if sampler == "edm_heun":
        return sample_edm, {}
    if sampler == "edm_churn":
        return sample_edm, dict(churn)
    if sampler == "edm_euler":
        return sample_euler, {}
    if sampler == "ddpm":
        return sample_ddpm, {}
    return sample_ddim, {"eta": 0.0}


@torch.no_grad()
def sample_at_nfe(denoiser, sampler: str, nfe: int, seeds: Sequence[int], shape: Sequence[int],
                  *, class_labels=None, batch: int = 256, churn: dict | None = None,
                  device="cpu", callback: Callable | None = None) -> torch.Tensor:
    """Samples (len(seeds), *shape) float32 from ``denoiser`` with a named sampler at ``nfe``.

    Each batch draws its initial latents and the injected noise from ``SeedNoise`` (one stream
    per seed), so a sample depends on its seed only, not on the batch size.
    """
    steps = steps_for_nfe(sampler, nfe)
    sigmas = sigma_grid(sampler, denoiser, steps)
    fn, options = _sampler_call(sampler, CHURN if churn is None else churn)
    seeds = parse_seeds(seeds)
    labels = None if class_labels is None else torch.as_tensor(class_labels)
    out = []
    for start in range(0, len(seeds), batch):
        noise = SeedNoise(seeds[start:start + batch], shape, device=device)
        batch_labels = None if labels is None else labels[start:start + batch].to(device)
        x = fn(denoiser, noise.draw(), sigmas, class_labels=batch_labels,
               randn=noise.randn_like, callback=callback, **options)
        out.append(x.float().cpu())
    return torch.cat(out)
