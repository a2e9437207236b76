"""The reference samplers, checked against mathematics with the exact Gaussian-mixture denoiser.

Tolerances are stated where they are used; the figures quoted in comments were measured with
these seeds on the development machine.
"""

import math

import pytest
import torch

from edm_fast.plan import SamplingPlan
from edm_fast.noise import SeedNoise
from edm_fast.sampling.reference import (
    NonFiniteError,
    churn_gammas,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_edm,
    sample_euler,
    sample_euler_ancestral,
    sample_general,
    sample_heun,
)
from edm_fast.schedules import (
    ScaleFunction,
    SigmaFunction,
    ddpm_sigmas,
    edm_sigmas,
    ve_sigmas,
    vp_sigmas,
)
from edm_fast.nets.toy import GaussianMixture, solve_probability_flow

F64 = torch.float64


@pytest.fixture(scope="module")
def mixture():
    covs = torch.tensor([[[0.09, 0.02], [0.02, 0.04]], [[0.04, 0.0], [0.0, 0.09]],
                         [[0.05, -0.02], [-0.02, 0.06]]], dtype=F64)
    return GaussianMixture([0.3, 0.5, 0.2], [[-1.0, 0.5], [1.0, -0.5], [0.2, 1.0]], covs)


def fitted_order(steps, errors):
    """Least-squares slope of log(error) against log(steps): -p for a method of order p."""
    x = torch.tensor(steps, dtype=F64).log()
    y = torch.tensor(errors, dtype=F64).log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


@pytest.fixture(scope="module")
def ode_reference(mixture):
    """256 start points and the probability-flow ODE solved from sigma = 80 to 0.02 by RK4 with
    1024 steps (error 4e-11 against 2048 steps: far below every error measured below)."""
    den = mixture.as_denoiser()
    x0 = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    return den, x0, solve_probability_flow(den, x0 * 80.0, 80.0, 0.02, num_steps=1024)


def grid(n):
    """n EDM steps (Eq. 5) from 80 down to 0.02, stopping there (no final step to 0)."""
    return edm_sigmas(n + 1, 0.02, 80.0)[:-1]


@pytest.mark.parametrize("name, run, steps, order", [
    ("euler", lambda d, x, s: sample_euler(d, x, s), [16, 32, 64, 128, 256], 1.0),
    ("heun", lambda d, x, s: sample_edm(d, x, s), [16, 32, 64, 128], 2.0),
    ("midpoint", lambda d, x, s: sample_general(d, x, s, alpha=0.5), [32, 64, 128, 256], 2.0),
    ("dpmpp_2m", lambda d, x, s: sample_dpmpp_2m(d, x, s), [16, 32, 64, 128], 2.0),
])
def test_global_error_order(ode_reference, name, run, steps, order):
    """Global error at sigma = 0.02 against the RK4 solution falls as steps^-order.

    Measured slopes: Euler -1.00, Heun -2.10, midpoint (alpha = 1/2, from 32 steps) -1.90,
    DPM-Solver++(2M) -2.08. Tolerance +-0.15 around the theoretical order: the asymptotic regime
    is reached from 16 (midpoint: 32) steps on; the rest is higher-order terms at the coarse end."""
    den, x0, ref = ode_reference
    errors = [(run(den, x0, grid(n)) - ref).norm(dim=1).mean().item() for n in steps]
    slope = fitted_order(steps, errors)
    assert abs(slope + order) < 0.15, (name, slope, errors)


def component_stats(mixture, x):
    """Assign samples to components (max responsibility; components are > 6 std apart) and
    return z-scores of weights and means, and covariance errors in units of their SE."""
    n = x.shape[0]
    k = mixture.responsibilities(x).argmax(1)
    w = torch.bincount(k, minlength=mixture.num_components).to(F64) / n
    z_w = ((w - mixture.weights) / (mixture.weights * (1 - mixture.weights) / n).sqrt()).abs()
    z_mean, z_cov, rel_cov = [], [], []
    for j in range(mixture.num_components):
        xs = x[k == j]
        sd = mixture.covs[j].diagonal().sqrt()
        z_mean.append(((xs.mean(0) - mixture.means[j]) / (sd / math.sqrt(len(xs)))).abs().max())
        rel = ((torch.cov(xs.T) - mixture.covs[j]) / torch.outer(sd, sd)).abs().max()
        rel_cov.append(rel)
        z_cov.append(rel / math.sqrt(2 / len(xs)))  # SE of a correlation-scaled covariance
    return z_w.max().item(), max(z_mean).item(), max(z_cov).item(), max(rel_cov).item()


def test_heun_samples_follow_the_true_mixture(mixture):
    """20k samples of EDM's Heun sampler, converged (128 steps): component weights, means and
    covariances agree with the true mixture within 5 standard errors (12 statistics, so 5 SE is
    a Bonferroni-safe bound). Measured max z: weights 0.1, means 1.8, covariances 3.0."""
    noise = torch.randn(20_000, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    x = sample_edm(mixture.as_denoiser(), noise, edm_sigmas(128))
    z_w, z_mean, z_cov, _ = component_stats(mixture, x)
    assert z_w < 5 and z_mean < 5 and z_cov < 5, (z_w, z_mean, z_cov)


def test_heun_18_steps_mixture_and_its_known_bias(mixture):
    """The paper's 18 steps (35 NFE) get the component weights right (within 5 SE) but are not
    converged on a sharp mixture: they over-disperse each component. The same happens for one
    Gaussian of std 0.5 = sigma_data, where the exact ODE map is linear and 18 Heun steps
    overshoot the final std by 5.53% (k-diffusion's sample_heun gives the same 1.0553). Bounds:
    weights 5 SE; component means within 0.06 absolute; covariances within 30% relative
    (measured: weights z 0.3, means 0.042, covariances 11.7%)."""
    noise = torch.randn(20_000, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    x = sample_edm(mixture.as_denoiser(), noise, edm_sigmas(18))
    z_w, _, _, rel_cov = component_stats(mixture, x)
    k = mixture.responsibilities(x).argmax(1)
    mean_err = max((x[k == j].mean(0) - mixture.means[j]).abs().max().item() for j in range(3))
    assert z_w < 5 and mean_err < 0.06 and rel_cov < 0.30, (z_w, mean_err, rel_cov)
    gauss = GaussianMixture.isotropic([1.0], [[0.0]], 0.5)
    one = sample_edm(gauss.as_denoiser(), torch.ones(1, 1, dtype=F64), edm_sigmas(18))
    exact = 80 * 0.5 / math.sqrt(0.25 + 80**2)
    assert one.item() / exact == pytest.approx(1.0553, abs=2e-4)


def test_general_sampler_reduces_to_edm(mixture):
    """sigma(t) = t, s(t) = 1, alpha = 1: Alg. 1 in general form equals Alg. 2 with the same
    churn noise, to float64 rounding (1e-12 relative)."""
    den = mixture.as_denoiser()
    noise = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    for opts in ({}, {"S_churn": 30.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.007},
                 {"S_churn": 30.0, "S_noise": 1.007}):  # S_max = inf: step 0 churns too
        a = sample_edm(den, noise, edm_sigmas(12), randn=SeedNoise(range(64), (2,), dtype=F64)
                       .randn_like, **opts)
        b = sample_general(den, noise, edm_sigmas(12), randn=SeedNoise(range(64), (2,),
                           dtype=F64).randn_like, **opts)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    c = sample_general(den, noise, edm_sigmas(12), solver="euler")
    assert torch.allclose(c, sample_euler(den, noise, edm_sigmas(12)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule, scaling, make_sigmas", [
    ("vp", "vp", lambda n: vp_sigmas(n + 1)[:-1]),
    ("ve", "none", lambda n: ve_sigmas(n + 1)[:-1]),
    ("linear", "vp", lambda n: edm_sigmas(n + 1, 0.02, 80.0)[:-1]),
])
def test_vp_ve_odes_match_closed_form(schedule, scaling, make_sigmas):
    """For data N(mu, s^2) the probability-flow ODE has the closed form
    x(t)/s(t) = mu + (x(t0)/s(t0) - mu) sqrt(s^2 + sigma(t)^2) / sqrt(s^2 + sigma(t0)^2).
    The general Heun sampler with the VP / VE sigma(t), s(t) of Table 1 converges to it at
    order 2 (slope within 0.2 of -2). At 64 steps the error is 4.4e-2 for VE on its own grid,
    1.9e-3 for the EDM grid with VP scaling and smaller still for VP: the paper's point that the
    VE parameterisation needs many more steps."""
    mu, s_data = 0.3, 0.5
    gauss = GaussianMixture.isotropic([1.0], [[mu]], s_data)
    den = gauss.as_denoiser()
    sig = SigmaFunction(schedule)
    scale = ScaleFunction(scaling, sig)
    noise = torch.linspace(-2, 2, 9, dtype=F64).reshape(9, 1)
    errors = []
    for n in (16, 32, 64):
        sigmas = make_sigmas(n)
        s0, s1 = sigmas[0].item(), sigmas[-1].item()
        t1 = sig.inv(s1)
        x_end = sample_general(den, noise, sigmas, schedule=schedule, scaling=scaling)
        shrink = math.sqrt((s_data**2 + s1**2) / (s_data**2 + s0**2))
        exact_unscaled = mu + (noise * s0 - mu) * shrink
        errors.append((x_end / scale(t1).item() - exact_unscaled).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert abs(fitted_order([16, 32, 64], errors) + 2) < 0.2, errors


@pytest.mark.parametrize("S_churn", [0.0, 40.0])
def test_float32_matches_float64_reference(mixture, S_churn):
    """The same noise in float32 and float64: relative error (2-norm over the batch) below 1e-5.
    The exact denoiser computes in float64 either way, so this isolates the sampler's float32
    state: ~35 evaluations each rounding at 6e-8 relative (measured 1.5e-7 / 1.6e-7)."""
    den = mixture.as_denoiser()
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(3))
    opts = dict(S_churn=S_churn, S_min=0.01, S_max=10.0)
    x64 = sample_edm(den, noise.double(), edm_sigmas(18),
                     randn=SeedNoise(range(512), (2,), dtype=F64).randn_like, **opts)
    x32 = sample_edm(den, noise, edm_sigmas(18),
                     randn=SeedNoise(range(512), (2,)).randn_like, **opts)
    assert x32.dtype == torch.float32
    rel = ((x32.double() - x64).norm() / x64.norm()).item()
    assert rel < 1e-5, rel


def test_per_seed_noise_is_batch_invariant(mixture):
    """Seeds 0-7 sampled in one batch equal the same seeds sampled one at a time, churn on."""
    den = mixture.as_denoiser()
    opts = dict(S_churn=20.0, S_min=0.05, S_max=20.0)

    def run(seeds):
        noise = SeedNoise(seeds, (2,), dtype=F64)
        return sample_edm(den, noise.draw(), edm_sigmas(10), randn=noise.randn_like, **opts)

    batch = run(range(8))
    single = torch.cat([run([s]) for s in range(8)])
    assert torch.allclose(batch, single, rtol=1e-13, atol=1e-13)
    shuffled = run([5, 2, 7])
    assert torch.allclose(shuffled, batch[[5, 2, 7]], rtol=1e-13, atol=1e-13)
    # and the noise itself is bitwise batch-invariant
    assert torch.equal(SeedNoise([3, 4], (5,)).draw()[1], SeedNoise([4], (5,)).draw()[0])


def test_randn_called_only_on_churn_steps(mixture):
    """No noise is drawn on steps with gamma_i = 0 (gamma_i of Alg. 2, l.4-6)."""
    den = mixture.as_denoiser()
    calls = []

    def randn(x):
        calls.append(x.shape)
        return torch.randn_like(x)

    sigmas = edm_sigmas(18)
    sample_edm(den, torch.randn(4, 2, dtype=F64), sigmas, randn=randn)
    assert calls == []
    sample_edm(den, torch.randn(4, 2, dtype=F64), sigmas, S_churn=10, S_min=0.05, S_max=1.0,
               randn=randn)
    expected = sum(1 for g in churn_gammas(sigmas.tolist(), 10, 0.05, 1.0) if g > 0)
    assert 0 < len(calls) == expected < 18


def test_churn_gammas_formula():
    sig = edm_sigmas(10).tolist()
    g = churn_gammas(sig, 40.0, 0.05, 50.0)
    assert g[0] == 0.0  # sigma_0 = 80 > S_max
    assert all(v == pytest.approx(math.sqrt(2) - 1) for v, s in zip(g, sig) if 0.05 <= s <= 50)
    assert churn_gammas(sig, 1.0, 0, float("inf"))[3] == pytest.approx(0.1)  # S_churn / N


def test_ddim_is_the_vp_ddim_update(mixture):
    """sample_ddim (eta = 0) equals DDIM written in DDPM's variables (Song et al. 2021a, Eq. 12):
    x_{t'} = sqrt(abar') x0_hat + sqrt(1 - abar') eps_hat, on DDPM's strided grid."""
    den = mixture.as_denoiser()
    sigmas = ddpm_sigmas(25)
    noise = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    ours = sample_ddim(den, noise, sigmas)
    abar = 1 / (1 + sigmas**2)
    x_t = noise * sigmas[0] * abar[0].sqrt()
    for i in range(25):
        x = x_t / abar[i].sqrt()
        x0 = den(x, sigmas[i].expand(32))
        eps = (x - x0) / sigmas[i]
        x_t = abar[i + 1].sqrt() * x0 + (1 - abar[i + 1]).sqrt() * eps
    assert torch.allclose(ours, x_t, rtol=1e-12, atol=1e-12)


def test_ddpm_ancestral_matches_ho_and_posterior_form(mixture):
    """sample_ddpm over all 1000 DDPM steps equals Ho et al.'s Algorithm 2 written with their
    alpha_t, beta_t arrays; the beta-tilde variant equals ancestral Euler with eta = 1."""
    den = mixture.as_denoiser()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    sigmas = ddpm_sigmas(1000)
    assert torch.allclose(sigmas[:-1], ((1 - abar) / abar).sqrt().flip(0), rtol=1e-12)
    n = 16
    noise = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    ours = sample_ddpm(den, noise, sigmas, randn=SeedNoise(range(n), (2,), dtype=F64).randn_like)
    stream = SeedNoise(range(n), (2,), dtype=F64)
    x = noise
    for t in range(999, -1, -1):  # Ho et al. Alg. 2, t = T..1 (0-based here)
        sig = ((1 - abar[t]) / abar[t]).sqrt()
        x_tilde = x / abar[t].sqrt()
        eps = (x_tilde - den(x_tilde, sig.expand(n))) / sig
        x = (x - betas[t] / (1 - abar[t]).sqrt() * eps) / alphas[t].sqrt()
        if t > 0:
            x = x + betas[t].sqrt() * stream.draw()
    assert torch.allclose(ours, x, rtol=1e-12, atol=1e-12)  # 1000 float64 steps: 5e-14 measured
    grid = ddpm_sigmas(50)
    a = sample_ddpm(den, noise, grid, variance="beta_tilde",
                    randn=SeedNoise(range(n), (2,), dtype=F64).randn_like)
    scaled = noise * math.sqrt(1 + grid[0].item() ** 2) / grid[0].item()
    b = sample_euler_ancestral(den, scaled, grid, eta=1.0,
                               randn=SeedNoise(range(n), (2,), dtype=F64).randn_like)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)  # float64 rounding: 1e-14 measured


def test_stochastic_samplers_reach_the_mixture(mixture):
    """Ancestral DDPM (200 strided steps) and EDM with churn (Alg. 2, 64 steps) draw from the
    true mixture: weights and means within 5 SE on 10k samples."""
    den = mixture.as_denoiser()
    gen = torch.Generator().manual_seed(6)
    latents = torch.randn(10_000, 2, dtype=F64, generator=gen)

    def randn(x):
        return torch.randn(x.shape, dtype=x.dtype, generator=gen)

    runs = {
        "ddpm": sample_ddpm(den, latents, ddpm_sigmas(200), randn=randn),
        "edm_churn": sample_edm(den, latents, edm_sigmas(64), S_churn=20, S_min=0.01, S_max=5,
                                randn=randn),
    }
    for name, x in runs.items():
        z_w, z_mean, _, _ = component_stats(mixture, x)
        assert z_w < 5 and z_mean < 5, (name, z_w, z_mean)


def test_callback_and_sample_heun(mixture):
    den = mixture.as_denoiser()
    seen = []
    x = sample_heun(den, torch.randn(3, 2, dtype=F64), edm_sigmas(5), callback=seen.append)
    assert [info["i"] for info in seen] == list(range(5))
    assert [info["sigma"] for info in seen] == edm_sigmas(5)[1:].tolist()
    assert torch.equal(seen[-1]["x"], x)
    assert all(info["denoised"].shape == (3, 2) for info in seen)


def test_input_validation(mixture):
    den = mixture.as_denoiser()
    noise = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="decreasing"):
        sample_edm(den, noise, [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="batch"):
        sample_edm(den, noise, edm_sigmas(3), class_labels=torch.zeros(3, 10))
    with pytest.raises(ValueError, match="noise must be"):
        sample_edm(den, torch.arange(4), edm_sigmas(3))
    with pytest.raises(ValueError, match="solver"):
        sample_edm(den, noise, edm_sigmas(3), solver="rk4")
    with pytest.raises(ValueError, match="returned shape"):
        sample_edm(lambda x, s, c: x[:, :1], noise, edm_sigmas(3))
    with pytest.raises(ValueError, match="S_churn"):
        sample_edm(den, noise, edm_sigmas(3), S_churn=-1)
    nan, inf = float("nan"), float("inf")
    for bad, match in (({"S_churn": nan}, "S_churn"), ({"S_churn": inf}, "S_churn"),
                       ({"S_noise": nan}, "S_noise"), ({"S_noise": -1.0}, "S_noise"),
                       ({"S_min": nan}, "S_min and S_max"), ({"S_max": nan}, "S_min and S_max")):
        with pytest.raises(ValueError, match=match):  # NaN would turn churn off or poison x
            sample_edm(den, noise, edm_sigmas(3), **bad)
        with pytest.raises(ValueError, match=match):
            SamplingPlan.build(num_steps=3, **bad)
    # an empty churn range (S_min > S_max) is allowed: no step churns
    assert SamplingPlan.build(num_steps=3, S_churn=10, S_min=5, S_max=1).num_noise == 0


def test_nonfinite_denoiser_is_reported():
    calls = []

    def broken(x, sigma, labels):
        calls.append(1)
        return x * float("nan") if len(calls) == 4 else x * 0

    with pytest.raises(NonFiniteError, match="evaluation 3"):
        sample_edm(broken, torch.randn(2, 3), edm_sigmas(6))


def test_churn_range_includes_both_ends():
    """gamma_i > 0 exactly when t_i lies in the closed range [S_min, S_max] (Alg. 2)."""
    gammas = churn_gammas([5.0, 2.0, 1.0, 0.5, 0.0], 0.4, S_min=1.0, S_max=5.0)
    assert gammas == [pytest.approx(0.1)] * 3 + [0.0]


def test_general_churn_adds_noise_to_the_unscaled_state(mixture):
    """With s(t) != 1 (VP scaling) Alg. 2's churn acts on x/s: x_hat/s(t_hat) - x_i/s(t_i) =
    sqrt(sigma_hat^2 - sigma_i^2) S_noise eps, to float64 rounding (1e-10 relative)."""
    den = mixture.as_denoiser()
    eps = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    seen = []
    sigmas = edm_sigmas(6)
    sample_general(den, torch.randn(8, 2, dtype=F64), sigmas, scaling="vp", S_churn=10,
                   S_noise=1.01, randn=lambda x: eps, callback=seen.append)
    s = ScaleFunction("vp", SigmaFunction("linear"))  # sigma(t) = t: t is sigma
    for i in (1, 3):  # x_i is the state the callback reported after step i - 1
        t_cur, t_hat = float(sigmas[i]), seen[i]["sigma_hat"]
        assert t_hat > t_cur
        moved = seen[i]["x_hat"] / float(s(t_hat)) - seen[i - 1]["x"] / float(s(t_cur))
        want = math.sqrt(t_hat**2 - t_cur**2) * 1.01 * eps
        assert torch.allclose(moved, want, rtol=1e-10, atol=1e-12)


def test_dpmpp_2m_matches_k_diffusion(mixture):
    """DPM-Solver++(2M) against k-diffusion's sample_dpmpp_2m on the same grid (to 1e-12): the
    order test alone accepted a swapped step ratio (slope -1.90 vs -2.08)."""
    import importlib.util

    if importlib.util.find_spec("k_diffusion") is None:
        pytest.skip("k-diffusion is not installed")
    from edm_fast.eval.benchmark import load_k_diffusion_sampling

    K = load_k_diffusion_sampling()
    den = mixture.as_denoiser()
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    sigmas = edm_sigmas(10)
    theirs = K.sample_dpmpp_2m(lambda x, s, **kw: den(x, s.expand(x.shape[0])), x * sigmas[0],
                               sigmas, disable=True)
    assert torch.allclose(sample_dpmpp_2m(den, x, sigmas), theirs, rtol=1e-12, atol=1e-12)
