"""The planner: every solver of edm-fast written once, as a ``Program`` (program.py).

Each ``plan_<solver>(b, sigmas, **options)`` writes one sampling run on the grid ``sigmas``
(sigma_0 > ... > sigma_N >= 0, already rounded to the model's levels) with a ProgramBuilder, in
float64 on the host, and returns the final state. This is the only place in the runtime where
solver mathematics lives: executors run the program, whatever solver wrote it. The textbook loops
of sampling/reference.py (and k-diffusion's, NVlabs') are what the tests hold these programs to.

Notation: D_i = D(x_i; sigma_i), d_i = (x_i - D_i) / sigma_i (the EDM ODE's dx/dsigma, Eq. 4
with Table 1), lambda = -ln(sigma) (the half log-SNR of DPM-Solver++ and UniPC for alpha = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .program import Expr, ProgramBuilder
from .schedules import ScaleFunction, SigmaFunction, churn_gammas

__all__ = ["SOLVERS", "SolverInfo", "ODE_FAMILIES", "plan_solver", "solver_help"]

# --ode for euler/heun: (sigma(t), s(t)) of EDM Table 1 (NVlabs' --schedule/--scaling pairs)
ODE_FAMILIES = {"edm": ("linear", "none"), "vp": ("vp", "vp"), "ve": ("ve", "none")}


class _Guided:
    """Which evaluations guidance applies to: all, or sigma in [lo, hi] (Kynkaanniemi et al.
    2024, a guidance interval); outside it the plain conditional D runs."""

    def __init__(self, interval):
        self.lo, self.hi = interval if interval is not None else (0.0, math.inf)

    def __call__(self, sigma: float) -> bool:
        return self.lo <= sigma <= self.hi


def plan_alg1(b: ProgramBuilder, sigmas, guided, *, second_order: bool, ode: str = "edm",
              alpha: float = 1.0, S_churn: float = 0.0, S_min: float = 0.0,
              S_max: float = math.inf, S_noise: float = 1.0, round_sigma=None, **_) -> Expr:
    """EDM Algorithm 1 for sigma(t), s(t) of ``ode`` with Alg. 2's churn; Euler, or the
    second-order step with parameter alpha (App. D.2; alpha = 1 is Heun, Alg. 1 l.6-8).

    dx/dt = a(t) x - b(t) D(x/s(t); sigma(t)) with a = sigma'/sigma + s'/s, b = sigma' s/sigma
    (Eq. 4). The grid fixes t_i = sigma^{-1}(sigma_i). With ode='edm' (sigma = t, s = 1) this is
    exactly Alg. 2: a = b = 1/t."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    schedule, scaling = ODE_FAMILIES[ode]
    sig = SigmaFunction(schedule)
    s = ScaleFunction(scaling, sig)

    def f(v):
        return float(v)

    def derivative(x: Expr, t: float, sigma: float) -> Expr:
        sg, sd, sc, scd = f(sig(t)), f(sig.deriv(t)), f(s(t)), f(s.deriv(t))
        denoised = b.eval(x / sc, sigma, guided(sigma))  # D(x/s; sigma(t))
        return (sd / sg + scd / sc) * x - (sd * sc / sg) * denoised  # Alg. 1 l.4 / l.7

    def rounded(v: float) -> float:
        return f(round_sigma(v)) if round_sigma is not None and v > 0 else v

    gammas = churn_gammas(sigmas, S_churn, S_min, S_max)
    t_steps = [f(sig.inv(v)) for v in sigmas]  # t_N = sigma^{-1}(0) = 0
    x = f(sig(t_steps[0])) * f(s(t_steps[0])) * b.latents()  # Alg. 1 l.2: x_0 ~ N(0, sigma^2 s^2)
    for i in range(len(sigmas) - 1):
        x = b.value(x)
        sigma_cur, t_cur, t_next = sigmas[i], t_steps[i], t_steps[i + 1]
        x_hat, sigma_hat, t_hat = x, sigma_cur, t_cur
        if gammas[i] > 0:  # Alg. 2 l.5-6 in the sigma domain, rescaled to s(t_hat)
            sigma_hat = rounded(sigma_cur + gammas[i] * sigma_cur)
            t_hat = f(sig.inv(sigma_hat))
            std = math.sqrt(max(sigma_hat**2 - sigma_cur**2, 0.0)) * f(s(t_hat)) * S_noise
            x_hat = b.value(f(s(t_hat)) / f(s(t_cur)) * x + std * b.noise())
        h = t_next - t_hat
        d_cur = derivative(x_hat, t_hat, sigma_hat)
        x = x_hat + h * d_cur  # Alg. 1 l.5 (Euler step)
        if second_order and sigmas[i + 1] > 0:  # Alg. 1 l.6-8
            t_prime = t_hat + alpha * h  # App. D.2: t' = t_i + alpha h
            sigma_prime = f(sig(t_prime))
            if alpha == 1:  # Heun: t' = t_{i+1}, the grid's own level (not one ulp off it)
                t_prime, sigma_prime = t_next, sigmas[i + 1]
            x_prime = x_hat + alpha * h * d_cur
            d_prime = derivative(x_prime, t_prime, sigma_prime)
            w = 1 / (2 * alpha)
            x = x_hat + h * ((1 - w) * d_cur + w * d_prime)  # App. D.2; Alg. 1 l.8 at alpha = 1
    return x


def plan_euler(b, sigmas, guided, **options) -> Expr:
    return plan_alg1(b, sigmas, guided, second_order=False, **options)


def plan_heun(b, sigmas, guided, **options) -> Expr:
    return plan_alg1(b, sigmas, guided, second_order=True, **options)


def plan_ancestral(b: ProgramBuilder, sigmas, guided, *, eta: float = 1.0, S_noise: float = 1.0,
                   **_) -> Expr:
    """Euler to sigma_down, then noise of std sigma_up (k-diffusion's get_ancestral_step):
    sigma_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)), sigma_down = sqrt(s'^2 - sigma_up^2).
    eta = 1 is DDPM's posterior step in the sigma domain; eta = 0 the Euler step (DDIM)."""
    x = sigmas[0] * b.latents()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = b.value(x)
        s_up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        s_down = math.sqrt(s_next**2 - s_up**2)
        denoised = b.eval(x, s, guided(s))
        x = x + (s_down - s) / s * (x - denoised)  # Euler step to sigma_down
        if s_up > 0:
            x = x + (S_noise * s_up) * b.noise()
    return x


def plan_ddim(b, sigmas, guided, *, eta: float = 0.0, **options) -> Expr:
    """DDIM (Song et al. 2021a) with parameter eta, in the sigma domain: the ancestral step
    above (EDM Sec. 3: eta = 0 is the Euler step on the EDM ODE)."""
    return plan_ancestral(b, sigmas, guided, eta=eta, **options)


def plan_ddpm(b: ProgramBuilder, sigmas, guided, *, variance: str = "beta", **_) -> Expr:
    """DDPM's ancestral sampler (Ho et al. 2020, Alg. 2) in the sigma-domain state
    X = x_t / sqrt(abar_t), abar = 1 / (1 + sigma^2), from x_T = latents (Alg. 2 l.1)."""
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    abar = [1 / (1 + v**2) for v in sigmas]
    x = b.latents() / math.sqrt(abar[0])
    for i in range(len(sigmas) - 1):
        x = b.value(x)
        alpha = abar[i] / abar[i + 1]
        beta = 1 - alpha
        denoised = b.eval(x, sigmas[i], guided(sigmas[i]))
        eps = (x - denoised) / sigmas[i]
        x_t = (math.sqrt(abar[i]) * x - beta / math.sqrt(1 - abar[i]) * eps) / math.sqrt(alpha)
        if sigmas[i + 1] > 0:  # Alg. 2 l.4: + sigma_t z, no noise on the last step
            var = beta if variance == "beta" else (1 - abar[i + 1]) / (1 - abar[i]) * beta
            x_t = x_t + math.sqrt(var) * b.noise()
        x = x_t / math.sqrt(abar[i + 1])
    return x


def plan_dpmpp_2m(b: ProgramBuilder, sigmas, guided, **_) -> Expr:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) in lambda = -ln sigma:
    x' = (s'/s) x - expm1(-h) D_eff, D_eff = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h_i;
    first order on the first step and on a step to sigma = 0."""
    x = sigmas[0] * b.latents()
    old = None
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = b.value(x)
        denoised = b.eval(x, s, guided(s))
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            d_eff = denoised
            if old is not None:
                r = math.log(sigmas[i - 1] / s) / h
                d_eff = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s_next / s) * x - math.expm1(-h) * d_eff
        old = denoised
    return x


def plan_dpmpp_2m_sde(b: ProgramBuilder, sigmas, guided, *, eta: float = 1.0,
                      S_noise: float = 1.0, **_) -> Expr:
    """DPM-Solver++(2M) SDE (midpoint form, as k-diffusion's): with eta_h = eta h,
    x' = (s'/s) e^{-eta_h} x + (1 - e^{-h-eta_h}) D_i + (1 - e^{-h-eta_h})/(2r) (D_i - D_{i-1})
         + s' sqrt(1 - e^{-2 eta_h}) S_noise eps.  eta = 0 is DPM-Solver++(2M) in midpoint form."""
    x = sigmas[0] * b.latents()
    old, h_last = None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = b.value(x)
        denoised = b.eval(x, s, guided(s))
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            eta_h = eta * h
            one_minus = -math.expm1(-h - eta_h)
            x = (s_next / s) * math.exp(-eta_h) * x + one_minus * denoised
            if old is not None:
                x = x + 0.5 * one_minus * (h / h_last) * (denoised - old)
            if eta > 0:
                x = x + (s_next * math.sqrt(-math.expm1(-2 * eta_h)) * S_noise) * b.noise()
            h_last = h
        old = denoised
    return x


def plan_dpmpp_3m_sde(b: ProgramBuilder, sigmas, guided, *, eta: float = 1.0,
                      S_noise: float = 1.0, **_) -> Expr:
    """DPM-Solver++(3M) SDE (as k-diffusion's): third-order multistep in lambda with
    phi_2 = expm1(-h_eta)/h_eta + 1, phi_3 = phi_2/h_eta - 1/2, h_eta = (1 + eta) h; eta = 0 is
    DPM-Solver++(3M)."""
    x = sigmas[0] * b.latents()
    d_1 = d_2 = None
    h_1 = h_2 = None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = b.value(x)
        denoised = b.eval(x, s, guided(s))
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - d_1) / (h_1 / h))
            if eta > 0:
                x = x + (s_next * math.sqrt(-math.expm1(-2 * h * eta)) * S_noise) * b.noise()
            h_1, h_2 = h, h_1
        d_1, d_2 = denoised, d_1
    return x


def lms_coefficients(sigmas, i: int, order: int) -> list[float]:
    """Adams-Bashforth weights on an uneven grid: the integral over [sigma_i, sigma_{i+1}] of the
    Lagrange basis polynomial of node sigma_{i-j} through sigma_i, ..., sigma_{i-order+1}
    (computed exactly: the polynomial has degree < 4)."""
    nodes = [sigmas[i - k] for k in range(order)]
    out = []
    for j in range(order):
        others = [nodes[k] for k in range(order) if k != j]
        poly = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial(1)
        poly = poly / float(np.prod([nodes[j] - o for o in others]))
        integral = poly.integ()
        out.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return out


def plan_lms(b: ProgramBuilder, sigmas, guided, *, order: int = 4, **_) -> Expr:
    """Linear multistep in sigma on d = (x - D)/sigma (k-diffusion's sample_lms): order up to
    ``order``, lower on the first steps."""
    if order not in (1, 2, 3, 4):
        raise ValueError(f"lms order must be 1..4, got {order}")
    x = sigmas[0] * b.latents()
    ds: list[Expr] = []
    for i, s in enumerate(sigmas[:-1]):
        x = b.value(x)
        denoised = b.eval(x, s, guided(s))
        ds = ([(x - denoised) / s] + ds)[:order]  # newest first
        coeffs = lms_coefficients(sigmas, i, min(i + 1, order))
        for c, d in zip(coeffs, ds):
            x = x + c * d
    return x


# Adams-Bashforth weights on an even grid, newest first (iPNDM's warm-up uses the lower ones)
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
       4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plan_ipndm(b: ProgramBuilder, sigmas, guided, *, order: int = 4, **_) -> Expr:
    """iPNDM (Zhang & Chen 2023, DEIS, "improved PNDM"): Adams-Bashforth in sigma with the
    even-grid weights, x' = x + h sum_j w_j d_{i-j}, order rising 1, 2, .. up to ``order``."""
    if order not in _AB:
        raise ValueError(f"ipndm order must be 1..4, got {order}")
    x = sigmas[0] * b.latents()
    ds: list[Expr] = []
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = b.value(x)
        denoised = b.eval(x, s, guided(s))
        ds = ([(x - denoised) / s] + ds)[:order]
        weights = _AB[min(i + 1, order)]
        for w, d in zip(weights, ds):
            x = x + (s_next - s) * w * d
    return x


def _unipc_weights(rks: list[float], hh: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """UniPC's R (rows r_k^{j-1}) and b (phi_j(hh) j! / B(hh)) for the bh2 variant,
    B(h) = expm1(h) (Zhao et al. 2023, Alg. 3 and App. C)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    B_h = math.expm1(hh)
    R, bs = [], []
    for j in range(1, order + 1):
        R.append([r ** (j - 1) for r in rks])
        bs.append(h_phi_k * factorial / B_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.array(R, dtype=np.float64), np.array(bs, dtype=np.float64)


def plan_unipc(b: ProgramBuilder, sigmas, guided, *, order: int = 3, **_) -> Expr:
    """UniPC-bh2 (Zhao et al. 2023, arXiv 2302.04867) with data prediction in lambda = -ln sigma:
    the UniP predictor of order p (rising 1, 2, .. p; the final steps lower, as diffusers'
    lower_order_final) and the UniC corrector, which reuses the next step's evaluation (no extra
    NFE). A step to sigma = 0 is x = D."""
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1..3, got {order}")
    n = len(sigmas) - 1
    lam = [-math.log(v) if v > 0 else math.inf for v in sigmas]
    x = sigmas[0] * b.latents()
    ms: list[Expr] = []  # model outputs D_i, newest first
    last = None  # (x_i, p, rks, rhos_c terms) of the previous predictor, for the corrector
    for i in range(n):
        x = b.value(x)
        denoised = b.eval(x, sigmas[i], guided(sigmas[i]))
        if last is not None and sigmas[i + 1] > 0:  # UniC: correct x_i with D at the predicted
            # x_i (Zhao et al. Alg. 2); not before a step to 0, whose result x = D ignores x_i
            x_prev, p, ratio, h_phi_1, B_h, D1s, rhos_c = last
            m0 = ms[0]
            corr = sum((r * d for r, d in zip(rhos_c[:-1], D1s)), Expr(()))
            x = b.value(ratio * x_prev - h_phi_1 * m0
                         - B_h * (corr + rhos_c[-1] * (denoised - m0)))
        ms = ([denoised] + ms)[:order]
        p = min(order, n - i, i + 1)  # lower_order_final, warm-up
        s, s_next = sigmas[i], sigmas[i + 1]
        if s_next == 0:
            x = denoised
            break
        h = lam[i + 1] - lam[i]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)] + [1.0]
        D1s = [(ms[k] - ms[0]) / rks[k - 1] for k in range(1, p)]
        hh = -h
        h_phi_1 = math.expm1(hh)
        B_h = math.expm1(hh)
        R, bw = _unipc_weights(rks, hh, p)
        if p == 1:
            rhos_p: list[float] = []
        elif p == 2:
            rhos_p = [0.5]
        else:
            rhos_p = list(np.linalg.solve(R[:-1, :-1], bw[:-1]))
        rhos_c = [0.5] if p == 1 else list(np.linalg.solve(R, bw))
        ratio = s_next / s
        pred = sum((float(r) * d for r, d in zip(rhos_p, D1s)), Expr(()))
        x_new = ratio * x - h_phi_1 * ms[0] - B_h * pred  # UniP (alpha = 1)
        last = (x, p, ratio, h_phi_1, B_h, D1s, [float(r) for r in rhos_c])
        x = x_new
    return x


@dataclass(frozen=True)
class SolverInfo:
    """What --help says of a solver, and the options it reads."""

    planner: object
    evals_per_step: str
    injects_noise: str
    options: tuple[str, ...]
    summary: str


SOLVERS = {
    "euler": SolverInfo(plan_euler, "1", "with --S-churn", ("ode", "churn"),
                        "Euler on the probability-flow ODE (EDM Alg. 1 without l.6-8)"),
    "heun": SolverInfo(plan_heun, "2 (1 on the step to 0)", "with --S-churn",
                       ("ode", "alpha", "churn"),
                       "EDM's 2nd-order Heun, Alg. 1; Alg. 2 with --S-churn > 0"),
    "dpmpp_2m": SolverInfo(plan_dpmpp_2m, "1", "no", (),
                           "DPM-Solver++(2M), Lu et al. 2022"),
    "dpmpp_2m_sde": SolverInfo(plan_dpmpp_2m_sde, "1", "yes (eta > 0)", ("eta", "S_noise"),
                               "DPM-Solver++(2M) SDE; --eta 0 is its ODE form"),
    "dpmpp_3m_sde": SolverInfo(plan_dpmpp_3m_sde, "1", "yes (eta > 0)", ("eta", "S_noise"),
                               "DPM-Solver++(3M) SDE; --eta 0 is DPM-Solver++(3M)"),
    "unipc": SolverInfo(plan_unipc, "1", "no", ("order",),
                        "UniPC-bh2 predictor-corrector, order <= 3, Zhao et al. 2023"),
    "ipndm": SolverInfo(plan_ipndm, "1", "no", ("order",),
                        "improved PNDM (Adams-Bashforth), order <= 4"),
    "lms": SolverInfo(plan_lms, "1", "no", ("order",),
                      "linear multistep in sigma, order <= 4 (k-diffusion's)"),
    "ddim": SolverInfo(plan_ddim, "1", "yes (eta > 0)", ("eta", "S_noise"),
                       "DDIM, Song et al. 2021; eta 0 (default) is deterministic"),
    "ddpm": SolverInfo(plan_ddpm, "1", "yes", ("variance",),
                       "DDPM's ancestral sampler, Ho et al. 2020"),
    "euler_ancestral": SolverInfo(plan_ancestral, "1", "yes (eta > 0)", ("eta", "S_noise"),
                                  "Euler ancestral (k-diffusion's); eta 1 by default"),
}


def solver_help() -> str:
    """One line per solver: name, NFE per step, noise, summary (for --help)."""
    return "\n".join(f"{name}: {info.evals_per_step} NFE/step, noise: {info.injects_noise}; "
                     f"{info.summary}" for name, info in SOLVERS.items())


def plan_solver(name: str, sigmas: list[float], *, guidance_interval=None, **options):
    """The program of solver ``name`` on ``sigmas`` (see ``SOLVERS``)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose from {', '.join(SOLVERS)}")
    b = ProgramBuilder()
    result = SOLVERS[name].planner(b, list(sigmas), _Guided(guidance_interval), **options)
    return b.finish(result)
