"""Reference samplers in pure PyTorch: the ground truth every fast backend is checked against.

One signature, ``sample_<name>(denoiser, noise, sigmas, *, <options>, class_labels=None,
randn=None, callback=None)``:

- ``denoiser(x, sigma, class_labels)`` returns D(x; sigma) with x (N, ...) and sigma (N,);
- ``noise`` holds unit-variance latents (N, ...); the state starts at x_0 = noise * sigma_0
  (as EDM's reference code does) and runs in noise's dtype, so float64 noise gives the float64
  golden reference;
- ``sigmas`` is a strictly decreasing grid sigma_0 > ... > sigma_N >= 0 (schedules.py). A final
  0 is the usual case; a positive last value stops the integration there (used by the tests).
  A discrete-time net's round_sigma may map neighbours to one level: ``run_edm_plan`` takes such
  a rounded grid, whose repeated level is a zero-length step (as in NVlabs' sampler);
- ``randn(x)`` returns the injected noise for one step, shaped like x. It is called only on
  steps that inject noise (gamma_i > 0 in Alg. 2); ``noise.SeedNoise.randn_like`` makes that
  noise depend on each sample's seed only;
- ``callback(info)`` gets, after each step, a dict with i, x (= x_{i+1}), sigma (= sigma_{i+1}),
  x_hat, sigma_hat and denoised.

Per-step scalars are computed once on the host before the loop; the loop has no host-device
synchronisation (finiteness is accumulated on the device and checked once at the end).

Notation follows EDM Algorithms 1 and 2: t_cur, t_next, gamma, t_hat, x_hat, d_cur, d_prime.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..schedules import (ScaleFunction, SigmaFunction, check_churn_options, churn_gammas,
                         round_positive_sigmas, validate_sigmas)

__all__ = [
    "sample_edm", "run_edm_plan", "sample_euler", "sample_heun", "sample_general",
    "sample_euler_ancestral",
    "sample_ddim", "sample_dpmpp_2m", "sample_ddpm", "SAMPLERS", "churn_gammas",
    "NonFiniteError",
    "check_churn_options", "check_finite_samples", "NONFINITE_SAMPLES",
]


class NonFiniteError(FloatingPointError):
    """The denoiser produced NaN or Inf during sampling."""

    exit_code = 1  # a run that failed on valid input: the CLI prints one line (edm_fast.errors)


NONFINITE_SAMPLES = ("the sampled images contain NaN/Inf: the denoiser returned non-finite "
                     "values; check the checkpoint and inputs")


def check_finite_samples(x: torch.Tensor, message: str = NONFINITE_SAMPLES) -> torch.Tensor:
    """``x``, or NonFiniteError when it holds NaN/Inf: the fast backends' one host sync, after
    their loop (NaN/Inf in any D reaches the final state through the step sums)."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(message)
    return x


class _Loop:
    """Shared bookkeeping: input checks, per-step sigma vectors, denoiser calls, finiteness."""

    def __init__(self, denoiser, noise, sigmas, class_labels, callback, allow_repeats=False):
        if not torch.is_tensor(noise) or not noise.is_floating_point() or noise.ndim < 2:
            raise ValueError("noise must be a floating-point tensor of shape (N, ...)")
        if class_labels is not None:
            labels = torch.as_tensor(class_labels)
            if labels.ndim == 0 or labels.shape[0] != noise.shape[0]:
                raise ValueError(f"class_labels has batch {tuple(labels.shape)[:1]} but noise has "
                                 f"batch {noise.shape[0]}")
        self.denoiser, self.noise, self.labels = denoiser, noise, class_labels
        self.callback = callback
        self.sigmas = validate_sigmas(sigmas, allow_repeats=allow_repeats)
        self.num_steps = len(self.sigmas) - 1
        self.bad_steps: list[torch.Tensor] = []

    def round_sigma(self, values: list[float]) -> list[float]:
        """Apply the denoiser's round_sigma (discrete-time nets) to positive sigmas."""
        return round_positive_sigmas(values, getattr(self.denoiser, "round_sigma", None))

    def vector(self, value: float) -> torch.Tensor:
        """sigma as the (N,) tensor the denoiser takes, built before the loop runs."""
        return torch.full((self.noise.shape[0],), value, dtype=self.noise.dtype,
                          device=self.noise.device)

    def denoise(self, x: torch.Tensor, sigma_vec: torch.Tensor) -> torch.Tensor:
        out = self.denoiser(x, sigma_vec, self.labels)
        if out.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(out.shape)} for input "
                             f"{tuple(x.shape)}")
        self.bad_steps.append(~torch.isfinite(out).all())  # stays on the device: no sync
        return out.to(x.dtype)

    def report(self, i, x, sigma, x_hat, sigma_hat, denoised) -> None:
        if self.callback is not None:
            self.callback({"i": i, "x": x, "sigma": sigma, "x_hat": x_hat,
                           "sigma_hat": sigma_hat, "denoised": denoised})

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """One host sync at the end: raise if any denoiser output was not finite."""
        if self.bad_steps and bool(torch.stack(self.bad_steps).any()):
            first = int(torch.stack(self.bad_steps).nonzero()[0, 0])
            raise NonFiniteError(f"the denoiser returned NaN/Inf (evaluation {first} of "
                                 f"{len(self.bad_steps)}); check the checkpoint and inputs")
        return x


def _randn_or_default(randn):
    return randn if randn is not None else torch.randn_like


@torch.no_grad()
def sample_edm(denoiser, noise, sigmas, *, S_churn: float = 0.0, S_min: float = 0.0,
               S_max: float = float("inf"), S_noise: float = 1.0, class_labels=None,
               randn: Callable | None = None, callback: Callable | None = None,
               solver: str = "heun") -> torch.Tensor:
    """EDM's stochastic sampler, Algorithm 2 of Karras et al. (2022); S_churn = 0 gives Alg. 1.

    sigma(t) = t and s(t) = 1. With solver='euler' the second-order correction is skipped.
    """
    loop = _Loop(denoiser, noise, sigmas, class_labels, callback)
    t = loop.round_sigma(loop.sigmas)  # t_i = round(sigma_i), t_N = 0
    check_churn_options(S_churn, S_min, S_max, S_noise)
    gammas = churn_gammas(t, S_churn, S_min, S_max)  # gamma_i of Alg. 2
    t_hats = loop.round_sigma([t_i + g * t_i for t_i, g in zip(t, gammas)])  # Alg. 2 l.5
    return _edm_steps(loop, t, t_hats, gammas, S_noise=S_noise, randn=randn, solver=solver)


@torch.no_grad()
def run_edm_plan(denoiser, noise, sigmas, t_hats, gammas, *, S_noise: float = 1.0,
                 class_labels=None, randn: Callable | None = None,
                 callback: Callable | None = None, solver: str = "heun") -> torch.Tensor:
    """Algorithm 2 on precomputed per-step scalars (already rounded t_i, t_hat_i, gamma_i), as
    as a planner computes them; ``sample_edm`` is this plus the planning. The
    rounded grid may repeat a level (a zero-length step), never increase."""
    loop = _Loop(denoiser, noise, sigmas, class_labels, callback, allow_repeats=True)
    if not len(t_hats) == len(gammas) == loop.num_steps:
        raise ValueError("t_hats and gammas need one value per step")
    return _edm_steps(loop, list(loop.sigmas), list(t_hats), list(gammas), S_noise=S_noise,
                      randn=randn, solver=solver)


def _edm_steps(loop: _Loop, t, t_hats, gammas, *, S_noise, randn, solver) -> torch.Tensor:
    """The loop of Algorithm 2 (l.2-12) over host-side scalars."""
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    randn = _randn_or_default(randn)
    hat_vecs = [loop.vector(v) for v in t_hats]
    next_vecs = [loop.vector(v) for v in t[1:]]
    x_next = loop.noise * t[0]  # Alg. 2 l.2: x_0 ~ N(0, t_0^2 I)
    for i in range(loop.num_steps):  # 0, ..., N-1
        x_cur, t_cur, t_next, t_hat = x_next, t[i], t[i + 1], t_hats[i]
        if gammas[i] > 0:  # Alg. 2 l.6: x_hat = x + sqrt(t_hat^2 - t^2) eps, eps ~ N(0, S_noise^2)
            x_hat = x_cur + math.sqrt(max(t_hat**2 - t_cur**2, 0.0)) * S_noise * randn(x_cur)
        else:
            x_hat = x_cur
        denoised = loop.denoise(x_hat, hat_vecs[i])
        d_cur = (x_hat - denoised) / t_hat  # Alg. 2 l.7
        x_next = x_hat + (t_next - t_hat) * d_cur  # Alg. 2 l.8 (Euler step)
        if solver == "heun" and t_next > 0:  # Alg. 2 l.9: second-order correction
            denoised = loop.denoise(x_next, next_vecs[i])
            d_prime = (x_next - denoised) / t_next  # Alg. 2 l.10
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)  # Alg. 2 l.11
        loop.report(i, x_next, t_next, x_hat, t_hat, denoised)
    return loop.finish(x_next)


def sample_heun(denoiser, noise, sigmas, **options) -> torch.Tensor:
    """Deterministic Heun sampler, Algorithm 1 (sigma(t) = t, s(t) = 1): sample_edm, no churn."""
    return sample_edm(denoiser, noise, sigmas, solver="heun", **options)


def sample_euler(denoiser, noise, sigmas, **options) -> torch.Tensor:
    """First-order Euler sampler on the EDM ODE, dx/dt = (x - D(x; t)) / t (Eq. 4 with Table 1)."""
    return sample_edm(denoiser, noise, sigmas, solver="euler", **options)


@torch.no_grad()
def sample_general(denoiser, noise, sigmas, *, schedule: str = "linear", scaling: str = "none",
                   solver: str = "heun", alpha: float = 1.0, S_churn: float = 0.0,
                   S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                   beta_d: float = 19.9, beta_min: float = 0.1, class_labels=None,
                   randn: Callable | None = None, callback: Callable | None = None):
    """Algorithm 1 for any sigma(t), s(t) (EDM Table 1), with Alg. 2's churn, Euler or Heun.

    The sigma grid fixes the time steps through t_i = sigma^{-1}(sigma_i). solver='heun' is the
    general second-order method with parameter alpha (App. D.2): alpha = 1 is
    Heun, alpha = 1/2 the midpoint method. x_0 ~ N(0, sigma(t_0)^2 s(t_0)^2 I) (Alg. 1 l.2).
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    loop = _Loop(denoiser, noise, sigmas, class_labels, callback)
    randn = _randn_or_default(randn)
    sig = SigmaFunction(schedule, beta_d=beta_d, beta_min=beta_min)
    s = ScaleFunction(scaling, sig)

    def f(v):
        return float(v)

    def ode_coeffs(t):
        """dx/dt = a(t) x - b(t) D(x/s; sigma(t)): a = sigma'/sigma + s'/s, b = sigma' s/sigma."""
        sg, sd, sc, scd = f(sig(t)), f(sig.deriv(t)), f(s(t)), f(s.deriv(t))
        return sd / sg + scd / sc, sd * sc / sg, sc, loop.vector(sg)

    sigma_steps = loop.round_sigma(loop.sigmas)
    t_steps = [f(sig.inv(v)) for v in sigma_steps]  # t_N = sigma^{-1}(0) = 0
    check_churn_options(S_churn, S_min, S_max, S_noise)
    gammas = churn_gammas(sigma_steps, S_churn, S_min, S_max)
    plan = []
    for i in range(loop.num_steps):
        t_cur, t_next, sigma_cur = t_steps[i], t_steps[i + 1], sigma_steps[i]
        sigma_hat = loop.round_sigma([sigma_cur + gammas[i] * sigma_cur])[0]
        t_hat = f(sig.inv(sigma_hat))  # Alg. 2 l.5 in the sigma domain
        h = t_next - t_hat
        t_prime = t_hat + alpha * h  # App. D.2: t' = t_i + alpha h
        second = solver == "heun" and sigma_steps[i + 1] > 0
        plan.append({
            "gamma": gammas[i], "h": h,
            "scale_ratio": f(s(t_hat)) / f(s(t_cur)),
            "churn_std": math.sqrt(max(sigma_hat**2 - sigma_cur**2, 0.0)) * f(s(t_hat)) * S_noise,
            "hat": ode_coeffs(t_hat), "prime": ode_coeffs(t_prime) if second else None,
            "sigma_hat": sigma_hat, "sigma_next": sigma_steps[i + 1],
        })

    def derivative(x, coeffs):
        a, b, sc, sigma_vec = coeffs
        denoised = loop.denoise(x / sc, sigma_vec)  # D(x/s; sigma(t))
        return a * x - b * denoised, denoised  # Alg. 1 l.4 / l.7

    x_next = noise * (f(sig(t_steps[0])) * f(s(t_steps[0])))  # Alg. 1 l.2
    for i, step in enumerate(plan):
        x_cur = x_next
        x_hat = step["scale_ratio"] * x_cur if step["gamma"] > 0 else x_cur
        if step["gamma"] > 0:
            x_hat = x_hat + step["churn_std"] * randn(x_cur)
        d_cur, denoised = derivative(x_hat, step["hat"])
        x_next = x_hat + step["h"] * d_cur  # Alg. 1 l.5 (Euler step)
        if step["prime"] is not None:
            x_prime = x_hat + alpha * step["h"] * d_cur  # App. D.2: x' = x_i + alpha h d_i
            d_prime, denoised = derivative(x_prime, step["prime"])
            w = 1 / (2 * alpha)
            x_next = x_hat + step["h"] * ((1 - w) * d_cur + w * d_prime)  # App. D.2; l.8 at 1
        loop.report(i, x_next, step["sigma_next"], x_hat, step["sigma_hat"], denoised)
    return loop.finish(x_next)


@torch.no_grad()
def sample_euler_ancestral(denoiser, noise, sigmas, *, eta: float = 1.0, S_noise: float = 1.0,
                           class_labels=None, randn: Callable | None = None,
                           callback: Callable | None = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps: go down to sigma_down, add noise of std sigma_up.

    sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)) and
    sigma_down = sqrt(sigma_next^2 - sigma_up^2). With eta = 1 this is DDPM's posterior step
    (variance beta-tilde) written in the sigma domain; with eta = 0 it is the Euler/DDIM step.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    loop = _Loop(denoiser, noise, sigmas, class_labels, callback)
    randn = _randn_or_default(randn)
    sig = loop.round_sigma(loop.sigmas)
    vecs = [loop.vector(v) for v in sig[:-1]]
    x = noise * sig[0]
    for i in range(loop.num_steps):
        s_cur, s_next = sig[i], sig[i + 1]
        s_up = min(s_next, eta * math.sqrt(s_next**2 * (s_cur**2 - s_next**2) / s_cur**2))
        s_down = math.sqrt(s_next**2 - s_up**2)
        denoised = loop.denoise(x, vecs[i])
        x_hat = x
        x = x + (s_down - s_cur) * (x - denoised) / s_cur  # Euler step to sigma_down
        if s_up > 0:
            x = x + randn(x) * (S_noise * s_up)
        loop.report(i, x, s_next, x_hat, s_cur, denoised)
    return loop.finish(x)


def sample_ddim(denoiser, noise, sigmas, *, eta: float = 0.0, **options) -> torch.Tensor:
    """DDIM (Song et al. 2021a). In the sigma domain (sigma = sqrt(1 - abar)/sqrt(abar), x/s)
    DDIM with parameter eta is exactly the ancestral Euler step above: eta = 0 is the
    deterministic Euler step on the EDM ODE (EDM Sec. 3; the "iDDPM + DDIM" column of Table 1)."""
    return sample_euler_ancestral(denoiser, noise, sigmas, eta=eta, **options)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, noise, sigmas, *, class_labels=None, randn=None,
                    callback: Callable | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) in t = -ln(sigma).

    x_next = (sigma_next/sigma) x - expm1(-h) D_eff, with D_eff the multistep combination
    (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h_i, and a first-order step first and last.
    """
    loop = _Loop(denoiser, noise, sigmas, class_labels, callback)
    sig = loop.round_sigma(loop.sigmas)
    vecs = [loop.vector(v) for v in sig[:-1]]
    x = noise * sig[0]
    old_denoised, h_last = None, None
    for i in range(loop.num_steps):
        s_cur, s_next = sig[i], sig[i + 1]
        denoised = loop.denoise(x, vecs[i])
        x_hat = x
        if s_next == 0:
            x = denoised  # the limit of the update as sigma_next -> 0
        else:
            h = math.log(s_cur) - math.log(s_next)
            if old_denoised is None:
                d_eff = denoised
            else:
                r = h_last / h
                d_eff = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s_next / s_cur) * x - math.expm1(-h) * d_eff
            h_last = h
        old_denoised = denoised
        loop.report(i, x, s_next, x_hat, s_cur, denoised)
    return loop.finish(x)


@torch.no_grad()
def sample_ddpm(denoiser, noise, sigmas, *, variance: str = "beta", class_labels=None,
                randn: Callable | None = None, callback: Callable | None = None) -> torch.Tensor:
    """Ancestral sampler of DDPM (Ho et al. 2020, Algorithm 2) on a discrete grid of levels.

    Works in DDPM's own variable x_t = sqrt(abar_t) x with abar = 1/(1 + sigma^2), starting from
    x_T = noise ~ N(0, I) as Ho et al. do (so x_0 in the sigma domain has std sqrt(1+sigma_0^2),
    not sigma_0). Each step: x_{t-1} = (x_t - beta_t/sqrt(1 - abar_t) eps) / sqrt(alpha_t) + s_t z,
    with alpha_t = abar_t / abar_{t-1} (strided grids use this generalised beta_t = 1 - alpha_t),
    eps = (x - D(x; sigma_t)) / sigma_t, and s_t^2 = beta_t ('beta', Ho's choice) or
    beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t ('beta_tilde'). No noise on the last step.
    """
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    loop = _Loop(denoiser, noise, sigmas, class_labels, callback)
    randn = _randn_or_default(randn)
    sig = loop.round_sigma(loop.sigmas)
    vecs = [loop.vector(v) for v in sig[:-1]]
    abar = [1 / (1 + v**2) for v in sig]
    x_t = noise  # x_T ~ N(0, I)  (Ho et al. Alg. 2 l.1)
    for i in range(loop.num_steps):
        alpha = abar[i] / abar[i + 1]
        beta = 1 - alpha
        x = x_t / math.sqrt(abar[i])  # the sigma-domain state the denoiser takes
        denoised = loop.denoise(x, vecs[i])
        eps = (x - denoised) / sig[i]
        x_t = (x_t - beta / math.sqrt(1 - abar[i]) * eps) / math.sqrt(alpha)  # Alg. 2 l.4
        if sig[i + 1] > 0:
            var = beta if variance == "beta" else (1 - abar[i + 1]) / (1 - abar[i]) * beta
            x_t = x_t + math.sqrt(var) * randn(x_t)
        loop.report(i, x_t / math.sqrt(abar[i + 1]), sig[i + 1], x, sig[i], denoised)
    return loop.finish(x_t / math.sqrt(abar[-1]))


SAMPLERS = {
    "edm": sample_edm, "heun": sample_heun, "euler": sample_euler, "general": sample_general,
    "euler_ancestral": sample_euler_ancestral, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m,
    "ddpm": sample_ddpm,
}
