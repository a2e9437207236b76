"""Preconditioning: the denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM Eq. 7).

The four parameterisations of EDM Table 1 ("Network and preconditioning" rows), plus DDPM's
discrete linear-beta schedule (Ho et al. 2020) written in the same form for the DDPM baseline:

| precond | c_skip          | c_out               | c_in              | c_noise                 |
|---------|-----------------|---------------------|-------------------|-------------------------|
| VP      | 1               | -s                  | 1/sqrt(s^2+1)     | (M-1) sigma_vp^-1(s)    |
| VE      | 1               | s                   | 1                 | ln(s/2)                 |
| iDDPM   | 1               | -s                  | 1/sqrt(s^2+1)     | M-1-argmin_j |u_j - s|  |
| EDM     | sd^2/(s^2+sd^2) | s sd/sqrt(s^2+sd^2) | 1/sqrt(s^2+sd^2)  | ln(s)/4                 |
| DDPM    | 1               | -s                  | 1/sqrt(s^2+1)     | argmin_t |sigma_t - s|  |

(s = sigma, sd = sigma_data.) A ``Precond`` holds only this scalar math; ``Denoiser`` wraps a
raw network F
(registered as ``model``, so its state-dict keys are ``model.*`` as in the official checkpoints)
into D(x; sigma, class_labels).
"""

from __future__ import annotations

import copy
import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .errors import EdmFastError
from .guidance import GuidedDenoiser, one_hot_labels

__all__ = [
    "Precond", "EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "DDPMPrecond",
    "Denoiser", "PRECONDS", "make_precond", "vp_sigma", "vp_sigma_inv", "ddpm_alpha_bars",
    "NotADenoiserError", "require_denoiser", "DenoiserModule",
]


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1):
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1, VP: schedule
    sigma(t))."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return (0.5 * beta_d * t**2 + beta_min * t).expm1().sqrt()


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1):
    """Inverse of vp_sigma: t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min)/beta_d."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return ((beta_min**2 + 2 * beta_d * sigma.square().log1p()).sqrt() - beta_min) / beta_d


def ddpm_alpha_bars(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for DDPM's linear beta schedule (Ho et al. 2020)."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def _nearest(levels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a 1-D table ``levels`` for every element of ``sigma``."""
    flat = sigma.reshape(-1, 1).to(levels.device, torch.float64)
    return (flat - levels.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)


class Precond:
    """Base class: the scalar functions of EDM Table 1 for one parameterisation."""

    name = "base"
    sigma_data = 0.5
    sigma_min = 0.0
    sigma_max = float("inf")

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise), each shaped like sigma and in sigma's dtype."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        """Map sigma to a level the network was trained on (identity for continuous sigma)."""
        return torch.as_tensor(sigma)

    def config(self) -> dict:
        """JSON-serialisable constructor arguments (for checkpoints)."""
        return {"name": self.name}


class EDMPrecond(Precond):
    """EDM preconditioning (EDM Sec. 5, Eq. 7, Table 1 "ours"; derivation in App. B.6)."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.0,
                 sigma_max: float = float("inf")):
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def coefficients(self, sigma):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)  # Eq. 7 / App. B.6 Eq. 131
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def config(self):
        return {"name": self.name, "sigma_data": self.sigma_data, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max}


class VPPrecond(Precond):
    """Variance-preserving preconditioning of Song et al. 2021 (EDM Table 1, "VP")."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000,
                 epsilon_t: float = 1e-5):
        self.beta_d, self.beta_min = float(beta_d), float(beta_min)
        self.M, self.epsilon_t = int(M), float(epsilon_t)
        self.sigma_min = float(vp_sigma(epsilon_t, beta_d, beta_min))
        self.sigma_max = float(vp_sigma(1.0, beta_d, beta_min))
        self.sigma_data = 0.5

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min).to(sigma.dtype)
        return c_skip, c_out, c_in, c_noise

    def config(self):
        return {"name": self.name, "beta_d": self.beta_d, "beta_min": self.beta_min,
                "M": self.M, "epsilon_t": self.epsilon_t}


class VEPrecond(Precond):
    """Variance-exploding preconditioning of Song et al. 2021 (EDM Table 1, "VE")."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data = 0.5

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class _DiscretePrecond(Precond):
    """VP-type preconditioning over a finite table of trained noise levels ``levels`` (M,)."""

    levels: torch.Tensor  # increasing in the network's time index t = 0 .. M-1

    def timestep(self, sigma):
        """The integer time index t of the nearest trained level."""
        return _nearest(self.levels, torch.as_tensor(sigma))

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        return self.levels.to(sigma.device)[self.timestep(sigma)].to(sigma.dtype)

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.timestep(sigma).to(sigma.device, sigma.dtype)
        return c_skip, c_out, c_in, c_noise


class iDDPMPrecond(_DiscretePrecond):
    """Improved DDPM (Nichol & Dhariwal 2021) preconditioning (EDM Table 1, "iDDPM").

    u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) - 1),
    abar_j = sin^2(pi/2 * j / (M (C_2 + 1))); c_noise = M - 1 - argmin_j |u_j - sigma|.
    ``levels[t] = u_{M-1-t}`` so the network's time index is t.
    """

    name = "iddpm"

    def __init__(self, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000):
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        self.u = self._u_table()  # (M + 1,), u[j] for j = 0..M, decreasing
        self.levels = self.u[:-1].flip(0)  # levels[t] = u_{M-1-t}
        self._levels_and_zero = self.u.flip(0)  # [u_M = 0, u_{M-1}, ..., u_0]
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])
        self.sigma_data = 0.5

    def _u_table(self) -> torch.Tensor:
        def alpha_bar(j):
            return math.sin(0.5 * math.pi * j / self.M / (self.C_2 + 1)) ** 2

        u = torch.zeros(self.M + 1, dtype=torch.float64)
        for j in range(self.M, 0, -1):
            ratio = max(alpha_bar(j - 1) / alpha_bar(j), self.C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        return u

    def timestep(self, sigma):
        """c_noise = M - 1 - argmin_j |u_j - sigma| over j = 0 .. M (Table 1), so u_M = 0 is a
        candidate too: sigma below u_{M-1} / 2 gets c_noise = -1 and rounds to 0, as in the
        paper and NVlabs' iDDPMPrecond (samplers never go there: sigma_min = u_{M-1})."""
        return _nearest(self._levels_and_zero, torch.as_tensor(sigma)) - 1

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        table = self._levels_and_zero.to(sigma.device)
        return table[self.timestep(sigma) + 1].to(sigma.dtype)

    def config(self):
        return {"name": self.name, "C_1": self.C_1, "C_2": self.C_2, "M": self.M}


class DDPMPrecond(_DiscretePrecond):
    """DDPM (Ho et al. 2020) epsilon-prediction in the EDM form, over its discrete schedule.

    x_t = sqrt(abar_t) (y + sigma_t n) with sigma_t = sqrt((1 - abar_t) / abar_t): the network
    sees c_in x = x_t and predicts the noise, D = x - sigma F (EDM Table 1, VP row, discrete t).
    """

    name = "ddpm"

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_timesteps = int(num_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.alpha_bars = ddpm_alpha_bars(num_timesteps, beta_start, beta_end)
        self.levels = ((1 - self.alpha_bars) / self.alpha_bars).sqrt()  # sigma_t, increasing in t
        self.sigma_min = float(self.levels[0])
        self.sigma_max = float(self.levels[-1])
        self.sigma_data = 0.5

    def config(self):
        return {"name": self.name, "num_timesteps": self.num_timesteps,
                "beta_start": self.beta_start, "beta_end": self.beta_end}


PRECONDS = {cls.name: cls for cls in (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond, DDPMPrecond)}


def make_precond(config: dict | str) -> Precond:
    """Build a Precond from its name or from the dict returned by ``Precond.config()``."""
    if isinstance(config, str):
        config = {"name": config}
    config = dict(config)
    name = config.pop("name", None)
    if name not in PRECONDS:
        raise ValueError(f"unknown preconditioning {name!r}; choose from {sorted(PRECONDS)}")
    return PRECONDS[name](**config)


def _broadcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N,) -> (N, 1, ..., 1) with ndim dimensions in all."""
    return v.reshape(-1, *([1] * (ndim - 1)))


@runtime_checkable
class DenoiserModule(Protocol):
    """The contract every evaluator, export and ``Sampler`` relies on: a module in NVlabs' form.

    Required: ``forward(x, sigma, class_labels=None)`` returning D(x; sigma) with x (N, C, H, W)
    (or (N, D)), sigma (N,) and class_labels (N, label_dim) float or None; ``label_dim`` (0:
    unconditional), ``img_channels``, ``img_resolution``. Optional, with defaults: ``sigma_min``
    and ``sigma_max`` (0.002 and 80, the range a sampler's grid spans), ``round_sigma``
    (identity: a discrete-time net maps sigma to its nearest trained level, EDM Table 1), and
    ``sample_shape`` for data that is not an image (the exact toy denoiser). ``Denoiser`` is
    one such module; a user's NVlabs ``EDMPrecond`` satisfies it as it is. What only a model's
    file knows travels beside it in a model card (``edm_fast.io.model_card``).
    """

    label_dim: int
    img_channels: int
    img_resolution: int

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor: ...


class Denoiser(nn.Module):
    """D(x; sigma, labels) = c_skip x + c_out F(c_in x; c_noise, labels) (EDM Eq. 7).

    Args:
        model: the raw network F(x, noise_labels, class_labels, augment_labels).
        precond: one of the Precond classes above (default EDM with sigma_data = 0.5).
        label_dim: number of classes (0 = unconditional); defaults to ``model.label_dim``.
        net_dtype: dtype the network runs in (default: the dtype of its parameters).

    forward(x: (N, ...), sigma: float or (N,), class_labels: None, (N,) int or (N, label_dim)
    float) returns D in x's dtype; the c_* coefficients are computed in x's dtype, so a float64
    x gives the float64 reference step math around a float32 network.
    """

    def __init__(self, model: nn.Module, precond: Precond | None = None, *,
                 label_dim: int | None = None, net_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.precond = precond if precond is not None else EDMPrecond()
        self.label_dim = int(label_dim if label_dim is not None else getattr(model, "label_dim", 0))
        self.net_dtype = net_dtype

    @property
    def img_channels(self) -> int:
        """The network's (DenoiserModule); an AttributeError for a vector network (nets.MLP)."""
        return self.model.img_channels

    @property
    def img_resolution(self) -> int:
        return self.model.img_resolution

    @property
    def sigma_data(self) -> float:
        return self.precond.sigma_data

    @property
    def sigma_min(self) -> float:
        return self.precond.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.precond.sigma_max

    def round_sigma(self, sigma):
        return self.precond.round_sigma(sigma)

    def with_net_dtype(self, dtype: torch.dtype) -> "Denoiser":
        """This denoiser when its network already runs in ``dtype``; else a copy whose network's
        weights are cast to ``dtype`` (the original keeps its own). The preconditioning and the
        output stay in x's dtype."""
        param = next(self.model.parameters(), None)
        current = self.net_dtype or (param.dtype if param is not None else torch.float32)
        if current == dtype:
            return self
        model = copy.deepcopy(self.model).to(dtype)
        out = Denoiser(model, self.precond, label_dim=self.label_dim, net_dtype=dtype)
        out.train(self.training)
        return out

    def _model_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.net_dtype is not None:
            return self.net_dtype
        param = next(self.model.parameters(), None)
        return param.dtype if param is not None else x.dtype

    def labels(self, class_labels, batch: int, device, dtype) -> torch.Tensor | None:
        """Labels as the network takes them: (N, label_dim) float, ints one-hot, None zeros."""
        return one_hot_labels(class_labels, self.label_dim, batch=batch, device=device,
                              dtype=dtype)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma must be a scalar or ({x.shape[0]},), got {tuple(sigma.shape)}")
        net_dtype = self._model_dtype(x)
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
        labels = self.labels(class_labels, x.shape[0], x.device, net_dtype)
        x_in = (_broadcast(c_in, x.ndim) * x).to(net_dtype)
        noise_dtype = torch.float32 if net_dtype in (torch.float16, torch.bfloat16) else net_dtype
        F_x = self.model(x_in, c_noise.to(noise_dtype), labels, augment_labels)  # Eq. 7, inner F
        if F_x.shape != x.shape:
            raise ValueError(f"network returned shape {tuple(F_x.shape)} for input "
                             f"{tuple(x.shape)}")
        c_skip, c_out = _broadcast(c_skip, x.ndim), _broadcast(c_out, x.ndim)
        return c_skip * x + c_out * F_x.to(x.dtype)


class NotADenoiserError(EdmFastError, TypeError):
    """A model that is not a ``Denoiser`` where an exportable network is needed."""


def require_denoiser(model, purpose: str) -> None:
    """Raise NotADenoiserError unless ``model`` is a ``Denoiser`` (network + preconditioning)."""
    if isinstance(model, Denoiser):
        return
    hint = ("unwrap GuidedDenoiser: guidance runs in the sampling loop"
            if isinstance(model, GuidedDenoiser) else
            "exact denoisers such as the toy models run on the 'reference' and 'compiled' "
            "backends")
    raise NotADenoiserError(f"{purpose} needs a network with EDM preconditioning "
                            f"(edm_fast.precond.Denoiser), got {type(model).__name__} ({hint})")
