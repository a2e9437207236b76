"""Preconditioning (EDM Eq. 7, Table 1, App. B.6): identities and the Denoiser wrapper."""

import math

import pytest
import torch
from torch import nn

from edm_fast.precond import (
    DDPMPrecond, Denoiser, EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond, make_precond,
    vp_sigma, vp_sigma_inv,
)
from edm_fast.nets.toy import GaussianMixture

SIGMAS = torch.logspace(math.log10(0.002), math.log10(80), 25, dtype=torch.float64)


def test_edm_coefficients_closed_form():
    """Table 1, "ours": check against the formulas written out independently."""
    sd = 0.5
    c_skip, c_out, c_in, c_noise = EDMPrecond(sd).coefficients(SIGMAS)
    for s, a, b, c, d in zip(SIGMAS.tolist(), c_skip, c_out, c_in, c_noise):
        assert math.isclose(a, sd**2 / (s**2 + sd**2), rel_tol=1e-14)
        assert math.isclose(b, s * sd / math.sqrt(s**2 + sd**2), rel_tol=1e-14)
        assert math.isclose(c, 1 / math.sqrt(s**2 + sd**2), rel_tol=1e-14)
        assert math.isclose(d, 0.25 * math.log(s), rel_tol=1e-14)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_unit_variance_input_and_target(sigma_data):
    """App. B.6 Eq. 114-123: for data of std sigma_data, Var[c_in (y + n)] = 1 and the effective
    target F_target = (y - c_skip (y + n)) / c_out has unit variance at every sigma, and c_skip
    minimises c_out (Eq. 131). Checked by Monte Carlo on a mixture with that std (1% = 4 SE)."""
    mix = GaussianMixture.isotropic([0.5, 0.5], [[-0.8 * sigma_data], [0.8 * sigma_data]],
                                    0.6 * sigma_data)
    assert math.isclose(mix.std(), sigma_data, rel_tol=1e-12)
    g = torch.Generator().manual_seed(0)
    y = mix.sample(200_000, generator=g)[:, 0]
    n = torch.randn(200_000, dtype=torch.float64, generator=g)
    precond = EDMPrecond(sigma_data)
    for sigma in (0.01, 0.3, 2.0, 60.0):
        c_skip, c_out, c_in, _ = precond.coefficients(torch.tensor(sigma, dtype=torch.float64))
        x = y + sigma * n
        assert abs((c_in * x).var().item() - 1) < 0.01
        assert abs(((y - c_skip * x) / c_out).var().item() - 1) < 0.01
        # analytic version: Var = c_in^2 (sd^2 + sigma^2) and the c_out^2 constraint (Eq. 123)
        assert math.isclose(float(c_in**2 * (sigma_data**2 + sigma**2)), 1, rel_tol=1e-12)
        expected = (1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * sigma**2
        assert math.isclose(float(c_out**2), float(expected), rel_tol=1e-12)


def test_denoiser_reproduces_eq7_exactly():
    """D = c_skip x + c_out F(c_in x; c_noise) for a known F, in float64, bit for bit."""
    seen = {}

    class RecordingNet(nn.Module):
        label_dim = 0

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

        def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
            seen["x_in"], seen["c_noise"] = x.clone(), noise_labels.clone()
            return torch.sin(x) * self.w + noise_labels.reshape(-1, 1, 1, 1)

    precond = EDMPrecond()
    den = Denoiser(RecordingNet(), precond)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    out = den(x, sigma)
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in precond.coefficients(sigma))
    F = torch.sin(c_in * x) * 0.7 + c_noise
    assert torch.equal(seen["x_in"], c_in * x)
    assert torch.equal(seen["c_noise"], c_noise.flatten())
    assert torch.allclose(out, c_skip * x + c_out * F, rtol=0, atol=1e-15)


def test_float64_state_around_a_float32_net_stays_float64():
    """The float64 golden reference with a float32 network: only F runs in float32; x, the
    coefficients and c_skip x + c_out F stay float64 (rounding D to the net's dtype would
    quietly make every 'float64' reference float32-accurate)."""

    class Float32Net(nn.Module):
        label_dim = 0

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(0.7))

        def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
            return torch.sin(x) * self.w

    precond = EDMPrecond()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    out = Denoiser(Float32Net(), precond)(x, sigma)
    c_skip, c_out, c_in, _ = (c.reshape(-1, 1) for c in precond.coefficients(sigma))
    F = (torch.sin((c_in * x).float()) * 0.7).double()
    assert out.dtype == torch.float64
    assert torch.allclose(out, c_skip * x + c_out * F, rtol=0, atol=1e-14)


def test_vp_ve_iddpm_table1():
    """Table 1's VP and VE columns against the closed forms written out here (float64: to
    1e-12 relative, rounding only)."""
    s = torch.tensor([0.01, 1.0, 40.0], dtype=torch.float64)
    vp = VPPrecond()
    c_skip, c_out, c_in, c_noise = vp.coefficients(s)
    assert torch.equal(c_skip, torch.ones(3, dtype=torch.float64))
    assert torch.equal(c_out, -s)
    assert torch.allclose(c_in, 1 / (s**2 + 1).sqrt(), rtol=1e-12, atol=0)
    # c_noise = (M - 1) sigma^-1(sigma), sigma^-1 = (sqrt(b_min^2 + 2 b_d ln(s^2 + 1)) - b_min)/b_d
    b_d, b_min = 19.9, 0.1
    t = ((b_min**2 + 2 * b_d * torch.log(s**2 + 1)).sqrt() - b_min) / b_d
    assert torch.allclose(c_noise, 999 * t, rtol=1e-12, atol=0)
    assert torch.allclose(vp_sigma(vp_sigma_inv(s)), s, rtol=1e-12)
    # the paper's VP range: sigma(eps_t = 1e-5) ~ 0.001 and sigma(1) ~ 152
    assert 0.0009 < vp.sigma_min < 0.0011 and 151 < vp.sigma_max < 153
    ve = VEPrecond()
    c_skip, c_out, c_in, c_noise = ve.coefficients(s)
    assert torch.equal(c_out, s) and torch.equal(c_in, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(c_noise, (s / 2).log(), rtol=1e-12, atol=0)


def test_iddpm_u_recursion_and_rounding():
    """u_M = 0 and u_{j-1} = sqrt((u_j^2 + 1)/max(abar_{j-1}/abar_j, C_1) - 1) (Table 1)."""
    p = iDDPMPrecond()
    u = p.u
    assert u[-1] == 0 and (u[:-1] > u[1:]).all()
    ab = [math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2 for j in range(1001)]
    for j in (1, 10, 500, 999, 1000):
        expect = math.sqrt((u[j].item() ** 2 + 1) / max(ab[j - 1] / ab[j], 0.001) - 1)
        assert math.isclose(u[j - 1].item(), expect, rel_tol=1e-12)
    sig = torch.tensor([u[3].item() * 1.0001, u[500].item() * 0.9999], dtype=torch.float64)
    assert torch.equal(p.round_sigma(sig), torch.stack([u[3], u[500]]))
    c_noise = p.coefficients(sig)[3]
    assert c_noise.tolist() == [1000 - 1 - 3, 1000 - 1 - 500]  # c_noise = M - 1 - j
    # j runs over 0..M with u_M = 0: below u_{M-1}/2 sigma rounds to 0 and c_noise is -1
    low = torch.tensor([u[999].item() * 0.49, u[999].item() * 0.51], dtype=torch.float64)
    assert p.round_sigma(low).tolist() == [0.0, u[999].item()]
    assert p.coefficients(low)[3].tolist() == [-1.0, 0.0]
    # a sampler grid must not step to 0 early (it would divide by t = 0): refused, clearly
    from edm_fast.plan import SamplingPlan
    from edm_fast.sampling.reference import sample_edm
    from edm_fast.schedules import edm_sigmas

    den = Denoiser(lambda x, c_noise, labels=None, augment_labels=None: x, p)
    with pytest.raises(ValueError, match="rounds to 0 on this model's discrete noise levels"):
        sample_edm(den, torch.zeros(1, 2), edm_sigmas(4, 0.002, 80))
    with pytest.raises(ValueError, match="rounds to 0"):
        SamplingPlan.build(num_steps=4, sigma_min=0.002, round_sigma=p.round_sigma)
    assert SamplingPlan.build(num_steps=4, sigma_min=p.sigma_min,
                              round_sigma=p.round_sigma).sigmas[-2] == p.sigma_min


def test_ddpm_levels():
    p = DDPMPrecond()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    assert torch.allclose(p.levels, ((1 - abar) / abar).sqrt())
    assert p.coefficients(p.levels[[0, 17, 999]])[3].tolist() == [0, 17, 999]


def test_make_precond_roundtrip_and_errors():
    for p in (EDMPrecond(0.7), VPPrecond(), VEPrecond(), iDDPMPrecond(), DDPMPrecond(500)):
        q = make_precond(p.config())
        assert type(q) is type(p) and q.config() == p.config()
    with pytest.raises(ValueError, match="unknown preconditioning"):
        make_precond("nope")


def test_denoiser_label_handling():
    class Net(nn.Module):
        label_dim = 3

        def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
            return x * 0 + class_labels.argmax(1).reshape(-1, 1).to(x.dtype)

    den = Denoiser(Net())
    x = torch.zeros(2, 5)
    out = den(x, 1.0, torch.tensor([2, 1]))
    c_out = EDMPrecond().coefficients(torch.tensor(1.0))[1]
    assert torch.allclose(out[:, 0], torch.tensor([2.0, 1.0]) * c_out)
    with pytest.raises(ValueError, match="class labels must lie"):
        den(x, 1.0, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class_labels must be"):
        den(x, 1.0, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="sigma must be"):
        den(x, torch.ones(3))
