"""Scores between a set of generated images and a reference set, from network features.

- Frechet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge
  to a Local Nash Equilibrium", Eq. 6): d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^1/2)
  between Gaussians fitted to the two feature sets. With Inception-v3 pool3 features it is FID;
  with DINOv2 ViT-L/14 class tokens, FD_DINOv2 (Stein et al. 2023, used by EDM2).
- Reference statistics in NVlabs/edm's format: an .npz with ``mu`` (D,) and ``sigma`` (D, D),
  float64, sigma the unbiased covariance (divided by N - 1). edm-fast may add ``dinov2_mu``,
  ``dinov2_sigma`` (FD_DINOv2) and ``inception_features`` (precision/recall) to the same file;
  NVlabs' readers ignore keys they do not use. NVlabs/edm2's .pkl statistics (FID and
  FD_DINOv2) are read too, without running code.
- Improved precision and recall (Kynkaanniemi et al. 2019, Sec. 3, Eq. 1-2): each set's manifold
  is the union of balls around its points with radius the distance to the point's k-th nearest
  neighbour in the same set; precision is the fraction of generated points inside the real
  manifold, recall the fraction of real points inside the generated one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import BadFileError, EdmFastError

__all__ = [
    "feature_statistics",
    "frechet_distance_from_stats",
    "frechet_distance_to_stats",
    "knn_radii",
    "load_reference_stats",
    "precision_recall",
    "save_reference_stats",
]


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) in float64; sigma the unbiased covariance (N - 1), as NVlabs."""
    f = torch.as_tensor(features).double()
    if f.ndim != 2 or len(f) < 2:
        raise EdmFastError(f"statistics need at least 2 feature vectors (N, D), got shape "
                           f"{tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    sigma = centred.T @ centred / (len(f) - 1)
    return mu.numpy(), sigma.numpy()


def _as_float64(*arrays) -> list[torch.Tensor]:
    return [torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in arrays]


def _check_stats(mu1, sigma1, mu2, sigma2) -> None:
    d = mu2.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise EdmFastError(f"statistics do not match: mu {tuple(mu1.shape)}, "
                           f"{tuple(mu2.shape)}; sigma {tuple(sigma1.shape)}, "
                           f"{tuple(sigma2.shape)}")


def _psd_factor(sigma: torch.Tensor) -> torch.Tensor:
    """F with F F^T = sigma: Cholesky when sigma is positive definite, else V diag(sqrt(w))
    from its eigendecomposition (a singular covariance: fewer samples than dimensions)."""
    factor, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return factor
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    return v * w.clamp_min(0).sqrt()


def _trace_sqrt_product(factor1: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Tr((S1 S2)^1/2) for S1 = F F^T: the nonzero eigenvalues of S1 S2 = F (F^T S2) are those
    of F^T S2 F, which is symmetric PSD, so the trace is sum sqrt(eigvalsh(F^T S2 F)); no
    general (complex) matrix square root is needed. F may be D x r with r < D.

    Eigenvalues below the round-off level (size x eps x the largest) count as 0: with a singular
    covariance the exact zeros come out as +-1e-16-sized noise, whose square roots (1e-8 each,
    thousands of them for D = 2048) would otherwise add up to a visible error."""
    m = factor1.T @ sigma2 @ factor1
    w = torch.linalg.eigvalsh((m + m.T) / 2)
    floor = w.abs().max() * len(w) * torch.finfo(w.dtype).eps
    return float(torch.where(w > floor, w, 0).sqrt().sum())


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al., Eq. 6)."""
    mu1, sigma1, mu2, sigma2 = _as_float64(mu1, sigma1, mu2, sigma2)
    _check_stats(mu1, sigma1, mu2, sigma2)
    trace_sqrt = _trace_sqrt_product(_psd_factor(sigma1), sigma2)
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(float(value), 0.0)  # >= 0 up to round-off


def frechet_distance_to_stats(features, mu2, sigma2) -> float:
    """Frechet distance between a Gaussian fitted to ``features`` (N, D) (unbiased covariance)
    and N(mu2, sigma2). With N - 1 < D the covariance has the factor F = centred^T / sqrt(N - 1)
    of rank N - 1, and Tr((S1 S2)^1/2) comes from an (N, N) eigenproblem instead of (D, D)."""
    f = torch.as_tensor(features).double()
    mu1, sigma1 = (torch.from_numpy(a) for a in feature_statistics(f))
    mu2, sigma2 = _as_float64(mu2, sigma2)
    _check_stats(mu1, sigma1, mu2, sigma2)
    if len(f) - 1 >= f.shape[1]:
        return frechet_distance_from_stats(mu1, sigma1, mu2, sigma2)
    factor = (f - mu1).T / (len(f) - 1) ** 0.5
    value = ((mu1 - mu2).square().sum() + factor.square().sum() + sigma2.trace()
             - 2 * _trace_sqrt_product(factor, sigma2))
    return max(float(value), 0.0)


def save_reference_stats(path, mu, sigma, **extra) -> Path:
    """Write ``mu`` and ``sigma`` (float64) as NVlabs/edm's fid.py does, plus named extras."""
    from ..io.files import atomic_write

    path = Path(path)
    if path.suffix != ".npz":
        raise EdmFastError(f"{path}: reference statistics are written as .npz")
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    arrays.update({k: np.asarray(v) for k, v in extra.items() if v is not None})

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, save)
    return path


def _read_edm2_pickle(path: Path) -> dict[str, np.ndarray]:
    """NVlabs/edm2's reference statistics (``img512.pkl``, ``img64.pkl``): a pickle of
    {'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}, ...}, read by edm_fast.io.official_pickle's
    restricted unpickler (plain containers and numpy arrays of numbers only; no code runs)."""
    from ..io.official_pickle import read_pickle_file
    from ..io.official_records import PARSE_ERRORS, ArrayRecord

    try:
        root = read_pickle_file(path)
    except BadFileError as exc:
        raise BadFileError(f"{path}: {exc}") from None
    except PARSE_ERRORS as exc:
        raise BadFileError(f"{path} is not a readable pickle of statistics ({exc})") from None
    arrays = {}
    for metric, prefix in (("fid", ""), ("fd_dinov2", "dinov2_")):
        stats = root.get(metric) if isinstance(root, dict) else None
        if not isinstance(stats, dict):
            continue
        for name in ("mu", "sigma"):
            value = stats.get(name)
            if not isinstance(value, ArrayRecord) or value.array is None:
                raise BadFileError(f"{path}: '{metric}' has no numeric array '{name}'")
            arrays[prefix + name] = value.array.astype(np.float64)
    return arrays


def load_reference_stats(path) -> dict[str, np.ndarray]:
    """Reference statistics: an .npz in NVlabs/edm's format (with or without edm-fast's extras),
    read without pickles, or NVlabs/edm2's .pkl read without running code; shapes checked,
    one-line errors. Keys: mu, sigma (Inception), dinov2_mu, dinov2_sigma, inception_features."""
    path = Path(path)
    if path.suffix.lower() == ".pkl":
        arrays = _read_edm2_pickle(path)
    else:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except OSError:
            raise
        except Exception as exc:  # numpy's zip and format errors have no common base class
            raise BadFileError(f"{path} is not a readable .npz of statistics ({exc})") from None
    for prefix in ("", "dinov2_"):
        mu, sigma = arrays.get(prefix + "mu"), arrays.get(prefix + "sigma")
        if mu is None and sigma is None:
            continue
        if (mu is None or sigma is None or mu.ndim != 1
                or sigma.shape != (mu.shape[0], mu.shape[0])):
            raise BadFileError(f"{path}: '{prefix}mu' must be (D,) and '{prefix}sigma' (D, D)")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise BadFileError(f"{path}: '{prefix}mu' or '{prefix}sigma' has NaN or Inf")
    if "mu" not in arrays and "dinov2_mu" not in arrays:
        raise BadFileError(f"{path} has no 'mu'/'sigma' (NVlabs' reference format); its keys: "
                           f"{', '.join(arrays) or 'none'}")
    return arrays


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, batch: int):
    """Yield (row slice, distances (rows, len(b))) in blocks of ``batch`` rows of ``a``."""
    for lo in range(0, len(a), batch):
        yield slice(lo, lo + batch), torch.cdist(a[lo:lo + batch], b)


def knn_radii(features: torch.Tensor, k: int = 3, *, batch: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    if not 1 <= k < len(features):
        raise EdmFastError(f"k = {k} nearest neighbours need more than {k} points, "
                           f"got {len(features)}")
    radii = torch.empty(len(features), dtype=features.dtype, device=features.device)
    for rows, dist in _pairwise_distances(features, features, batch):
        radii[rows] = dist.kthvalue(k + 1, dim=1).values  # +1: the point itself, at distance 0
    return radii


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
              batch: int) -> float:
    """Fraction of ``points`` within radius of at least one centre (Eq. 1's f(phi, Phi))."""
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for rows, dist in _pairwise_distances(points, centres, batch):
        inside[rows] = (dist <= radii[None]).any(1)
    return inside.float().mean().item()


def precision_recall(real, generated, *, k: int = 3, batch: int = 1024,
                     device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-2) of ``generated``
    features against ``real`` ones, both (N, D); k = 3 as in the paper. The distances are
    float64, on ``device`` (default: where ``real`` is); O(N_real x N_generated x D) work."""
    device = torch.as_tensor(real).device if device is None else torch.device(device)
    real = torch.as_tensor(real).to(device, torch.float64)
    generated = torch.as_tensor(generated).to(device, torch.float64)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise EdmFastError(f"precision/recall needs two (N, D) feature sets of the same D, got "
                           f"{tuple(real.shape)} and {tuple(generated.shape)}")
    precision = _coverage(generated, real, knn_radii(real, k, batch=batch), batch)
    recall = _coverage(real, generated, knn_radii(generated, k, batch=batch), batch)
    return precision, recall
