"""Sample-quality metrics that need no downloads.

- ``DigitsClassifier``: a small MLP trained in seconds on the real scikit-learn digits at the
  sample resolution. Its accuracy on class-conditional samples says whether they are the asked
  digits; its 64-d penultimate features define a Frechet distance.
- ``ImageClassifier``: a small convolutional classifier trained on any labelled images (a user's
  folder, MNIST) at their own size; the same two scores for data that are not the digits.
- ``frechet_distance``: ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2) between
  Gaussians fitted to two feature sets. With DigitsClassifier features this is a *feature-space
  FD for digits*; it is NOT Inception-FID and its values are not comparable to published FIDs.
- ``sliced_wasserstein``: the sliced 2-Wasserstein distance between two point clouds (toy data).
- For Gaussian mixtures, ``GaussianMixture.log_prob`` gives the exact log-likelihood.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsClassifier", "ImageClassifier", "frechet_distance", "feature_stats",
           "sliced_wasserstein", "mean_and_se"]


class DigitsClassifier(nn.Module):
    """MLP classifier of (N, 1, R, R) digit images in [-1, 1]; features() = penultimate layer."""

    def __init__(self, resolution: int = 16, hidden: int = 256, features: int = 64):
        super().__init__()
        self.resolution = resolution
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(resolution * resolution, hidden),
                                  nn.SiLU(), nn.Linear(hidden, features), nn.SiLU())
        self.head = nn.Linear(features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(1)

    @classmethod
    def fit(cls, resolution: int = 16, *, steps: int = 600, seed: int = 0,
            holdout: float = 0.2) -> "DigitsClassifier":
        """Train on the real digits (train split); ``holdout_accuracy`` is set on the rest."""
        from ..train.data import load_digits

        ds = load_digits(resolution)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)
        n_test = int(len(x) * holdout)
        test, train = perm[:n_test], perm[n_test:]
        torch.manual_seed(seed)
        model = cls(resolution)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
        for step in range(steps):
            idx = train[torch.randint(len(train), (256,), generator=g)]
            noise = 0.05 * torch.randn(x[idx].shape, generator=g)  # mild robustness
            loss = nn.functional.cross_entropy(model(x[idx] + noise), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval().requires_grad_(False)
        model.holdout_accuracy = (model.predict(x[test]) == y[test]).float().mean().item()
        model.real_images, model.real_labels = x, y
        return model

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images classified as their label."""
        return (self.predict(images.cpu()) == labels.cpu()).float().mean().item()


class ImageClassifier(nn.Module):
    """Convolutional classifier of (N, C, R, R) images in [-1, 1] (any R >= 4) into
    ``num_classes``; features() = the 64-d penultimate layer. Stride-2 convolutions halve the
    size down to 4x4 or less, then global pooling: the cost per image grows with R^2."""

    def __init__(self, channels: int, resolution: int, num_classes: int, width: int = 32,
                 features: int = 64):
        super().__init__()
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        layers, c, size = [nn.Conv2d(channels, width, 3, padding=1), nn.SiLU()], width, resolution
        while size > 4:
            layers += [nn.Conv2d(c, min(2 * c, 128), 3, stride=2, padding=1), nn.SiLU()]
            c, size = min(2 * c, 128), (size + 1) // 2
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c, features), nn.SiLU())
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.body(part.float()) for part in x.split(256)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(1)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(images.cpu()) == labels.cpu()).float().mean().item()

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
            steps: int = 400, batch: int = 64, seed: int = 0) -> "ImageClassifier":
        """Train on ``images`` (N, C, R, R) with integer ``labels``; slightly noised copies
        make it robust to the small errors samplers make."""
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = cls(images.shape[1], images.shape[-1], num_classes)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
        for _ in range(steps):
            idx = torch.randint(len(images), (min(batch, len(images)),), generator=g)
            x = images[idx].float()
            x = x + 0.05 * torch.randn(x.shape, generator=g)
            loss = nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval().requires_grad_(False)


def feature_stats(features: torch.Tensor):
    """(mean (D,), covariance (D, D)) in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, PSD square roots)."""
    root1 = _sqrtm_psd(sigma1)
    middle = _sqrtm_psd(root1 @ sigma2 @ root1)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace()
                 - 2 * middle.trace())


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, num_projections: int = 256,
                       seed: int = 0) -> float:
    """Sliced W2 between equal-size point clouds (N, D): RMS over random directions of the W2
    distance of the 1-D projections (sorted-sample matching)."""
    if x.shape != y.shape:
        raise ValueError("sliced_wasserstein needs two clouds of the same shape")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = (x.double().cpu() @ dirs).sort(dim=0).values
    py = (y.double().cpu() @ dirs).sort(dim=0).values
    return float((px - py).square().mean().sqrt())


def mean_and_se(values) -> tuple[float, float]:
    """Mean and standard error of a list of repeated measurements."""
    t = torch.tensor(list(values), dtype=torch.float64)
    se = t.std(unbiased=True).item() / len(t) ** 0.5 if len(t) > 1 else float("nan")
    return t.mean().item(), se
