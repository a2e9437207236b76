"""EDM2's denoiser: EDM preconditioning around the magnitude-preserving U-Net, plus the learned
log-variance u(sigma) of the uncertainty-weighted loss (Karras et al. 2024, arXiv 2312.02696,
Sec. 2 and Eq. 21).

D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma)/4) with EDM's coefficients (EDM Eq. 7,
sigma_data = 0.5), exactly as NVlabs/edm2's ``Precond``; u(sigma) = logvar_linear(
logvar_fourier(ln(sigma)/4)) is only needed for training (``EDM2Loss``): sampling uses any
``Denoiser`` holding an ``EDM2Net``.
"""

from __future__ import annotations

import torch

from .edm2 import EDM2Net
from ..precond import Denoiser, EDMPrecond

__all__ = ["EDM2Denoiser", "make_edm2_denoiser", "bake_for_inference"]


class EDM2Denoiser(Denoiser):
    """A ``Denoiser`` whose network is an ``EDM2Net``; ``forward(..., return_logvar=True)``
    returns (D, u) with u shaped (N, 1, ..., 1) (Eq. 21)."""

    def __init__(self, model: EDM2Net, precond: EDMPrecond | None = None, **kwargs):
        if not isinstance(model, EDM2Net):
            raise TypeError(f"EDM2Denoiser needs an EDM2Net, got {type(model).__name__}")
        precond = EDMPrecond() if precond is None else precond
        if not isinstance(precond, EDMPrecond):
            raise ValueError(f"EDM2 uses EDM's preconditioning, got {precond.name!r}")
        super().__init__(model, precond, **kwargs)

    def logvar(self, sigma) -> torch.Tensor:
        """u(sigma): (N,) -> (N,), in float32 or sigma's wider dtype."""
        sigma = torch.as_tensor(sigma)
        c_noise = self.precond.coefficients(sigma.reshape(-1))[3]
        return self.model.logvar(c_noise.to(torch.promote_types(c_noise.dtype, torch.float32)))

    def forward(self, x, sigma, class_labels=None, augment_labels=None, return_logvar=False):
        D = super().forward(x, sigma, class_labels, augment_labels)
        if not return_logvar:
            return D
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1)
        u = self.logvar(sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma)
        return D, u.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def make_edm2_denoiser(preset: str = "tiny-edm2", *, sigma_data: float = 0.5,
                       **build_kwargs) -> EDM2Denoiser:
    """An EDM2Denoiser around ``build_net(preset, **build_kwargs)`` (img_resolution,
    img_channels, label_dim, and constructor overrides such as dropout)."""
    from .presets import build_net, get_preset

    if get_preset(preset).arch != "edm2":
        raise ValueError(f"preset {preset!r} is not an EDM2 network")
    return EDM2Denoiser(build_net(preset, **build_kwargs), EDMPrecond(sigma_data=sigma_data))


def bake_for_inference(denoiser):
    """Bake the weight normalisation of an EDM2 network once (``EDM2Net.bake_weights``); any
    other model is returned unchanged. Returns the denoiser."""
    model = getattr(denoiser, "model", None)
    if isinstance(model, EDM2Net):
        model.bake_weights()
    return denoiser
