"""Noise schedules: sigma_i discretisations and the sigma(t), s(t) families of EDM Table 1.

Notation (EDM Sec. 2-3): the ODE is dx = [s'(t)/s(t) x - s(t)^2 sigma'(t) sigma(t)
grad log p(x/s(t); sigma(t))] dt (Eq. 4); its time steps are t_i with sigma_i = sigma(t_i),
sigma_N = 0.

Discretisations (return num_steps + 1 float64 values, decreasing, the last one 0):
    edm_sigmas   sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho  (Eq. 5)
    vp_sigmas    t_i = 1 + i/(N-1) (eps_s - 1), sigma_i = sigma_vp(t_i)          (Table 1, VP)
    ve_sigmas    t_i = smax^2 (smin^2/smax^2)^(i/(N-1)), sigma_i = sqrt(t_i)     (Table 1, VE)
    iddpm_sigmas sigma_i = u_floor(j0 + (M-1-j0)/(N-1) i + 1/2)                   (Table 1, iDDPM)
    ddpm_sigmas  the DDPM levels sigma_t at N evenly strided timesteps t = T-1 .. 0

Families (Table 1, "Schedule" and "Scaling" rows; each with its derivative and inverse):
    sigma(t): 'linear' sigma = t (EDM, DDIM), 've' sigma = sqrt(t), 'vp' sigma = sigma_vp(t)
    s(t):     'none' s = 1, 'vp' s = 1/sqrt(1 + sigma(t)^2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .precond import ddpm_alpha_bars, iDDPMPrecond, vp_sigma, vp_sigma_inv

__all__ = [
    "edm_sigmas", "vp_sigmas", "ve_sigmas", "iddpm_sigmas", "ddpm_sigmas", "SIGMA_SCHEDULES",
    "get_sigmas", "SigmaFunction", "ScaleFunction", "sigma_function", "scale_function",
    "validate_sigmas", "round_positive_sigmas", "check_churn_options", "churn_gammas",
]


def _check_steps(num_steps: int) -> int:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return int(num_steps)


def _fraction(num_steps: int) -> torch.Tensor:
    """i / (N - 1) for i = 0 .. N-1 (just [0] when N = 1)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    return i / max(num_steps - 1, 1)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # sigma_N = 0


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0) -> torch.Tensor:
    """EDM's time steps (Eq. 5): rho-warped interpolation between sigma_max and sigma_min."""
    num_steps = _check_steps(num_steps)
    _check_range(sigma_min, sigma_max)
    if not 0 < rho < math.inf:
        raise ValueError(f"rho must be a positive finite number (EDM: 7), got {rho}")
    try:
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    except OverflowError:
        raise ValueError(f"rho={rho} is too small: sigma_max^(1/rho) overflows float64 "
                         "(EDM: rho = 7)") from None
    sigmas = (a + _fraction(num_steps) * (b - a)) ** rho
    if not (torch.isfinite(sigmas).all() and (sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"rho={rho} gives {num_steps} sigmas that are not finite and strictly "
                         f"decreasing in float64 (EDM: rho = 7)")
    return _append_zero(sigmas)


def vp_sigmas(num_steps: int, beta_d: float = 19.9, beta_min: float = 0.1,
              epsilon_s: float = 1e-3) -> torch.Tensor:
    """VP time steps (Table 1): t uniform from 1 to epsilon_s, sigma_i = sigma_vp(t_i)."""
    num_steps = _check_steps(num_steps)
    t = 1 + _fraction(num_steps) * (epsilon_s - 1)
    return _append_zero(vp_sigma(t, beta_d, beta_min))


def ve_sigmas(num_steps: int, sigma_min: float = 0.02, sigma_max: float = 100.0) -> torch.Tensor:
    """VE time steps (Table 1): geometric in sigma^2 from sigma_max^2 to sigma_min^2."""
    num_steps = _check_steps(num_steps)
    _check_range(sigma_min, sigma_max)
    t = sigma_max**2 * (sigma_min**2 / sigma_max**2) ** _fraction(num_steps)
    return _append_zero(t.sqrt())


def iddpm_sigmas(num_steps: int, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
                 j_0: int = 8) -> torch.Tensor:
    """iDDPM time steps (Table 1): u_j at j = floor(j_0 + (M-1-j_0)/(N-1) i + 1/2)."""
    num_steps = _check_steps(num_steps)
    u = iDDPMPrecond(C_1, C_2, M).u
    j = torch.floor(j_0 + (M - 1 - j_0) * _fraction(num_steps) + 0.5).long()
    return _append_zero(u[j])


def ddpm_sigmas(num_steps: int, num_timesteps: int = 1000, beta_start: float = 1e-4,
                beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's discrete levels sigma_t = sqrt((1 - abar_t)/abar_t) at N evenly strided t."""
    num_steps = _check_steps(num_steps)
    if num_steps > num_timesteps:
        raise ValueError(f"num_steps ({num_steps}) cannot exceed num_timesteps ({num_timesteps})")
    abar = ddpm_alpha_bars(num_timesteps, beta_start, beta_end)
    t = torch.round((num_timesteps - 1) * (1 - _fraction(num_steps))).long()
    return _append_zero(((1 - abar[t]) / abar[t]).sqrt())


SIGMA_SCHEDULES = {"edm": edm_sigmas, "vp": vp_sigmas, "ve": ve_sigmas, "iddpm": iddpm_sigmas,
                   "ddpm": ddpm_sigmas}


def get_sigmas(name: str, num_steps: int, **kwargs) -> torch.Tensor:
    """Look up a discretisation by name ('edm', 'vp', 've', 'iddpm', 'ddpm')."""
    if name not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {sorted(SIGMA_SCHEDULES)}")
    return SIGMA_SCHEDULES[name](num_steps, **kwargs)


def validate_sigmas(sigmas, *, allow_repeats: bool = False) -> list[float]:
    """Check a sigma grid (strictly decreasing, finite, positive but for a final 0); as floats.

    allow_repeats: equal neighbours are accepted (never an increase). A discrete-time net's grid
    after round_sigma can repeat a level, as in NVlabs' sampler; that step has zero length.
    """
    values = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 values, got shape "
                         f"{tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("sigmas must be finite")
    if (values[:-1] <= 0).any() or values[-1] < 0:
        raise ValueError("sigmas must be positive (only the last may be 0)")
    if allow_repeats and not (values[1:] <= values[:-1]).all():
        raise ValueError(f"sigmas must not increase, got {values.tolist()}")
    if not allow_repeats and not (values[1:] < values[:-1]).all():
        raise ValueError(f"sigmas must be strictly decreasing, got {values.tolist()}")
    return values.tolist()


@dataclass(frozen=True)
class SigmaFunction:
    """sigma(t), its derivative sigma'(t) and inverse sigma^{-1}(sigma) (Table 1, "Schedule")."""

    name: str
    beta_d: float = 19.9
    beta_min: float = 0.1

    def __post_init__(self):
        if self.name not in ("linear", "ve", "vp"):
            raise ValueError(f"unknown sigma(t) {self.name!r}; choose 'linear', 've' or 'vp'")

    def __call__(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.name == "linear":
            return t
        if self.name == "ve":
            return t.sqrt()
        return vp_sigma(t, self.beta_d, self.beta_min)

    def deriv(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.name == "linear":
            return torch.ones_like(t)
        if self.name == "ve":
            return 0.5 / t.sqrt()
        # d/dt sqrt(e^(beta_d t^2/2 + beta_min t) - 1) = (beta_d t + beta_min) e^(...) / (2 sigma)
        exponent = 0.5 * self.beta_d * t**2 + self.beta_min * t
        return 0.5 * (self.beta_d * t + self.beta_min) * exponent.exp() / self(t)

    def inv(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.name == "linear":
            return sigma
        if self.name == "ve":
            return sigma**2
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)


@dataclass(frozen=True)
class ScaleFunction:
    """s(t) and s'(t) for a given sigma(t) (Table 1, "Scaling"): 'none' or 'vp'."""

    name: str
    sigma: SigmaFunction

    def __post_init__(self):
        if self.name not in ("none", "vp"):
            raise ValueError(f"unknown s(t) {self.name!r}; choose 'none' or 'vp'")

    def __call__(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.name == "none":
            return torch.ones_like(t)
        return 1 / (1 + self.sigma(t) ** 2).sqrt()  # s = 1/sqrt(1 + sigma^2)

    def deriv(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.name == "none":
            return torch.zeros_like(t)
        return -self.sigma(t) * self.sigma.deriv(t) * self(t) ** 3  # d/dt (1 + sigma^2)^(-1/2)


def sigma_function(name: str, **kwargs) -> SigmaFunction:
    return SigmaFunction(name, **kwargs)


def scale_function(name: str, sigma: SigmaFunction) -> ScaleFunction:
    return ScaleFunction(name, sigma)


def round_positive_sigmas(values: list[float], round_sigma) -> list[float]:
    """``round_sigma`` (a discrete-time net's nearest trained level, EDM Table 1) of every
    positive sigma; 0 stays 0. A positive sigma that rounds to 0 (iDDPM's u_M = 0, below half its
    smallest positive level) is refused: stepping to t = 0 early divides by zero."""
    if round_sigma is None:
        return list(values)
    rounded = torch.as_tensor(round_sigma(torch.tensor(values, dtype=torch.float64)))
    out = [float(r) if v > 0 else 0.0 for v, r in zip(values, rounded.tolist())]
    too_small = [v for v, r in zip(values, out) if v > 0 and r <= 0]
    if too_small:
        raise ValueError(f"sigma={min(too_small):g} rounds to 0 on this model's discrete noise "
                         "levels; use sigma_min >= the model's sigma_min")
    return out


def check_churn_options(S_churn: float, S_min: float, S_max: float,
                        S_noise: float = 1.0) -> None:
    """Alg. 2's options, refused when NaN (which would silently turn churn off, or fill every
    image with NaN) or out of range: S_churn, S_noise finite and >= 0; S_min, S_max not NaN
    (S_max may be +inf: churn up to the top of the grid; S_min > S_max: churn on no step)."""
    if not 0 <= S_churn < math.inf:
        raise ValueError(f"S_churn must be a finite number >= 0, got {S_churn}")
    if not 0 <= S_noise < math.inf:
        raise ValueError(f"S_noise must be a finite number >= 0, got {S_noise}")
    if math.isnan(S_min) or math.isnan(S_max):
        raise ValueError(f"S_min and S_max must be numbers, got {S_min} and {S_max}")


def churn_gammas(sigmas: list[float], S_churn: float, S_min: float, S_max: float) -> list[float]:
    """gamma_i = min(S_churn/N, sqrt(2)-1) if S_min <= t_i <= S_max else 0 (the gamma_i of
    Alg. 2's caption)."""
    check_churn_options(S_churn, S_min, S_max)
    num_steps = len(sigmas) - 1
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
    return [gamma if S_min <= t <= S_max else 0.0 for t in sigmas[:-1]]
