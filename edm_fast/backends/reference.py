"""The reference backend: the pure-PyTorch Algorithm 2 of samplers.py, run on a plan."""

from __future__ import annotations

import torch

from ..guidance import GuidedDenoiser
from ..samplers import run_edm_plan
from .plan import SamplingPlan

__all__ = ["ReferenceBackend", "ChurnNoise"]


class ChurnNoise:
    """The ``randn`` callable of the samplers, replaying pre-drawn churn noise (K, N, ...)."""

    def __init__(self, churn_noise: torch.Tensor | None):
        self.churn_noise, self.next = churn_noise, 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if self.churn_noise is None or self.next >= self.churn_noise.shape[0]:
            raise RuntimeError("the plan asked for more churn noise than was drawn")
        eps = self.churn_noise[self.next]
        self.next += 1
        return eps.to(device=like.device, dtype=like.dtype)


class ReferenceBackend:
    """Runs ``sample_edm`` (EDM Alg. 2) eagerly in the sampler's dtype; the ground truth."""

    name = "reference"

    def __init__(self, denoiser, plan: SamplingPlan, batch_shape, *, dtype, device, label_dim):
        self.plan = plan
        self.dtype, self.device = dtype, device
        self.denoiser = (GuidedDenoiser(denoiser, plan.guidance) if plan.guidance is not None
                         else denoiser)
        self.warmup_seconds = 0.0

    def run(self, latents, churn_noise=None, class_labels=None) -> torch.Tensor:
        plan = self.plan
        return run_edm_plan(self.denoiser, latents.to(self.device, self.dtype), list(plan.sigmas),
                            plan.t_hats, plan.gammas, S_noise=plan.S_noise,
                            class_labels=class_labels, randn=ChurnNoise(churn_noise),
                            solver=plan.solver)
