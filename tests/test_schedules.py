"""Sigma discretisations (EDM Eq. 5, Table 1) and the sigma(t), s(t) families."""

import math

import pytest
import torch

from edm_fast.precond import iDDPMPrecond, vp_sigma
from edm_fast.schedules import (
    ScaleFunction, SigmaFunction, ddpm_sigmas, edm_sigmas, get_sigmas, iddpm_sigmas,
    validate_sigmas, ve_sigmas, vp_sigmas,
)


@pytest.mark.parametrize("n", [1, 2, 18, 64])
def test_edm_sigmas_formula(n):
    s = edm_sigmas(n)
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert s[0].item() == pytest.approx(80.0, rel=1e-14) and s[-1].item() == 0.0
    if n > 1:
        assert s[n - 1].item() == pytest.approx(0.002, rel=1e-12)
    for i in range(n):  # Eq. 5 written out in plain floats
        frac = i / (n - 1) if n > 1 else 0.0
        expect = (80 ** (1 / 7) + frac * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        assert math.isclose(s[i].item(), expect, rel_tol=1e-13)
    assert (s[1:] < s[:-1]).all()


def test_edm_sigmas_validation():
    with pytest.raises(ValueError, match="num_steps"):
        edm_sigmas(0)
    with pytest.raises(ValueError, match="num_steps"):
        edm_sigmas(2.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        edm_sigmas(10, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        edm_sigmas(10, sigma_min=0.0)
    for rho in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="rho must be a positive finite number"):
            edm_sigmas(10, rho=rho)
    with pytest.raises(ValueError, match="rho=0.001 is too small"):  # was an OverflowError
        edm_sigmas(10, rho=1e-3)
    with pytest.raises(ValueError, match="rho=1e\\+30 gives 10 sigmas that are not finite"):
        edm_sigmas(10, rho=1e30)  # 80^(1/rho) = 1 for every sigma: a grid of equal levels
    assert (edm_sigmas(10, rho=0.05)[:-1].diff() < 0).all()  # small but usable


def test_other_discretisations_endpoints():
    vp = vp_sigmas(10)
    assert math.isclose(vp[0].item(), vp_sigma(1.0).item(), rel_tol=1e-14)
    assert math.isclose(vp[-2].item(), vp_sigma(1e-3).item(), rel_tol=1e-14)
    ve = ve_sigmas(10)
    assert math.isclose(ve[0].item(), 100, rel_tol=1e-14)
    assert math.isclose(ve[-2].item(), 0.02, rel_tol=1e-12)
    ratios = ve[1:-1] / ve[:-2]  # geometric in sigma
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))
    u = iDDPMPrecond().u
    idd = iddpm_sigmas(10)
    assert idd[0] == u[8] and idd[-2] == u[999]
    dd = ddpm_sigmas(4)
    assert dd[-1] == 0 and (dd[:-1][1:] < dd[:-1][:-1]).all()
    assert torch.equal(get_sigmas("edm", 5), edm_sigmas(5))
    with pytest.raises(ValueError, match="unknown schedule"):
        get_sigmas("cosine", 5)


def test_validate_sigmas():
    assert validate_sigmas([3.0, 1.0, 0.0]) == [3.0, 1.0, 0.0]
    for bad, msg in [([1.0, 2.0, 0.0], "decreasing"), ([1.0], "at least 2"),
                     ([1.0, 0.0, 0.0], "positive|decreasing"), ([float("nan"), 0.0], "finite"),
                     ([2.0, -1.0], "positive")]:
        with pytest.raises(ValueError, match=msg):
            validate_sigmas(bad)


@pytest.mark.parametrize("name", ["linear", "ve", "vp"])
def test_sigma_function_derivative_and_inverse(name):
    f = SigmaFunction(name)
    t = torch.tensor([0.05, 0.3, 0.9], dtype=torch.float64)
    h = 1e-6
    numeric = (f(t + h) - f(t - h)) / (2 * h)
    assert torch.allclose(f.deriv(t), numeric, rtol=1e-7)
    assert torch.allclose(f.inv(f(t)), t, rtol=1e-12)


@pytest.mark.parametrize("sigma_name", ["linear", "vp"])
@pytest.mark.parametrize("scale_name", ["none", "vp"])
def test_scale_function_derivative(sigma_name, scale_name):
    s = ScaleFunction(scale_name, SigmaFunction(sigma_name))
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    h = 1e-6
    assert torch.allclose(s.deriv(t), (s(t + h) - s(t - h)) / (2 * h), rtol=1e-6, atol=1e-12)
    if scale_name == "vp" and sigma_name == "vp":  # Table 1: s = exp(-(beta_d t^2/2+beta_min t)/2)
        assert torch.allclose(s(t), (-(0.5 * 19.9 * t**2 + 0.1 * t) / 2).exp(), rtol=1e-12)


def test_bad_family_names():
    with pytest.raises(ValueError, match="unknown sigma"):
        SigmaFunction("cosine")
    with pytest.raises(ValueError, match="unknown s"):
        ScaleFunction("sub-vp", SigmaFunction("linear"))


@pytest.mark.parametrize("n", [10, 18, 40])
def test_iddpm_sigmas_round_every_index(n):
    """Table 1's iDDPM steps: sigma_i = u_{j_i} with j_i = floor(j_0 + (M - 1 - j_0) i / (N - 1)
    + 1/2), j_0 = 8, M = 1000, at every index (a floor instead of the rounding kept the
    endpoints right)."""
    u = iDDPMPrecond().u
    j = [math.floor(8 + (999 - 8) * i / (n - 1) + 0.5) for i in range(n)]
    assert iddpm_sigmas(n)[:-1].tolist() == u[j].tolist()
