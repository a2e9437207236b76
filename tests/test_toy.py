"""The Gaussian-mixture toy: its exact denoiser is checked against brute-force integration."""

import math

import pytest
import torch

from edm_fast.nets.toy import GaussianMixture


@pytest.fixture
def mixture():
    covs = torch.tensor([[[0.20, 0.05], [0.05, 0.10]], [[0.05, 0.0], [0.0, 0.30]]])
    return GaussianMixture([0.4, 0.6], [[-1.0, 0.5], [1.0, -0.3]], covs)


def test_denoiser_equals_posterior_mean_by_importance_sampling(mixture):
    """D*(x; sigma) = E[y | x]: estimate E[y | x] as sum_j y_j N(x; y_j, sigma^2) / sum_j N(...)
    over 400k prior samples y_j; the Monte Carlo error is ~1e-3 at these sigmas."""
    g = torch.Generator().manual_seed(0)
    y = mixture.sample(400_000, generator=g)
    x = torch.tensor([[0.0, 0.0], [1.2, -0.5], [-2.0, 1.0]], dtype=torch.float64)
    for sigma in (0.3, 1.0, 3.0):
        logw = -((x[:, None, :] - y[None]) ** 2).sum(-1) / (2 * sigma**2)
        w = torch.softmax(logw, dim=1)
        mc = w @ y
        exact = mixture.denoise(x, sigma)
        assert torch.allclose(exact, mc, atol=1e-2), (sigma, exact, mc)  # ~10x the MC error


def test_score_is_gradient_of_log_density(mixture):
    """grad log p(x; sigma) by autograd equals (D - x)/sigma^2 (EDM Eq. 3)."""
    x = torch.tensor([[0.3, -0.2], [-1.5, 0.7]], dtype=torch.float64, requires_grad=True)
    for sigma in (0.05, 0.5, 5.0):
        (grad,) = torch.autograd.grad(mixture.log_prob(x, sigma).sum(), x)
        assert torch.allclose(mixture.score(x.detach(), sigma), grad, rtol=1e-9, atol=1e-12)


def test_density_normalised_and_moments(mixture):
    """p(x; 0.5) integrates to 1 on a grid; sample moments match mean() and covariance()."""
    lin = torch.linspace(-6, 6, 601, dtype=torch.float64)
    xx, yy = torch.meshgrid(lin, lin, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    mass = mixture.log_prob(pts, 0.5).exp().sum() * (lin[1] - lin[0]) ** 2
    assert abs(mass.item() - 1) < 1e-6
    s = mixture.sample(200_000, generator=torch.Generator().manual_seed(1))
    # 200k samples: the standard error of a mean or a covariance entry is a few 1e-3 here
    assert torch.allclose(s.mean(0), mixture.mean(), atol=0.01)
    assert torch.allclose(torch.cov(s.T), mixture.covariance(), atol=0.01)


def test_shapes_and_errors(mixture):
    x = torch.zeros(4, 1, 2, 1)
    assert mixture.denoise(x, torch.full((4,), 1.0)).shape == x.shape
    with pytest.raises(ValueError, match="expected 2 values"):
        mixture.denoise(torch.zeros(3, 5), 1.0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([1.0], [[0.0], [1.0]], torch.ones(2, 1, 1))
    iso = GaussianMixture.isotropic([1.0], [[0.0] * 3], 0.5)
    assert math.isclose(iso.std(), 0.5)
