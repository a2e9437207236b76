"""The classic EMA of the weights with a half-life in images and a ramp-up (EDM App. F.3).
EDM2's power-function EMA: phema.py and edm2.PowerEMATracker."""

from __future__ import annotations

import copy

import torch

__all__ = ["EMA"]


class EMA:
    """theta_ema <- beta theta_ema + (1 - beta) theta, beta = 0.5^(batch / half-life) (App. F.3)."""

    def __init__(self, model: torch.nn.Module, halflife_kimg: float, rampup_ratio: float | None):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_nimg = halflife_kimg * 1000
        self.rampup_ratio = rampup_ratio

    @torch.no_grad()
    def update(self, model: torch.nn.Module, nimg: int, batch: int) -> None:
        """One EMA step after a batch of ``batch`` images; ``nimg`` counts the images trained on
        before it (NVlabs' cur_nimg at its update), so the first update copies the weights."""
        halflife = self.halflife_nimg
        if self.rampup_ratio is not None:
            halflife = min(halflife, nimg * self.rampup_ratio)
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
