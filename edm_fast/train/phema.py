"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696, Sec. 3 and App. C).

A power-function EMA of the training weights theta_tau at time t averages them with the profile
    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),  0 <= tau <= t           (Eq. 121)
whose width relative to t, sigma_rel, depends on gamma alone (Eq. 123): the average forgets
in proportion to the training time, and sigma_rel is the knob of the paper. Training tracks it
with the update theta_hat <- beta theta_hat + (1 - beta) theta, beta = (1 - dt/t)^(gamma + 1)
(Eq. 127), which weights the step ending at t_k exactly by the profile's mass over
(t_{k-1}, t_k], (t_k^(gamma+1) - t_{k-1}^(gamma+1)) / t^(gamma+1).

Post-hoc reconstruction: given snapshots of such averages (any times t_i, any sigma_rel_i), the
profile of a new (t, sigma_rel) is approximated by the combination sum_i x_i p_i closest to it in
L2, from the Gram matrix of the snapshot profiles, whose inner products are closed-form
(Eq. 151): A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_out> (Alg. 3), with x scaled to sum to 1 so
that a constant weight is reproduced exactly. The averaged network is then sum_i x_i theta_hat_i.

Times t are in any unit (training images, steps) as long as all of them use the same one; t = 0
is the start of training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import EdmFastError

__all__ = ["MAX_SIGMA_REL", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "power_ema_beta",
           "profile_inner_products", "solve_posthoc_coefficients", "discrete_profile_weights",
           "PowerEMA", "Snapshot", "reconstruct", "parse_sigma_rels"]

# sigma_rel of gamma = 0 (a uniform average over [0, t]); wider profiles need gamma < 0, which the
# tracking update cannot start from (its first beta would not be 0).
MAX_SIGMA_REL = math.sqrt(1 / 12)


def _check_sigma_rel(sigma_rel: np.ndarray) -> None:
    bad = sigma_rel[~((sigma_rel > 0) & (sigma_rel < MAX_SIGMA_REL))]
    if bad.size:
        raise EdmFastError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}), got "
                           f"{float(bad.flat[0]):g}")


def gamma_to_sigma_rel(gamma):
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (Eq. 123)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


def sigma_rel_to_gamma(sigma_rel):
    """The gamma with gamma_to_sigma_rel(gamma) = sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (Eq. 126, Alg. 2)."""
    sigma_rel = np.asarray(sigma_rel, dtype=np.float64)
    _check_sigma_rel(sigma_rel)
    inv2 = sigma_rel.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - v, 12.0 - v]) for v in inv2]
    gamma = [r[np.abs(r.imag) < 1e-9].real.max() for r in roots]
    return np.asarray(gamma, dtype=np.float64).reshape(sigma_rel.shape)


def power_ema_beta(sigma_rel: float, t: float, dt: float) -> float:
    """beta of the tracking update for the step that ends at time t and lasted dt (Eq. 127)."""
    if not 0 < dt <= t:
        raise EdmFastError(f"the EMA update needs 0 < dt <= t, got dt={dt}, t={t}")
    return float((1 - dt / t) ** (sigma_rel_to_gamma(sigma_rel) + 1))


def discrete_profile_weights(times: Sequence[float], sigma_rel: float) -> np.ndarray:
    """The weight of each training step's weights in the tracked EMA at the last time, for steps
    ending at ``times`` (increasing, the first step starting at 0): the exact effect of the
    update of Eq. 127, (t_k^(g+1) - t_(k-1)^(g+1)) / t_K^(g+1)."""
    t = np.asarray(times, dtype=np.float64)
    g1 = sigma_rel_to_gamma(sigma_rel) + 1
    upper = (t / t[-1]) ** g1
    return np.diff(np.concatenate([[0.0], upper]))


def profile_inner_products(t_a, sigma_a, t_b, sigma_b) -> np.ndarray:
    """<p_a, p_b> = integral over tau of the two profiles' product, broadcast over the inputs
    (Eq. 151): (g_a+1)(g_b+1) / ((g_a+g_b+1) max(t_a, t_b)) * (min/max)^(g of the later one)."""
    t_a, t_b = np.asarray(t_a, np.float64), np.asarray(t_b, np.float64)
    g_a, g_b = sigma_rel_to_gamma(sigma_a), sigma_rel_to_gamma(sigma_b)
    t_max = np.maximum(t_a, t_b)
    g_later = np.where(t_a < t_b, g_b, g_a)
    ratio = np.minimum(t_a, t_b) / t_max
    return (g_a + 1) * (g_b + 1) * ratio ** g_later / ((g_a + g_b + 1) * t_max)


def solve_posthoc_coefficients(in_t, in_sigma_rel, out_t, out_sigma_rel) -> np.ndarray:
    """Coefficients X (n_in, n_out): output j's average is sum_i X[i, j] snapshot_i (Alg. 3).

    Least squares in the L2 norm of the profiles: the normal equations A X = B with the Gram
    matrix A of the inputs and their inner products B with the outputs; each column of X is then
    scaled to sum to 1 (a constant weight maps to itself exactly).
    """
    in_t, in_sigma_rel = (np.ravel(a) for a in np.broadcast_arrays(
        np.asarray(in_t, np.float64), np.asarray(in_sigma_rel, np.float64)))
    out_t, out_sigma_rel = (np.ravel(a) for a in np.broadcast_arrays(
        np.asarray(out_t, np.float64), np.asarray(out_sigma_rel, np.float64)))
    if in_t.size == 0:
        raise EdmFastError("post-hoc EMA needs at least one input snapshot")
    if (in_t <= 0).any() or (out_t <= 0).any():
        raise EdmFastError("snapshot times must be > 0 (t = 0 is the start of training)")
    col, row = (lambda a: a[:, None]), (lambda a: a[None, :])
    A = profile_inner_products(col(in_t), col(in_sigma_rel), row(in_t), row(in_sigma_rel))
    B = profile_inner_products(col(in_t), col(in_sigma_rel), row(out_t), row(out_sigma_rel))
    try:
        X = np.linalg.solve(A, B)
    except np.linalg.LinAlgError:  # duplicate snapshots: the minimum-norm least-squares answer
        X = np.linalg.lstsq(A, B, rcond=None)[0]
    return X / X.sum(axis=0, keepdims=True)


class PowerEMA:
    """Power-function EMAs of a set of tensors for several sigma_rel, updated after each step.

        ema = PowerEMA(dict(net.named_parameters()), sigma_rels=(0.05, 0.10))
        ...optimizer step, t = images seen so far...
        ema.update(dict(net.named_parameters()), t=cur_nimg, dt=batch_size)
        ema.averages[0.05]     # {name: tensor}, a copy of the parameters averaged

    The first update (t = dt) has beta = 0 and copies the weights: the profile starts at t = 0.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], sigma_rels: Iterable[float] = (0.05,
                 0.10)):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise EdmFastError(f"PowerEMA needs distinct sigma_rel values, got {self.sigma_rels}")
        _check_sigma_rel(np.asarray(self.sigma_rels))
        self.averages = {s: {k: v.detach().clone() for k, v in tensors.items()}
                         for s in self.sigma_rels}

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor], t: float, dt: float) -> None:
        for sigma_rel, average in self.averages.items():
            beta = power_ema_beta(sigma_rel, t, dt)
            for name, avg in average.items():
                avg.lerp_(tensors[name].detach().to(avg.dtype), 1 - beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat {'<sigma_rel>.<name>': tensor}, e.g. '0.050.unet.out_gain' (safetensors keys)."""
        return {f"{s:.3f}.{k}": v for s, avg in self.averages.items() for k, v in avg.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for s, average in self.averages.items():
            for k, v in average.items():
                key = f"{s:.3f}.{k}"
                if key not in state:
                    raise EdmFastError(f"the power-EMA state lacks {key}")
                v.copy_(state[key])


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One stored EMA: its time t, its sigma_rel, and a function returning its tensors (called
    once per reconstruction, so that snapshots are read one at a time)."""

    t: float
    sigma_rel: float
    load: Callable[[], Mapping[str, torch.Tensor]]


def reconstruct(snapshots: Sequence[Snapshot], sigma_rels: Sequence[float],
                t: float | None = None, *, dtype: torch.dtype = torch.float32
                ) -> dict[float, dict[str, torch.Tensor]]:
    """{sigma_rel: tensors} of the EMAs with the given sigma_rels at time ``t`` (default: the
    latest snapshot's), from the snapshots at times <= t (Alg. 3). Floating tensors are
    combined in ``dtype``; other tensors (buffers such as integer counters) are taken from the
    latest snapshot. Every snapshot must hold the same names and shapes."""
    if not snapshots:
        raise EdmFastError("post-hoc EMA needs at least one input snapshot")
    t = max(s.t for s in snapshots) if t is None else float(t)
    used = sorted((s for s in snapshots if 0 < s.t <= t), key=lambda s: (s.t, s.sigma_rel))
    if not used:
        raise EdmFastError(f"no snapshot at or before t = {t:g}")
    sigma_rels = [float(s) for s in sigma_rels]
    X = solve_posthoc_coefficients([s.t for s in used], [s.sigma_rel for s in used],
                                   t, sigma_rels)
    out: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    names = None
    for i, snap in enumerate(used):
        tensors = snap.load()
        if names is None:
            names = {k: tuple(v.shape) for k, v in tensors.items()}
        elif {k: tuple(v.shape) for k, v in tensors.items()} != names:
            raise EdmFastError(f"snapshot at t={snap.t:g}, sigma_rel={snap.sigma_rel:g} holds "
                               "other tensors than the first one")
        for j, acc in enumerate(out):
            for k, v in tensors.items():
                if not v.is_floating_point():
                    acc[k] = v.clone()  # the latest snapshot's (sorted by time)
                elif k in acc:
                    acc[k].add_(v.to(dtype), alpha=float(X[i, j]))
                else:
                    acc[k] = v.to(dtype) * float(X[i, j])
    return dict(zip(sigma_rels, out))


def parse_sigma_rels(text: str) -> list[float]:
    """'0.05,0.1' -> [0.05, 0.1]; 'a,b,...,c' fills an evenly spaced range (as NVlabs'
    reconstruct_phema.py); sorted, without duplicates, each in (0, MAX_SIGMA_REL)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    values: list[float] = []
    for i, part in enumerate(parts):
        if part == "...":
            if len(values) < 2 or i + 1 >= len(parts) or parts[i + 1] == "...":
                raise EdmFastError("'...' needs two values before it and one after it")
            a, b = values[-2], values[-1]
            end = _float(parts[i + 1])
            if b == a or (end - b) / (b - a) < 1:
                raise EdmFastError(f"'{a:g},{b:g},...,{end:g}' is not an increasing range")
            count = (end - b) / (b - a)
            if abs(count - round(count)) > 1e-4:
                raise EdmFastError(f"'{a:g},{b:g},...,{end:g}' is not evenly spaced")
            values += [b + (b - a) * (k + 1) for k in range(round(count) - 1)]
        else:
            values.append(_float(part))
    if not values:
        raise EdmFastError("give at least one sigma_rel, e.g. 0.05,0.1")
    values = sorted({round(v, 12) for v in values})
    _check_sigma_rel(np.asarray(values))
    return values


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise EdmFastError(f"sigma_rel {text!r} is not a number") from None
    if not math.isfinite(value):
        raise EdmFastError(f"sigma_rel {text!r} is not finite")
    return value
