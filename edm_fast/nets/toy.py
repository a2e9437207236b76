"""Gaussian-mixture data with its exact denoiser, exact score and exact density.

For data y ~ sum_k w_k N(mu_k, Sigma_k), the noisy marginal p(x; sigma) (EDM Sec. 2) is again a
mixture, sum_k w_k N(mu_k, C_k) with C_k = Sigma_k + sigma^2 I, and the ideal denoiser
(the minimiser of EDM Eq. 2; App. B.3) has the closed form

    D*(x; sigma) = E[y | x] = sum_k r_k(x) (mu_k + Sigma_k C_k^{-1} (x - mu_k)),
    r_k(x) = w_k N(x; mu_k, C_k) / sum_j w_j N(x; mu_j, C_j),

with score grad_x log p(x; sigma) = (D*(x; sigma) - x) / sigma^2 (EDM Eq. 3). Each Sigma_k is
diagonalised once (Sigma_k = U_k diag(lambda_k) U_k^T), so any sigma costs one projection.

Shapes: x (N, D) or (N, *shape) with prod(shape) = D; sigma a float or (N,).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "GaussianMixture", "MixtureDenoiser", "solve_probability_flow", "ring_mixture_2d",
    "bimodal_mixture_1d", "MIXTURES",
]


class GaussianMixture:
    """A mixture of K full-covariance Gaussians in D dimensions, kept in float64."""

    def __init__(self, weights, means, covs):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be (K, D), got shape {tuple(means.shape)}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights must be ({k},), got {tuple(weights.shape)}")
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must be ({k}, {d}, {d}), got {tuple(covs.shape)}")
        if (weights <= 0).any():
            raise ValueError("mixture weights must be positive")
        if not torch.allclose(covs, covs.transpose(1, 2)):
            raise ValueError("covariances must be symmetric")
        self.weights = weights / weights.sum()
        self.means = means
        self.covs = covs
        self.eigvals, self.eigvecs = torch.linalg.eigh(covs)  # Sigma_k = U diag(lambda) U^T
        if (self.eigvals < 0).any():
            raise ValueError("covariances must be positive semi-definite")
        self.eigvals = self.eigvals.clamp_min(0.0)

    @classmethod
    def isotropic(cls, weights, means, std):
        """Mixture whose components all have covariance std^2 I."""
        means = torch.as_tensor(means, dtype=torch.float64)
        k, d = means.shape
        std = torch.as_tensor(std, dtype=torch.float64).expand(k)
        covs = torch.eye(d, dtype=torch.float64) * (std**2)[:, None, None]
        return cls(weights, means, covs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def mean(self) -> torch.Tensor:
        """Mixture mean, (D,)."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Mixture covariance, (D, D): sum_k w_k (Sigma_k + mu_k mu_k^T) - mu mu^T."""
        mu = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs)
        second = second + torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - torch.outer(mu, mu)

    def std(self) -> float:
        """Root-mean-square per-coordinate standard deviation (the data's sigma_data)."""
        return math.sqrt(torch.diagonal(self.covariance()).mean().item())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n samples, (n, D) float64, on the CPU."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        root = self.eigvecs * self.eigvals.sqrt()[:, None, :]  # U diag(sqrt(lambda)), (K, D, D)
        return self.means[comp] + torch.einsum("nij,nj->ni", root[comp], z)

    def _moments(self, x: torch.Tensor, sigma: torch.Tensor):
        """Per-component log N(x; mu_k, C_k) and posterior means, both for every sample."""
        dev = x.device
        means, u, lam = self.means.to(dev), self.eigvecs.to(dev), self.eigvals.to(dev)
        var = lam[None] + sigma[:, None, None] ** 2  # eigenvalues of C_k, (N, K, D)
        z = torch.einsum("kji,nkj->nki", u, x[:, None, :] - means[None])  # U_k^T (x - mu_k)
        log_n = -0.5 * ((z**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        shrink = torch.einsum("kij,nkj->nki", u, z * lam[None] / var)  # Sigma_k C_k^{-1} (x - mu_k)
        return log_n, means[None] + shrink  # (N, K), (N, K, D)

    def _flatten(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        if flat.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} values per sample, got {flat.shape[1]}")
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        return flat, sigma.reshape(-1).expand(flat.shape[0])

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log p(x; sigma) of the noisy marginal, (N,) float64."""
        flat, sigma = self._flatten(x, sigma)
        log_n, _ = self._moments(flat, sigma)
        return torch.logsumexp(log_n + self.weights.to(x.device).log(), dim=1)

    def responsibilities(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Posterior component probabilities r_k(x) under p(x; sigma), (N, K)."""
        flat, sigma = self._flatten(x, sigma)
        log_n, _ = self._moments(flat, sigma)
        return torch.softmax(log_n + self.weights.to(x.device).log(), dim=1)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact D*(x; sigma) = E[y | x], same shape and dtype as x."""
        flat, sigma_flat = self._flatten(x, sigma)
        log_n, post_means = self._moments(flat, sigma_flat)
        r = torch.softmax(log_n + self.weights.to(x.device).log(), dim=1)
        return torch.einsum("nk,nkd->nd", r, post_means).reshape(x.shape).to(x.dtype)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Exact grad_x log p(x; sigma) = (D*(x; sigma) - x) / sigma^2 (EDM Eq. 3)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return ((self.denoise(x, sigma.reshape(-1)).to(torch.float64) - x) / sigma**2).to(x.dtype)

    def as_denoiser(self) -> "MixtureDenoiser":
        """This mixture's exact denoiser with the sampler interface D(x, sigma, class_labels)."""
        return MixtureDenoiser(self)


class MixtureDenoiser(nn.Module):
    """The exact denoiser of a GaussianMixture as a module: forward(x, sigma, class_labels)."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture
        self.sigma_data = mixture.std()
        self.label_dim = 0
        self.sample_shape = (mixture.dim,)

    def forward(self, x, sigma, class_labels=None):
        return self.mixture.denoise(x, sigma)


def solve_probability_flow(denoiser, x, sigma_start: float, sigma_end: float, *,
                           num_steps: int = 2048, rho: float = 7.0, class_labels=None):
    """High-accuracy solution of the probability-flow ODE dx/dsigma = (x - D(x; sigma))/sigma
    (EDM Eq. 4 with sigma(t) = t, s(t) = 1) by classical RK4 in u = sigma^(1/rho), the variable
    in which EDM's schedule (Eq. 5) is uniform. Global error O(num_steps^-4)."""
    if not 0 < sigma_end < sigma_start:
        raise ValueError("need 0 < sigma_end < sigma_start")
    u0, u1 = sigma_start ** (1 / rho), sigma_end ** (1 / rho)
    du = (u1 - u0) / num_steps

    def f(x_u, u):
        sigma = u**rho
        d = (x_u - denoiser(x_u, torch.full((x_u.shape[0],), sigma, dtype=x_u.dtype,
                                             device=x_u.device), class_labels)) / sigma
        return d * (rho * u ** (rho - 1))  # dx/du = dx/dsigma * dsigma/du

    x = x * 1.0
    for k in range(num_steps):
        u = u0 + k * du
        k1 = f(x, u)
        k2 = f(x + 0.5 * du * k1, u + 0.5 * du)
        k3 = f(x + 0.5 * du * k2, u + 0.5 * du)
        k4 = f(x + du * k3, u + du)
        x = x + du / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def ring_mixture_2d(num_modes: int = 8, radius: float = 0.7, std: float = 0.05) -> GaussianMixture:
    """The standard 2-D toy: equal-weight isotropic Gaussians evenly spaced on a circle
    (overall per-coordinate std ~0.5 = EDM's sigma_data with the defaults)."""
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture.isotropic(torch.ones(num_modes), means, std)


def bimodal_mixture_1d() -> GaussianMixture:
    """The standard 1-D toy: 0.4 N(-0.5, 0.15^2) + 0.6 N(0.5, 0.1^2) (std ~0.505)."""
    means = torch.tensor([[-0.5], [0.5]], dtype=torch.float64)
    covs = torch.tensor([[[0.15**2]], [[0.10**2]]], dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.4, 0.6]), means, covs)


MIXTURES = {"gmm1d": bimodal_mixture_1d, "gmm2d": ring_mixture_2d}
