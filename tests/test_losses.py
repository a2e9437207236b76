"""Training losses: EDM Eq. 8 weights and sigma distribution, DDPM's epsilon loss."""

import math

import pytest
import torch
from torch import nn

from edm_fast.losses import DDPMLoss, EDMLoss, VELoss, VPLoss, make_loss
from edm_fast.precond import DDPMPrecond, Denoiser, EDMPrecond


class _Zero(nn.Module):
    label_dim = 0

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return x * self.w


def test_edm_sigma_is_lognormal_and_weight_formula():
    loss = EDMLoss()
    like = torch.zeros(1, dtype=torch.float64)
    sigma = loss.sample_sigma(200_000, like, torch.Generator().manual_seed(0))
    logs = sigma.log()
    assert abs(logs.mean().item() + 1.2) < 0.01 and abs(logs.std().item() - 1.2) < 0.01
    s = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    expect = (s**2 + 0.25) / (s * 0.5) ** 2
    assert torch.allclose(loss.weight(s), expect)


def test_edm_loss_effective_weight_is_one():
    """With F = 0, D = c_skip x and the per-sigma loss is lambda c_skip-error; App. B.6: the
    effective weight lambda c_out^2 = 1, so E[loss | sigma] = Var[F_target] = 1 for data of std
    sigma_data. Checked by Monte Carlo at fixed sigma (200k Gaussian samples, 2% bound)."""
    den = Denoiser(_Zero().double(), EDMPrecond())
    y = torch.randn(200_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = y * 0.5
    loss = EDMLoss()
    for sigma in (0.05, 1.0, 20.0):
        loss.sample_sigma = lambda n, like, g, s=sigma: torch.full((n,), s, dtype=like.dtype)
        value = loss(den, y, generator=torch.Generator().manual_seed(2)).mean().item()
        assert abs(value - 1) < 0.02, (sigma, value)


def test_ddpm_loss_equals_epsilon_mse():
    """DDPMLoss is ||eps - F(x_t, t)||^2 with x_t = sqrt(abar) y + sqrt(1 - abar) eps; and in
    the denoiser form that equals ||(y - D(y + sigma_t eps))/sigma_t||^2."""
    seen = {}

    class Net(nn.Module):
        label_dim = 0

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

        def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
            seen["x"], seen["t"] = x, noise_labels
            return torch.tanh(x) * self.w

    precond = DDPMPrecond()
    den = Denoiser(Net(), precond)
    y = torch.randn(8, 3, dtype=torch.float64)
    out = DDPMLoss()(den, y, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(8, 3, dtype=torch.float64, generator=g)
    abar = precond.alpha_bars[t].reshape(-1, 1)
    x_t = abar.sqrt() * y + (1 - abar).sqrt() * eps
    assert torch.equal(seen["t"], t.double()) and torch.allclose(seen["x"], x_t)
    assert torch.allclose(out, (eps - 0.3 * torch.tanh(x_t)) ** 2)
    sigma = precond.levels[t]
    D = den(y + sigma.reshape(-1, 1) * eps, sigma)
    assert torch.allclose(out, ((y - D) / sigma.reshape(-1, 1)) ** 2, rtol=1e-9)


def test_vp_ve_losses_run_and_configs():
    den = Denoiser(_Zero(), EDMPrecond())
    y = torch.randn(4, 2)
    for loss in (VPLoss(), VELoss(), EDMLoss()):
        assert loss(den, y).shape == y.shape
        assert make_loss(loss.config()).config() == loss.config()
    with pytest.raises(ValueError, match="DDPMPrecond"):
        DDPMLoss()(den, y)
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("l1")
    assert math.isfinite(VELoss()(den, y).mean().item())


@pytest.mark.parametrize("loss", [VPLoss(), VELoss()])
def test_vp_ve_sigma_distributions_and_weights(loss):
    """Table 1's training distributions and weights, checked by value. The denoiser D(x) = x
    (so D - y = n = sigma eps) records the sigmas it is given: VP draws t ~ U(eps_t, 1) with
    sigma = sigma_vp(t), VE ln(sigma) ~ U(ln 0.02, ln 100); lambda = 1/sigma^2 makes every
    loss value eps^2, mean 1. Bounds: 100k draws, about 4.5 standard errors."""
    from edm_fast.precond import vp_sigma_inv

    seen = {}

    def identity(x, sigma, labels=None, augment_labels=None):
        seen["sigma"] = sigma
        return x

    n = 100_000
    value = loss(identity, torch.zeros(n, 1, dtype=torch.float64),
                 generator=torch.Generator().manual_seed(0))
    assert abs(value.mean().item() - 1) < 0.02
    if isinstance(loss, VPLoss):
        u = (vp_sigma_inv(seen["sigma"]) - loss.epsilon_t) / (1 - loss.epsilon_t)
    else:
        u = torch.log(seen["sigma"] / loss.sigma_min) / math.log(loss.sigma_max / loss.sigma_min)
    assert u.min() >= -1e-9 and u.max() <= 1 + 1e-9
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
