"""The reference backend: the Python executor over the eager denoiser, in the sampler's dtype
(float64 gives the golden reference)."""

from __future__ import annotations

from ...guidance import Guidance
from ...plan import SamplingPlan
from ..network_precision import network_in_dtype
from .executor import SigmaVectorCache, run_program, unwrap_guided

__all__ = ["ReferenceBackend"]


class ReferenceBackend:
    """Runs ``plan.program`` eagerly: every evaluation is one call of the denoiser module
    (with ``net_dtype``, of a copy whose network runs in that precision); an autoguidance
    ``guide`` runs the same way."""

    name = "reference"

    def __init__(self, denoiser, plan: SamplingPlan, batch_shape, *, dtype, device, label_dim,
                 net_dtype=None, guide=None):
        denoiser, self.plan = unwrap_guided(denoiser, plan)
        self.denoiser = network_in_dtype(denoiser, net_dtype)
        self.guide = None if guide is None else network_in_dtype(guide, net_dtype)
        self.dtype, self.device = dtype, device
        self.guidance = Guidance(self.plan.guidance, guide=self.guide)
        self.sigmas = SigmaVectorCache(self.plan.program, dtype, device)
        self.warmup_seconds = 0.0

    def run(self, latents, noise=None, class_labels=None):
        """Sample from ``latents`` (N, ...) with the plan's injected draws ``noise`` (K, N, ...)
        and (N, label_dim) float ``class_labels`` (or None)."""
        latents = latents.to(self.device, self.dtype)
        noise = None if noise is None else noise.to(self.device, self.dtype)
        labels = None if class_labels is None else class_labels.to(self.device)
        return run_program(self.plan.program, self.denoiser, latents, noise, labels,
                           guidance=self.guidance, sigmas=self.sigmas(latents.shape[0]))
