"""Autoguidance test helpers: a worse copy of a denoiser as the guide of the same task."""

import copy

import torch


def perturbed(denoiser, seed: int = 1):
    """A worse copy of ``denoiser``: weights shrunk by 10% plus N(0, 0.02^2) noise."""
    guide = copy.deepcopy(denoiser)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.parameters():
            p.mul_(0.9).add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return guide
