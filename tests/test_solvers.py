"""The planner (solvers.py, plan.py): every solver's Program against an independent loop.

Each program is run by the Python executor (backends/executor.py) in float64 on the exact
Gaussian-mixture denoiser and compared with a loop written without the planner: the textbook
samplers of edm_fast/sampling/reference.py, NVlabs' ``edm_sampler`` (transcribed below), k-diffusion's sample_*
functions, and a transcription of UniPC (Zhao et al. 2023) from diffusers' scheduler. The
injected noise is the same in both: the program reads draws noise[k] in order; the loops get
them replayed through ``randn=`` / ``noise_sampler=`` and must consume exactly plan.num_noise.

Tolerances are stated where they are used. Float64 equality tests differ only in rounding: the
planner folds the step scalars into LIN coefficients on the host (x + h (x - D)/s becomes
(1 + h/s) x - (h/s) D), so the two sides round differently at ~1e-16 per operation; 1e-12
relative leaves three orders of magnitude for the growth over <= 20 steps, while any error in a
coefficient (a swapped ratio, a missing term) shows at >= 1e-4.
"""

import itertools
import math
import os
import warnings

import pytest
import torch

from edm_fast.sampling.backends.executor import run_program
from edm_fast.guidance import Guidance
from edm_fast.plan import SamplingPlan
from edm_fast.precond import DDPMPrecond, iDDPMPrecond
from edm_fast.program import EVAL, LATENTS, LIN, Op, Program, ProgramBuilder, noise_source
from edm_fast.sampling.reference import (
    round_positive_sigmas,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_edm,
    sample_euler,
    sample_euler_ancestral,
    sample_general,
    sample_heun,
)
from edm_fast.schedules import edm_sigmas
from edm_fast.solvers import SOLVERS
from edm_fast.nets.toy import GaussianMixture, solve_probability_flow

F64 = torch.float64
BATCH = 32


@pytest.fixture(scope="module")
def mixture():
    covs = torch.tensor([[[0.09, 0.02], [0.02, 0.04]], [[0.04, 0.0], [0.0, 0.09]],
                         [[0.05, -0.02], [-0.02, 0.06]]], dtype=F64)
    return GaussianMixture([0.3, 0.5, 0.2], [[-1.0, 0.5], [1.0, -0.5], [0.2, 1.0]], covs)


@pytest.fixture(scope="module")
def den(mixture):
    return mixture.as_denoiser()


def latents(seed=0, n=BATCH):
    return torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


def draws(k, seed=100, n=BATCH):
    """k injected unit-variance draws, (k, n, 2) (the executor's noise argument)."""
    return torch.randn(max(k, 1), n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


class Replay:
    """Hands out noise[0], noise[1], ... in order: ``randn(x)`` for sampling/reference.py, and
    ``noise_sampler(sigma, sigma_next)`` for k-diffusion. ``used`` counts the draws taken."""

    def __init__(self, noise):
        self.noise, self.used = noise, 0

    def randn(self, x):
        out = self.noise[self.used]
        self.used += 1
        assert out.shape == x.shape
        return out

    def sampler(self, sigma, sigma_next):
        out = self.noise[self.used]
        self.used += 1
        return out


def run(plan, denoiser, x, noise=None, labels=None, guidance=None):
    """The plan's program through the Python executor (all backends' executor)."""
    def evaluate(xx, sigma, lab):
        return denoiser(xx, sigma, lab)

    return run_program(plan.program, evaluate, x, noise, labels, guidance=Guidance(guidance))


def rel_err(a, b):
    """max |a - b| / max |b| (the batch's scale: states are O(1) to O(80))."""
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).abs().max() / b.abs().max()).item()


def grid_to_zero(n):
    """n EDM steps from 80 to 0.002, then the step to 0."""
    return edm_sigmas(n).tolist()


def grid_positive(n):
    """n EDM steps from 80 down to 0.02, stopping there (no final step to 0)."""
    return edm_sigmas(n + 1, 0.02, 80.0)[:-1].tolist()


GRIDS = [pytest.param(grid_to_zero(1), id="1step"), pytest.param(grid_to_zero(2), id="2steps"),
         pytest.param(grid_to_zero(7), id="7steps"),
         pytest.param(grid_positive(7), id="7steps-positive-end")]

CHURN = dict(S_churn=30.0, S_min=0.05, S_max=50.0, S_noise=1.007)


# (id, plan options, reference loop of sampling/reference.py taking (den, latents, sigmas, randn))
TEXTBOOK = [
    ("euler", dict(solver="euler"), lambda d, x, s, r: sample_euler(d, x, s, randn=r)),
    ("heun", dict(solver="heun"), lambda d, x, s, r: sample_heun(d, x, s, randn=r)),
    ("heun-churn", dict(solver="heun", **CHURN),
     lambda d, x, s, r: sample_edm(d, x, s, randn=r, **CHURN)),
    ("heun-churn-all-steps", dict(solver="heun", S_churn=30.0, S_noise=1.007),  # S_max = inf
     lambda d, x, s, r: sample_edm(d, x, s, randn=r, S_churn=30.0, S_noise=1.007)),
    ("euler-churn", dict(solver="euler", **CHURN),
     lambda d, x, s, r: sample_edm(d, x, s, randn=r, solver="euler", **CHURN)),
    ("alg1-vp-heun", dict(solver="heun", ode="vp"),
     lambda d, x, s, r: sample_general(d, x, s, schedule="vp", scaling="vp", randn=r)),
    ("alg1-vp-midpoint", dict(solver="heun", ode="vp", alpha=0.5),
     lambda d, x, s, r: sample_general(d, x, s, schedule="vp", scaling="vp", alpha=0.5,
                                       randn=r)),
    ("alg1-vp-euler-churn", dict(solver="euler", ode="vp", **CHURN),
     lambda d, x, s, r: sample_general(d, x, s, schedule="vp", scaling="vp", solver="euler",
                                       randn=r, **CHURN)),
    ("alg1-ve-heun-churn", dict(solver="heun", ode="ve", **CHURN),
     lambda d, x, s, r: sample_general(d, x, s, schedule="ve", scaling="none", randn=r,
                                       **CHURN)),
    ("alg1-vp-heun-churn-alpha", dict(solver="heun", ode="vp", alpha=0.7, **CHURN),
     lambda d, x, s, r: sample_general(d, x, s, schedule="vp", scaling="vp", alpha=0.7,
                                       randn=r, **CHURN)),
    ("dpmpp_2m", dict(solver="dpmpp_2m"), lambda d, x, s, r: sample_dpmpp_2m(d, x, s, randn=r)),
    ("ddim-eta0", dict(solver="ddim"), lambda d, x, s, r: sample_ddim(d, x, s, randn=r)),
    ("ddim-eta0.5", dict(solver="ddim", eta=0.5, S_noise=1.01),
     lambda d, x, s, r: sample_ddim(d, x, s, eta=0.5, S_noise=1.01, randn=r)),
    ("euler_ancestral", dict(solver="euler_ancestral"),
     lambda d, x, s, r: sample_euler_ancestral(d, x, s, randn=r)),
    ("euler_ancestral-eta0.7", dict(solver="euler_ancestral", eta=0.7, S_noise=1.01),
     lambda d, x, s, r: sample_euler_ancestral(d, x, s, eta=0.7, S_noise=1.01, randn=r)),
    ("ddpm-beta", dict(solver="ddpm"), lambda d, x, s, r: sample_ddpm(d, x, s, randn=r)),
    ("ddpm-beta_tilde", dict(solver="ddpm", variance="beta_tilde"),
     lambda d, x, s, r: sample_ddpm(d, x, s, variance="beta_tilde", randn=r)),
]


@pytest.mark.parametrize("sigmas", GRIDS)
@pytest.mark.parametrize("name, options, reference", TEXTBOOK, ids=[t[0] for t in TEXTBOOK])
def test_programs_equal_textbook_loops(den, name, options, reference, sigmas):
    """Each program equals its sampling/reference.py loop on the same latents and draws, to 1e-12
    relative in float64 (module docstring; measured <= 1.8e-13, <= 8e-15 on 7 steps). The loop
    consumes exactly the plan's num_noise draws, in the program's order.

    One exception, 1e-10: the 2-step VP/VE grid's Heun correction at t(0.002) after a step
    from sigma = 80. There d' = a x' - b D' with a = b ~ 1/(2 t') ~ 1e5 (VE: t = sigma^2) times
    h/2 ~ 3e3 is a cancellation of ~5 digits that both sides round differently (measured
    1.4e-12 VP, 5.0e-12 VE; 1.8e-14 and 4.1e-14 on the 7-step grid)."""
    plan = SamplingPlan.build(sigmas=sigmas, **options)
    big_vp_ve_step = options.get("ode") in ("vp", "ve") and sigmas == grid_to_zero(2)
    tol = 1e-10 if big_vp_ve_step else 1e-12
    x, noise = latents(), draws(40)
    replay = Replay(noise)
    want = reference(den, x, torch.tensor(sigmas, dtype=F64), replay.randn)
    assert replay.used == plan.num_noise
    got = run(plan, den, x, noise[:max(plan.num_noise, 1)])
    assert rel_err(got, want) < tol, (name, rel_err(got, want))


class Rounded(torch.nn.Module):
    """The mixture's exact denoiser presented as a discrete-time net: sampling/reference.py reads
    ``round_sigma`` off the denoiser (EDM Table 1's nearest trained level)."""

    def __init__(self, den, precond):
        super().__init__()
        self.den, self.precond = den, precond
        self.sigma_min, self.sigma_max = precond.sigma_min, precond.sigma_max

    def round_sigma(self, sigma):
        return self.precond.round_sigma(sigma)

    def forward(self, x, sigma, labels=None):
        return self.den(x, sigma, labels)


@pytest.mark.parametrize("precond", [iDDPMPrecond, DDPMPrecond])
@pytest.mark.parametrize("solver", ["heun-churn", "dpmpp_2m"])
def test_programs_on_a_rounded_grid(den, precond, solver):
    """On a discrete-time net's rounded grid (round_sigma of iDDPM / DDPM, also applied to
    Alg. 2's t_hat) the program equals the textbook loop to 1e-12 (as above). The grid is chosen
    so that rounding moves every level but repeats none (a repeat is dropped by multistep
    plans, and would divide by a zero step in sample_dpmpp_2m)."""
    p = precond()
    net = Rounded(den, p)
    sigmas = edm_sigmas(9, max(0.03, p.sigma_min), min(60.0, p.sigma_max)).tolist()
    rounded = round_positive_sigmas(sigmas, p.round_sigma)
    assert all(a != b for a, b in zip(sigmas[:-1], rounded[:-1]))  # the rounding does act
    assert len(set(rounded)) == len(rounded)  # and repeats no level
    x, noise = latents(1), draws(20)
    replay = Replay(noise)
    if solver == "dpmpp_2m":
        plan = SamplingPlan.build(solver="dpmpp_2m", sigmas=sigmas, round_sigma=p.round_sigma)
        want = sample_dpmpp_2m(net, x, sigmas)
    else:
        plan = SamplingPlan.build(solver="heun", sigmas=sigmas, round_sigma=p.round_sigma,
                                  **CHURN)
        want = sample_edm(net, x, sigmas, randn=replay.randn, **CHURN)
        # the churned t_hat is a trained level too: the program evaluates on trained levels
        # (to an ulp: see test_heun_correction_evaluates_at_the_grid_level)
        ev = torch.tensor(plan.program.eval_sigmas, dtype=F64)
        assert torch.allclose(p.round_sigma(ev), ev, rtol=1e-15, atol=0)
    assert plan.sigmas == tuple(rounded)
    assert replay.used == plan.num_noise
    got = run(plan, den, x, noise[:max(plan.num_noise, 1)])
    assert rel_err(got, want) < 1e-12, rel_err(got, want)


def test_heun_correction_evaluates_at_the_grid_level():
    """With alpha = 1, Alg. 2 evaluates the correction at t_{i+1} itself (l.9), a trained level
    on a discrete-time net. The plan computes t' = t_hat + (t_{i+1} - t_hat), which in float64
    can differ from t_{i+1} by an ulp: harmless to D (3e-16 relative), but the evaluation is
    off the grid (and SigmaVectors holds an extra level); so alpha = 1 uses sigma_{i+1}."""
    sigmas = round_positive_sigmas(edm_sigmas(9, 0.03, 60.0).tolist(), iDDPMPrecond().round_sigma)
    plan = SamplingPlan.build(solver="heun", sigmas=sigmas, **CHURN)
    seconds = [op.sigma for op in plan.program.ops if op.kind == EVAL][1::2]
    assert seconds == list(plan.sigmas[1:-1])


# ---------------------------------------------------------------------------------------------
# NVlabs' Alg. 2, transcribed from NVlabs/edm generate.py (edm_sampler): the same algorithm
# written as they write it (t_steps from Eq. 5 rounded by the net, gamma from S_churn/num_steps,
# a draw every step even when gamma = 0, the 2nd-order correction on all but the last step).

def nvlabs_edm_sampler(net, latents_, randn_like, num_steps=18, sigma_min=0.002, sigma_max=80,
                       rho=7, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=F64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents_.to(F64) * t_steps[0]
    churned = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        if gamma > 0:
            churned.append(i)
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        denoised = net(x_hat, t_hat.expand(x_hat.shape[0]), None).to(F64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next.expand(x_next.shape[0]), None).to(F64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, churned


class Continuous(Rounded):
    """An EDM (continuous sigma) net: round_sigma is the identity, any sigma is supported."""

    def __init__(self, den):
        torch.nn.Module.__init__(self)
        self.den, self.sigma_min, self.sigma_max = den, 0.0, float("inf")

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


@pytest.mark.parametrize("net_kind", ["edm", "iddpm"])
@pytest.mark.parametrize("churn", [{}, dict(S_churn=40.0, S_min=0.05, S_max=50.0,
                                            S_noise=1.007), dict(S_churn=10.0)])
@pytest.mark.parametrize("num_steps", [2, 18])
def test_heun_program_is_nvlabs_edm_sampler(den, net_kind, churn, num_steps):
    """The heun program equals NVlabs' edm_sampler (Alg. 2 as they code it) with and without
    churn, on a continuous net and on iDDPM's rounded levels, to 1e-12 relative in float64
    (module docstring; measured <= 1e-15). NVlabs draws every step; the program only where
    gamma_i > 0, so the program gets NVlabs' draws of the churned steps."""
    net = Continuous(den) if net_kind == "edm" else Rounded(den, iDDPMPrecond())
    x = latents(2)
    eps = draws(num_steps, seed=7)
    replay = Replay(eps)
    want, churned = nvlabs_edm_sampler(net, x, replay.randn, num_steps=num_steps, **churn)
    assert replay.used == num_steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # iDDPM repeats a level at 18 steps
        plan = SamplingPlan.build(solver="heun", num_steps=num_steps,
                                  sigma_min=max(0.002, net.sigma_min),
                                  sigma_max=min(80.0, net.sigma_max),
                                  round_sigma=None if net_kind == "edm" else net.round_sigma,
                                  **churn)
    assert plan.num_noise == len(churned)
    if num_steps == 18:  # 2 steps (80, 0.002) lie outside S_min..S_max = 0.05..50: no churn
        assert (len(churned) > 0) == bool(churn)
    got = run(plan, den, x, eps[churned] if churned else None)
    assert rel_err(got, want) < 1e-12, rel_err(got, want)
    assert plan.num_evals == 2 * num_steps - 1


# ---------------------------------------------------------------------------------------------
# k-diffusion 0.1.1.post1

INSTALL_K = ("pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq trampoline")


@pytest.fixture(scope="module")
def k_sampling():
    """k_diffusion.sampling; a skip only off CI: with CI set, a missing k-diffusion fails."""
    from edm_fast.eval.benchmark import load_k_diffusion_sampling

    module = load_k_diffusion_sampling()
    if module is None:
        if os.environ.get("CI"):
            pytest.fail(f"k-diffusion is needed for these tests in CI: {INSTALL_K}")
        pytest.skip(f"k-diffusion is not installed ({INSTALL_K})")
    return module


K_CASES = [
    ("dpmpp_2m", {}, "sample_dpmpp_2m", {}),
    ("dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde", {}),  # eta 1
    ("dpmpp_2m_sde", dict(eta=0.0), "sample_dpmpp_2m_sde", dict(eta=0.0)),
    ("dpmpp_2m_sde", dict(eta=0.7, S_noise=1.01), "sample_dpmpp_2m_sde",
     dict(eta=0.7, s_noise=1.01)),
    ("dpmpp_3m_sde", {}, "sample_dpmpp_3m_sde", {}),  # eta 1
    ("dpmpp_3m_sde", dict(eta=0.0), "sample_dpmpp_3m_sde", dict(eta=0.0)),
    ("lms", {}, "sample_lms", {}),  # order 4
    ("lms", dict(order=2), "sample_lms", dict(order=2)),
    ("euler_ancestral", {}, "sample_euler_ancestral", {}),  # eta 1
    ("euler_ancestral", dict(eta=0.5, S_noise=1.01), "sample_euler_ancestral",
     dict(eta=0.5, s_noise=1.01)),
]


@pytest.mark.parametrize("num_steps", [2, 3, 10])
@pytest.mark.parametrize("solver, options, k_name, k_options", K_CASES,
                         ids=[c[0] + "".join(f"-{k}{v}" for k, v in c[1].items())
                              for c in K_CASES])
def test_programs_equal_k_diffusion(k_sampling, den, solver, options, k_name, k_options,
                                    num_steps):
    """Each program equals k-diffusion's function of the same name on the same grid and draws
    (replayed through noise_sampler), to 1e-10 relative. Not 1e-12: k-diffusion's lms integrates
    its Lagrange weights with scipy's quad (epsrel 1e-4 requested; exact for these cubics to
    ~1e-15 relative, but summed over weights of size ~10^2 at sigma = 80); measured <= 1e-14.
    (Their 2m_sde / 3m_sde fail with 1 step: h is unset on a lone step to 0; hence >= 2.)"""
    sigmas = edm_sigmas(num_steps)
    plan = SamplingPlan.build(solver=solver, sigmas=sigmas, **options)
    x, noise = latents(3), draws(20)
    replay = Replay(noise)
    k_opts = dict(k_options)
    if k_name != "sample_dpmpp_2m" and k_name != "sample_lms":
        k_opts["noise_sampler"] = replay.sampler
    want = getattr(k_sampling, k_name)(lambda xx, s, **kw: den(xx, s), x * sigmas[0], sigmas,
                                       disable=True, **k_opts)
    assert replay.used == plan.num_noise
    got = run(plan, den, x, noise[:max(plan.num_noise, 1)])
    assert rel_err(got, want) < 1e-10, rel_err(got, want)


# ---------------------------------------------------------------------------------------------
# UniPC-bh2 (Zhao et al. 2023, arXiv 2302.04867), transcribed from diffusers'
# UniPCMultistepScheduler (step, multistep_uni_p_bh_update, multistep_uni_c_bh_update) with
# predict_x0, solver_type 'bh2', lower_order_final, in the sigma domain (alpha_t = 1,
# lambda = -ln sigma): a plain loop over tensors, no Expr/ProgramBuilder.

def _lam(sigma):
    return -math.log(sigma) if sigma > 0 else math.inf


def _unipc_rb(rks, hh, order):
    """R (rows rks^(i-1)) and b (h phi_k k! / B(h)) of UniPC's linear systems, B(h) = e^hh - 1."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = math.expm1(hh)
    R, b = [], []
    for i in range(1, order + 1):
        R.append(torch.tensor(rks, dtype=F64) ** (i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return torch.stack(R), torch.tensor(b, dtype=F64), h_phi_1, B_h


def unipc_reference(denoiser, latents_, sigmas, solver_order):
    n = len(sigmas) - 1
    x = latents_ * sigmas[0]
    model_outputs: list = []  # oldest first, as diffusers' model_outputs
    step_sigmas: list = []  # the sigma index of each model output
    last_sample, this_order, lower_order_nums = None, None, 0

    def uni_p(m_list, idx_list, sample, step, order):
        s0, m0 = sigmas[step], m_list[-1]
        h = _lam(sigmas[step + 1]) - _lam(s0)
        rks, D1s = [], []
        for i in range(1, order):
            rk = (_lam(sigmas[idx_list[-(i + 1)]]) - _lam(s0)) / h
            rks.append(rk)
            D1s.append((m_list[-(i + 1)] - m0) / rk)
        rks.append(1.0)
        R, b, h_phi_1, B_h = _unipc_rb(rks, -h, order)
        x_t = sigmas[step + 1] / s0 * sample - h_phi_1 * m0
        if D1s:
            rhos_p = (torch.tensor([0.5], dtype=F64) if order == 2
                      else torch.linalg.solve(R[:-1, :-1], b[:-1]))
            x_t = x_t - B_h * sum(r * d for r, d in zip(rhos_p, D1s))
        return x_t

    def uni_c(model_t, m_list, idx_list, last, step, order):
        # corrects the predicted x at sigma[step] from last = x at sigma[step - 1]
        s0, m0 = sigmas[step - 1], m_list[-1]
        h = _lam(sigmas[step]) - _lam(s0)
        rks, D1s = [], []
        for i in range(1, order):
            rk = (_lam(sigmas[idx_list[-(i + 1)]]) - _lam(s0)) / h
            rks.append(rk)
            D1s.append((m_list[-(i + 1)] - m0) / rk)
        rks.append(1.0)
        R, b, h_phi_1, B_h = _unipc_rb(rks, -h, order)
        rhos_c = torch.tensor([0.5], dtype=F64) if order == 1 else torch.linalg.solve(R, b)
        x_t = sigmas[step] / s0 * last - h_phi_1 * m0
        corr = sum((r * d for r, d in zip(rhos_c[:-1], D1s)), torch.zeros_like(m0))
        return x_t - B_h * (corr + rhos_c[-1] * (model_t - m0))

    for step in range(n):
        model_t = denoiser(x, torch.full((x.shape[0],), sigmas[step], dtype=F64), None)
        if step > 0 and last_sample is not None:
            x = uni_c(model_t, model_outputs, step_sigmas, last_sample, step, this_order)
        model_outputs = (model_outputs + [model_t])[-solver_order:]
        step_sigmas = (step_sigmas + [step])[-solver_order:]
        this_order = min(min(solver_order, n - step), lower_order_nums + 1)
        last_sample = x
        x = uni_p(model_outputs, step_sigmas, x, step, this_order)
        lower_order_nums = min(lower_order_nums + 1, solver_order)
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_equals_transcription(den, order):
    """The unipc program equals the transcription above, orders 1-3, 2..10 steps to 0 and a
    grid ending at 0.02, to 1e-10 relative (float64; the transcription solves its 3x3 systems
    with torch.linalg.solve, the planner with numpy: both ~1e-15, measured <= 1e-14). The
    corrector before the step to 0 is skipped by the planner and applied by diffusers: both give
    x = D there, since that step multiplies the state by sigma_next/sigma = 0."""
    x = latents(4)
    worst = 0.0
    for sigmas in [grid_to_zero(n) for n in range(2, 11)] + [grid_positive(8)]:
        plan = SamplingPlan.build(solver="unipc", order=order, sigmas=sigmas)
        want = unipc_reference(den, x, sigmas, order)
        assert plan.num_evals == len(sigmas) - 1 and plan.num_noise == 0
        worst = max(worst, rel_err(run(plan, den, x), want))
    assert worst < 1e-10, worst


def test_unipc_orders_differ(den):
    """The orders are not the same method: on 10 steps, orders 1, 2, 3 differ pairwise by more
    than 1e-4 relative (so the transcription test above can tell a lost correction)."""
    x, sigmas = latents(4), grid_to_zero(10)
    out = [run(SamplingPlan.build(solver="unipc", order=p, sigmas=sigmas), den, x)
           for p in (1, 2, 3)]
    for a, b in itertools.combinations(out, 2):
        assert rel_err(a, b) > 1e-4


# ---------------------------------------------------------------------------------------------
# Global error orders against the RK4 probability-flow solution

@pytest.fixture(scope="module")
def ode_reference(den):
    """256 start points and the probability-flow ODE from sigma = 80 to 0.02 by RK4 with 1024
    steps (4e-11 from 2048 steps: far below every error measured below)."""
    x0 = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    return x0, solve_probability_flow(den, x0 * 80.0, 80.0, 0.02, num_steps=1024)


def fitted_order(nfes, errors):
    """Least-squares slope of log(error) against log(NFE): -p for a method of order p."""
    x = torch.tensor(nfes, dtype=F64).log()
    y = torch.tensor(errors, dtype=F64).log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


# (id, solver, options, NFE points, order, tolerance). Each order is asserted over one stated
# NFE range where it shows; the measured slopes (this fixture, float64) are in the comment.
ORDER_CASES = [
    # Euler: -0.99 over NFE 24..96 (and -1.00 from 12 to 256).
    ("euler", "euler", {}, [24, 32, 48, 64, 96], 1.0, 0.15),
    # Heun (2 NFE per step, no step to 0): -2.12 over 32..128; -2.27 over 12..96, where the
    # coarse end is still pre-asymptotic.
    ("heun", "heun", {}, [32, 48, 64, 96, 128], 2.0, 0.15),
    # DPM-Solver++(2M): -2.05 over 24..96.
    ("dpmpp_2m", "dpmpp_2m", {}, [24, 32, 48, 64, 96], 2.0, 0.15),
    # UniPC order 2: UniC raises UniP-2 to 3: -2.93 over 24..96 (-3.1 over 48..192).
    ("unipc2", "unipc", dict(order=2), [24, 32, 48, 64, 96], 3.0, 0.15),
    # UniPC order 3 (UniC: 4): -4.00 over 12..64. Beyond that the slope falls towards 2
    # (-2.99 over 32..128, -2.41 over 64..256): on this grid ending at 0.02 the last step is
    # UniP-1 (lower_order_final) with no corrector after it, a local error O(h^2), and the
    # first step is UniP-1 + UniC-1, O(h^3); both are damped by the flow but dominate at large
    # NFE. The same happens in the transcription of diffusers' scheduler (test above).
    ("unipc3", "unipc", dict(order=3), [12, 16, 24, 32, 48, 64], 4.0, 0.15),
    # iPNDM: Adams-Bashforth weights of an even grid used on the rho = 7 grid, whose step ratio
    # is 1 + O(h): order 2 at best whatever its order: -2.15 over 12..96 (-1.96 over 64..256).
    # Asserted as order >= 2 - 0.15.
    ("ipndm", "ipndm", {}, [12, 16, 24, 32, 48, 64, 96], 2.0, None),
    # LMS order 4 (exact Lagrange weights in sigma) reaches its order slowly on this stiff end
    # of the grid: -2.91 over 12..96, -3.84 over 96..256 (local slopes -3.76, -3.85, -3.91).
    # Asserted: slope over 96..256 in (-4.15, -3.6): an order-3 or even-grid-weight LMS
    # (order 2, as iPNDM) fails it.
    ("lms4", "lms", {}, [96, 128, 192, 256], 3.875, 0.275),
    # DPM-Solver++(3M), eta 0 (k-diffusion's): -3.04 over 12..64. Its first step is first order
    # (local error O(h^2)), so asymptotically it is a second-order method: -1.93 over 64..256,
    # checked on the next line.
    ("dpmpp_3m", "dpmpp_3m_sde", dict(eta=0.0), [12, 16, 24, 32, 48, 64], 3.0, 0.15),
    ("dpmpp_3m-asymptotic", "dpmpp_3m_sde", dict(eta=0.0), [64, 96, 128, 192, 256], 2.0, 0.15),
]


@pytest.mark.parametrize("name, solver, options, nfes, order, tol", ORDER_CASES,
                         ids=[c[0] for c in ORDER_CASES])
def test_global_error_order(den, ode_reference, name, solver, options, nfes, order, tol):
    """Global error at sigma = 0.02 (mean 2-norm over 256 start points, against RK4) falls as
    NFE^-order on the rho = 7 grid from 80 to 0.02 (no step to 0). Float64 and fixed seeds:
    the slopes are deterministic; the tolerance (+-0.15, stated per case above) is the
    pre-asymptotic curvature over the range, not noise."""
    x0, ref = ode_reference
    errors = []
    for nfe in nfes:
        plan = SamplingPlan.build(solver=solver, sigmas=grid_positive(nfe // 2 if solver == "heun"
                                                                      else nfe), **options)
        assert plan.num_evals == nfe
        errors.append((run(plan, den, x0) - ref).norm(dim=1).mean().item())
    slope = fitted_order(nfes, errors)
    if tol is None:
        assert slope < -(order - 0.15), (name, slope, errors)
    else:
        assert abs(slope + order) < tol, (name, slope, errors)


# ---------------------------------------------------------------------------------------------
# Guidance

class ClassMixture(torch.nn.Module):
    """A class-conditional toy: class k (one-hot label) is component k of the mixture alone,
    zero labels the whole mixture (what label dropout trains), all with their exact denoisers."""

    def __init__(self, mixture):
        super().__init__()
        self.uncond = mixture
        self.classes = [GaussianMixture([1.0], mixture.means[k:k + 1], mixture.covs[k:k + 1])
                        for k in range(mixture.num_components)]
        self.label_dim = mixture.num_components

    def forward(self, x, sigma, labels):
        out = self.uncond.denoise(x, sigma)
        if labels is None:
            return out
        sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1).expand(x.shape[0])
        for k, comp in enumerate(self.classes):
            rows = labels[:, k] > 0
            if rows.any():
                out[rows] = comp.denoise(x[rows], sigma[rows])
        return out


@pytest.mark.parametrize("solver, options", [("heun", {}), ("heun", CHURN), ("dpmpp_2m", {}),
                                             ("unipc", {}), ("euler_ancestral", {})])
@pytest.mark.parametrize("interval", [None, (0.3, 5.0)])
def test_guidance_interval_equals_guided_loop(mixture, solver, options, interval):
    """A plan with guidance w = 2.5 (and a guidance interval) equals a loop whose denoiser is
    D_u + w (D_c - D_u) for sigma in [lo, hi] and the plain conditional D_c outside, to 1e-12
    (float64, module docstring). The reference loops: sampling/reference.py for heun/dpmpp_2m/ancestral,
    the UniPC transcription above. The interval must act: the unguided-outside run differs
    from guiding everywhere by > 1e-3."""
    net = ClassMixture(mixture)
    w = 2.5
    lo, hi = interval if interval is not None else (0.0, math.inf)
    labels = torch.nn.functional.one_hot(torch.arange(BATCH) % 3, 3).to(F64)

    def guided_loop(x, sigma, _labels):
        s = float(sigma[0])
        cond = net(x, sigma, labels)
        if not lo <= s <= hi:
            return cond
        uncond = net(x, sigma, torch.zeros_like(labels))
        return uncond + w * (cond - uncond)

    sigmas = grid_to_zero(8)
    plan = SamplingPlan.build(solver=solver, sigmas=sigmas, guidance=w,
                              guidance_interval=interval, **options)
    x, noise = latents(5), draws(20)
    replay = Replay(noise)
    refs = {"heun": lambda: sample_edm(guided_loop, x, sigmas, randn=replay.randn, **options),
            "dpmpp_2m": lambda: sample_dpmpp_2m(guided_loop, x, sigmas),
            "euler_ancestral": lambda: sample_euler_ancestral(guided_loop, x, sigmas,
                                                              randn=replay.randn),
            "unipc": lambda: unipc_reference(guided_loop, x, sigmas, 3)}
    want = refs[solver]()
    assert replay.used == plan.num_noise
    got = run(plan, net, x, noise[:max(plan.num_noise, 1)], labels, guidance=w)
    assert rel_err(got, want) < 1e-12, rel_err(got, want)
    guided = [op.guided for op in plan.program.ops if op.kind == EVAL]
    assert guided == [lo <= s <= hi for s in plan.program.eval_sigmas]
    if interval is not None:
        assert 0 < sum(guided) < len(guided)
        everywhere = SamplingPlan.build(solver=solver, sigmas=sigmas, guidance=w, **options)
        other = run(everywhere, net, x, noise[:max(plan.num_noise, 1)], labels, guidance=w)
        assert rel_err(other, got) > 1e-3


# ---------------------------------------------------------------------------------------------
# Program and ProgramBuilder

def test_registers_are_reused():
    """Liveness allocation: euler needs 2 registers (state, D), heun <= 4 (x_hat, D, x', D'),
    whatever the step count; dpmpp_2m 3 (one older D kept)."""
    for n in (1, 2, 18, 64):
        assert SamplingPlan.build(solver="euler", num_steps=n).program.num_registers <= 2
        assert SamplingPlan.build(solver="heun", num_steps=n).program.num_registers <= 4
        assert SamplingPlan.build(solver="heun", num_steps=n,
                                  S_churn=40).program.num_registers <= 4
        assert SamplingPlan.build(solver="dpmpp_2m", num_steps=n).program.num_registers <= 3
    assert SamplingPlan.build(solver="euler", num_steps=18).program.num_registers == 2


def _program(ops, num_registers=2, output=0, num_noise=0):
    return Program(tuple(ops), num_registers, output, num_noise)


def test_validate_refuses_bad_programs():
    ok = [Op(LIN, 0, (LATENTS,), (80.0,)), Op(EVAL, 1, (0,), sigma=80.0),
          Op(LIN, 0, (0, 1), (0.5, 0.5))]
    _program(ok).validate()
    with pytest.raises(ValueError, match="reads register 1 before it is written"):
        _program([Op(LIN, 0, (LATENTS, 1), (1.0, 1.0))]).validate()
    with pytest.raises(ValueError, match="non-finite"):
        _program([Op(LIN, 0, (LATENTS,), (math.nan,))]).validate()
    with pytest.raises(ValueError, match="non-finite"):
        _program([Op(LIN, 0, (LATENTS,), (math.inf,))]).validate()
    with pytest.raises(ValueError, match="sigma > 0"):
        _program([Op(LIN, 0, (LATENTS,), (1.0,)), Op(EVAL, 1, (0,), sigma=0.0)]).validate()
    with pytest.raises(ValueError, match="sigma > 0"):  # an EVAL writing its own source
        _program([Op(LIN, 0, (LATENTS,), (1.0,)), Op(EVAL, 0, (0,), sigma=1.0)]).validate()
    with pytest.raises(ValueError, match="noise draw 1 of 1"):
        _program([Op(LIN, 0, (LATENTS, noise_source(1)), (1.0, 1.0))], num_noise=1).validate()
    with pytest.raises(ValueError, match="one coefficient per source"):
        _program([Op(LIN, 0, (LATENTS, LATENTS), (1.0,))]).validate()
    with pytest.raises(ValueError, match="writes register 2 of 2"):
        _program([Op(LIN, 2, (LATENTS,), (1.0,))]).validate()
    with pytest.raises(ValueError, match="output register"):
        _program([Op(LIN, 0, (LATENTS,), (1.0,))], output=1).validate()
    b = ProgramBuilder()
    with pytest.raises(ValueError, match="sigma > 0"):
        b.eval(b.latents(), 0.0)
    with pytest.raises(ValueError, match="no nonzero term"):
        b.value(b.latents() - b.latents() + b.noise() * 0.0)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_arrays_round_trip(solver):
    """arrays() is the program in CSR form: op i's terms are srcs/coefs[term_start[i]:
    term_start[i+1]] (an EVAL: its one source with coefficient 1); rebuilding the ops from the
    arrays gives the program back."""
    options = {"ddpm": {}, "heun": dict(S_churn=30.0)}.get(solver, {})
    program = SamplingPlan.build(solver=solver, num_steps=6, guidance=2.0,
                                 guidance_interval=(0.5, 10.0), **options).program
    a = program.arrays()
    starts = a["term_start"]
    assert starts[0] == 0 and starts[-1] == len(a["srcs"]) == len(a["coefs"])
    assert len(starts) == len(program.ops) + 1
    assert all(p <= q for p, q in itertools.pairwise(starts))
    rebuilt = []
    for i, kind in enumerate(a["kinds"]):
        srcs = tuple(a["srcs"][starts[i]:starts[i + 1]])
        coefs = tuple(a["coefs"][starts[i]:starts[i + 1]])
        if kind == EVAL:
            assert coefs == (1.0,)
            rebuilt.append(Op(EVAL, a["dsts"][i], srcs, (), a["sigmas"][i], bool(a["guided"][i])))
        else:
            rebuilt.append(Op(LIN, a["dsts"][i], srcs, coefs, a["sigmas"][i],
                              bool(a["guided"][i])))
    again = Program(tuple(rebuilt), a["num_registers"], a["output"], a["num_noise"]).validate()
    assert again == program


@pytest.mark.parametrize("n", [1, 2, 7, 18])
def test_nfe_per_solver(n):
    """NFE: heun 2N - 1 on a grid to 0 (no correction on the step to 0), 2N on a grid ending at a
    positive sigma; every other solver N. Evaluations happen at the grid's sigmas (heun: also
    at sigma_{i+1}), never at 0."""
    for solver in SOLVERS:
        options = {"eta": 0.0} if solver in ("dpmpp_2m_sde", "dpmpp_3m_sde") else {}
        to_zero = SamplingPlan.build(solver=solver, num_steps=n, **options)
        positive = SamplingPlan.build(solver=solver, sigmas=grid_positive(n), **options)
        if solver == "heun":
            assert (to_zero.num_evals, positive.num_evals) == (2 * n - 1, 2 * n)
        else:
            assert (to_zero.num_evals, positive.num_evals) == (n, n), solver
            assert to_zero.program.eval_sigmas == list(to_zero.sigmas[:-1]), solver
        assert min(to_zero.program.eval_sigmas) > 0
        assert to_zero.num_noise == 0 or solver in ("ddpm", "euler_ancestral")


# ---------------------------------------------------------------------------------------------
# SamplingPlan.build's option checks

@pytest.mark.parametrize("options, match", [
    (dict(solver="heun", eta=0.5), "eta does not apply to solver 'heun'"),
    (dict(solver="dpmpp_2m", S_churn=10.0), "S_churn/S_min/S_max does not apply"),
    (dict(solver="dpmpp_2m", S_max=10.0), "S_churn/S_min/S_max does not apply"),
    (dict(solver="euler", order=2), "order does not apply to solver 'euler'"),
    (dict(solver="dpmpp_2m", ode="vp"), "ode does not apply"),
    (dict(solver="euler", alpha=0.5), "alpha does not apply"),
    (dict(solver="heun", variance="beta_tilde"), "variance does not apply"),
    (dict(solver="unipc", S_noise=1.01), "S_noise does not apply"),
    (dict(solver="unipc", order=4), "order must be an integer 1..3"),
    (dict(solver="lms", order=0), "order must be an integer 1..4"),
    (dict(solver="ipndm", order=2.5), "order must be an integer"),
    (dict(solver="ipndm", order=True), "order must be an integer"),
    (dict(solver="lms", order=2.0), "order must be an integer"),
    (dict(solver="ddim", eta=-0.1), "eta must be a finite number >= 0"),
    (dict(solver="euler_ancestral", eta=math.nan), "eta must be a finite number"),
    (dict(solver="rk45"), "solver must be one of"),
    (dict(solver="heun", schedule="cosine"), "schedule must be one of"),
    (dict(solver="heun", guidance_interval=(0.3, 5.0)), "guidance_interval needs a guidance"),
    (dict(solver="heun", guidance=2.0, guidance_interval=(5.0, 0.3)), "guidance_interval"),
    (dict(solver="heun", guidance=2.0, guidance_interval=(-1.0, 0.3)), "guidance_interval"),
    (dict(solver="heun", guidance=math.inf), "guidance must be a finite weight"),
    (dict(solver="heun", ode="sde"), "ode must be one of"),
    (dict(solver="heun", alpha=0.0), "alpha must be in"),
    (dict(solver="ddpm", variance="fixed"), "variance must be"),
    (dict(solver="heun", S_churn=-1.0), "S_churn"),
])
def test_build_refuses_with_the_option_named(options, match):
    with pytest.raises(ValueError, match=match):
        SamplingPlan.build(num_steps=5, **options)


def test_build_accepts_what_each_solver_reads():
    """The options each solver lists are accepted (the refusals above are not blanket)."""
    SamplingPlan.build(solver="heun", ode="vp", alpha=0.5, S_churn=1.0, S_noise=1.01)
    SamplingPlan.build(solver="dpmpp_2m_sde", eta=0.0, S_noise=1.01)
    SamplingPlan.build(solver="unipc", order=1)
    SamplingPlan.build(solver="ddpm", variance="beta_tilde")
    for schedule in ("edm", "logsnr", "vp", "ve", "iddpm", "ddpm"):
        plan = SamplingPlan.build(solver="dpmpp_2m", num_steps=6, schedule=schedule)
        assert plan.num_steps == 6 and plan.sigmas[-1] == 0.0, schedule


def test_sampling_options_are_declared_once():
    """SamplingOptions is the one list of sampling options: SamplingPlan.build and Sampler take
    exactly its fields (build also takes the model's round_sigma), with the same defaults, and
    `edm-fast sample` offers each (but guidance, which each command words itself) with that
    default."""
    import inspect
    from dataclasses import fields

    from edm_fast.cli.main import build_parser
    from edm_fast.plan import SamplingOptions
    from edm_fast.sampling.sampler import Sampler

    declared = {f.name: f.default for f in fields(SamplingOptions)}
    build = {k: p.default for k, p in inspect.signature(SamplingPlan.build).parameters.items()
             if k != "round_sigma"}
    assert build == declared
    sampler = inspect.signature(Sampler).parameters
    assert {k: sampler[k].default for k in declared} == declared
    args = build_parser().parse_args(["sample"])
    for name, default in declared.items():
        if name != "guidance":
            assert getattr(args, name) == default, name
    assert build_parser().parse_args(["sample", "--guidance-interval", "0.5,inf",
                                      "--sigmas", "80,1,0"]).guidance_interval == (0.5, math.inf)
