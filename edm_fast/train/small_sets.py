"""The small built-in data sets: scikit-learn's digits (1797 real 8x8 handwritten digits,
upsampled bilinearly, align_corners=False) and toy 1-D / 2-D distributions, scaled so the RMS
per-coordinate std is about sigma_data = 0.5."""

from __future__ import annotations

import numpy as np
import torch

from ..nets.toy import bimodal_mixture_1d, ring_mixture_2d
from .datasets import ArrayDataset, fitter

__all__ = ["TOY_NAMES", "gmm1d", "gmm2d", "load_digits", "load_toy"]

TOY_NAMES = ("gmm1d", "gmm2d", "moons", "swissroll")


def load_digits(resolution: int = 16, *, pad_to: int | None = None,
                channels: int | None = None) -> ArrayDataset:
    """scikit-learn's digits (1797 images, 10 classes) as (1, R, R) in [-1, 1], R in {8, 16, 32}.

    The 8x8 images are upsampled bilinearly to `resolution`; with `pad_to` they are first padded
    with background around the centre instead (then resized to `resolution` if that differs).
    """
    from ..optional import require

    sk_datasets = require("sklearn.datasets", "the digits data set")
    if resolution not in (8, 16, 32):
        raise ValueError(f"digits resolution must be 8, 16 or 32, got {resolution}")
    bunch = sk_datasets.load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32)[:, None] / 8.0 - 1.0  # 0..16
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    return ArrayDataset(images, labels, name="digits",
                        class_names=[str(int(n)) for n in bunch.target_names],
                        transform=fitter(pad_to=pad_to, resolution=resolution, channels=channels))


def gmm1d():
    """The standard 1-D bimodal mixture (``edm_fast.nets.toy.bimodal_mixture_1d``)."""
    return bimodal_mixture_1d()


def gmm2d(num_modes: int = 8, radius: float = 0.7, std: float = 0.05):
    """The standard 2-D ring mixture (``edm_fast.nets.toy.ring_mixture_2d``)."""
    return ring_mixture_2d(num_modes, radius, std)


def _standardize(x: np.ndarray) -> torch.Tensor:
    """Centre and scale so the RMS per-coordinate std is 0.5."""
    x = x - x.mean(axis=0)
    return torch.from_numpy(x * (0.5 / x.std())).to(torch.float32)


def load_toy(name: str, *, num_samples: int = 100_000, seed: int = 0) -> ArrayDataset:
    """A fixed draw of `num_samples` points (seed `seed`) from a toy distribution -> (D,) items."""
    if name in ("gmm1d", "gmm2d"):
        mixture = gmm1d() if name == "gmm1d" else gmm2d()
        gen = torch.Generator().manual_seed(seed)
        data = mixture.sample(num_samples, generator=gen).to(torch.float32)
    elif name == "moons":
        from ..optional import require

        make_moons = require("sklearn.datasets", "the moons toy data").make_moons
        data = _standardize(make_moons(num_samples, noise=0.05, random_state=seed)[0])
    elif name == "swissroll":
        from ..optional import require

        make_swiss_roll = require("sklearn.datasets", "the swiss-roll toy data").make_swiss_roll
        roll = make_swiss_roll(num_samples, noise=0.3, random_state=seed)[0]
        data = _standardize(roll[:, [0, 2]])  # the (x, z) plane
    else:
        raise ValueError(f"unknown toy dataset {name!r}; choose from {', '.join(TOY_NAMES)}")
    return ArrayDataset(data, None, name=f"toy:{name}")
