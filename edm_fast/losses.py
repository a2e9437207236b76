"""Training losses: EDM (Sec. 5, Eq. 8), VP and VE (Song et al. 2021), DDPM's epsilon loss, and
EDM2's uncertainty-weighted loss (Karras et al. 2024, Eq. 21).

Each loss is called as ``loss(denoiser, images, labels=None, augment_labels=None,
generator=None)`` and returns the per-element loss (N, ...) to be averaged by the caller.
Notation as in EDM Eq. 2/8: y the clean sample, n ~ N(0, sigma^2 I), lambda(sigma) the weight.
"""

from __future__ import annotations

import torch

from .precond import DDPMPrecond, vp_sigma

__all__ = ["EDMLoss", "VPLoss", "VELoss", "DDPMLoss", "EDM2Loss", "LOSSES", "make_loss"]


def _randn(shape, like: torch.Tensor, generator):
    return torch.randn(shape, device=like.device, dtype=like.dtype, generator=generator)


def _rand(shape, like: torch.Tensor, generator):
    return torch.rand(shape, device=like.device, dtype=like.dtype, generator=generator)


def _weighted_denoising_loss(denoiser, y, sigma, weight, noise, labels, augment_labels):
    """lambda(sigma) ||D(y + n; sigma) - y||^2 per element (EDM Eq. 2 weighted as in Eq. 8),
    n = sigma * noise with noise ~ N(0, I) drawn by the caller."""
    shape = (-1, *([1] * (y.ndim - 1)))
    n = noise * sigma.reshape(shape)
    D_yn = denoiser(y + n, sigma, labels, augment_labels)
    return weight.reshape(shape) * (D_yn - y) ** 2


class _DrawnLoss:
    """A loss in two halves: ``draw`` takes every random number of a batch (per-sample tensors,
    first dimension N), ``given`` computes the loss of any slice of the batch from its slice of
    the draws. Gradient accumulation (train --batch-gpu) draws for the whole batch, then splits,
    so the accumulated gradient equals the full batch's."""

    def draw(self, denoiser, images, generator=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def given(self, denoiser, images, labels, augment_labels, drawn) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, denoiser, images, labels=None, augment_labels=None, generator=None):
        return self.given(denoiser, images, labels, augment_labels,
                          self.draw(denoiser, images, generator))


class EDMLoss(_DrawnLoss):
    """EDM's loss: ln(sigma) ~ N(P_mean, P_std^2), lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2.

    With c_out of Eq. 7 this makes the effective weight lambda c_out^2 = 1 (App. B.6), so the
    expected loss is ~1 at initialisation and ~0.3-0.5 for a trained image model.
    """

    name = "edm"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)

    def sample_sigma(self, n: int, like: torch.Tensor, generator=None) -> torch.Tensor:
        return (_randn((n,), like, generator) * self.P_std + self.P_mean).exp()  # Table 1, p_train

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd2 = self.sigma_data**2
        return (sigma**2 + sd2) / (sigma * self.sigma_data) ** 2  # Table 1, lambda(sigma)

    def draw(self, denoiser, images, generator=None):
        sigma = self.sample_sigma(images.shape[0], images, generator)
        return {"sigma": sigma, "noise": _randn(images.shape, images, generator)}

    def given(self, denoiser, images, labels, augment_labels, drawn):
        sigma = drawn["sigma"]
        return _weighted_denoising_loss(denoiser, images, sigma, self.weight(sigma),
                                        drawn["noise"], labels, augment_labels)

    def config(self) -> dict:
        return {"name": self.name, "P_mean": self.P_mean, "P_std": self.P_std,
                "sigma_data": self.sigma_data}


class VPLoss(_DrawnLoss):
    """VP loss (Table 1): t ~ U(eps_t, 1), sigma = sigma_vp(t), lambda = 1/sigma^2."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d, self.beta_min = float(beta_d), float(beta_min)
        self.epsilon_t = float(epsilon_t)

    def draw(self, denoiser, images, generator=None):
        t = 1 + _rand((images.shape[0],), images, generator) * (self.epsilon_t - 1)
        sigma = vp_sigma(t, self.beta_d, self.beta_min).to(images.dtype)
        return {"sigma": sigma, "noise": _randn(images.shape, images, generator)}

    def given(self, denoiser, images, labels, augment_labels, drawn):
        sigma = drawn["sigma"]
        return _weighted_denoising_loss(denoiser, images, sigma, 1 / sigma**2, drawn["noise"],
                                        labels, augment_labels)

    def config(self) -> dict:
        return {"name": self.name, "beta_d": self.beta_d, "beta_min": self.beta_min,
                "epsilon_t": self.epsilon_t}


class VELoss(_DrawnLoss):
    """VE loss (Table 1): ln(sigma) ~ U(ln sigma_min, ln sigma_max), lambda = 1/sigma^2."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def draw(self, denoiser, images, generator=None):
        u = _rand((images.shape[0],), images, generator)
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** u
        return {"sigma": sigma, "noise": _randn(images.shape, images, generator)}

    def given(self, denoiser, images, labels, augment_labels, drawn):
        sigma = drawn["sigma"]
        return _weighted_denoising_loss(denoiser, images, sigma, 1 / sigma**2, drawn["noise"],
                                        labels, augment_labels)

    def config(self) -> dict:
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class DDPMLoss(_DrawnLoss):
    """DDPM's simple loss (Ho et al. 2020, Eq. 14, Alg. 1): t ~ U{0..T-1}, eps ~ N(0, I),
    x_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps, loss ||eps - eps_theta(x_t, t)||^2.

    The denoiser must use ``DDPMPrecond``; eps_theta is its raw network F evaluated at
    (c_in x, c_noise) = (x_t, t), so the same net trains with EDMLoss or with this loss.
    """

    name = "ddpm"

    @staticmethod
    def _precond(denoiser) -> DDPMPrecond:
        precond = getattr(denoiser, "precond", None)
        if not isinstance(precond, DDPMPrecond):
            raise ValueError("DDPMLoss needs a Denoiser with DDPMPrecond (precond='ddpm')")
        return precond

    def draw(self, denoiser, images, generator=None):
        t = torch.randint(0, self._precond(denoiser).num_timesteps, (images.shape[0],),
                          device=images.device, generator=generator)
        return {"t": t, "eps": _randn(images.shape, images, generator)}

    def given(self, denoiser, images, labels, augment_labels, drawn):
        precond = self._precond(denoiser)
        n, t, eps = images.shape[0], drawn["t"], drawn["eps"]
        abar = precond.alpha_bars.to(images.device, images.dtype)[t]
        abar = abar.reshape(-1, *([1] * (images.ndim - 1)))
        x_t = abar.sqrt() * images + (1 - abar).sqrt() * eps  # Ho et al. Eq. 4
        net_labels = denoiser.labels(labels, n, images.device, images.dtype)
        eps_pred = denoiser.model(x_t, t.to(images.dtype), net_labels, augment_labels)
        return (eps - eps_pred) ** 2

    def config(self) -> dict:
        return {"name": self.name}


class EDM2Loss(EDMLoss):
    """EDM2's loss with learned uncertainty (Karras et al. 2024, arXiv 2312.02696, Eq. 21):
    ln(sigma) ~ N(P_mean, P_std^2) and, per element,
        lambda(sigma) / exp(u(sigma)) ||D(y + n; sigma) - y||^2 + u(sigma),
    lambda as in EDM; u is the log-variance head of the EDM2 network, learned jointly. For a
    fixed sigma the optimum u* = ln E[lambda ||D - y||^2] gives the loss 1 + u*, so u tracks
    the log of the (weighted) loss at each noise level and rebalances them.

    The denoiser must be an ``edm_fast.nets.edm2_precond.EDM2Denoiser`` (or a DDP wrapper around one):
    it returns (D, u) when called with ``return_logvar=True``. Defaults: the paper's ImageNet-512
    P_mean = -0.4, P_std = 1.0 (ImageNet-64: -0.8, 1.6).
    """

    name = "edm2"

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)

    def given(self, denoiser, images, labels, augment_labels, drawn):
        target = getattr(denoiser, "module", denoiser)  # DistributedDataParallel -> module
        if not callable(getattr(target, "logvar", None)):
            raise ValueError("the EDM2 loss needs an EDM2 denoiser with its log-variance head "
                             "(edm_fast.nets.edm2_precond.EDM2Denoiser, arch 'edm2')")
        if augment_labels is not None:
            raise ValueError("EDM2 networks take no augmentation labels")
        sigma = drawn["sigma"]  # drawn as EDMLoss draws: sigma, then the noise
        shape = (-1, *([1] * (images.ndim - 1)))
        n = drawn["noise"] * sigma.reshape(shape)
        D_yn, logvar = denoiser(images + n, sigma, labels, None, return_logvar=True)
        weight = self.weight(sigma).reshape(shape)
        return weight / logvar.exp() * (D_yn - images) ** 2 + logvar  # Eq. 21


LOSSES = {cls.name: cls for cls in (EDMLoss, VPLoss, VELoss, DDPMLoss, EDM2Loss)}


def make_loss(config: dict | str):
    """Build a loss from its name or its config() dict."""
    if isinstance(config, str):
        config = {"name": config}
    config = dict(config)
    name = config.pop("name", None)
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name](**config)
