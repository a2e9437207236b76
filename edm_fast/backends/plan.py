"""The sampling plan: every per-step scalar of EDM Alg. 2, computed once on the host.

Every backend (reference, compiled, cpp, onnx) consumes the same plan, so they differ only in
how they execute it. Step i goes from t_i to t_{i+1}:
    t_hat_i = round(t_i + gamma_i t_i)              (Alg. 2 l.5)
    x_hat   = x_i + sqrt(t_hat_i^2 - t_i^2) S_noise eps_k   if gamma_i > 0 (eps_k: k-th churn draw)
    Euler to t_{i+1}; Heun correction when solver == 'heun' and t_{i+1} > 0 (Alg. 2 l.9).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

from ..samplers import check_churn_options, churn_gammas, round_positive_sigmas
from ..schedules import edm_sigmas, validate_sigmas

__all__ = ["SamplingPlan"]


@dataclass(frozen=True)
class SamplingPlan:
    """Host-side floats for one sampling run (t_N = 0 unless the grid stops early)."""

    sigmas: tuple[float, ...]  # t_0 .. t_N after round_sigma
    t_hats: tuple[float, ...]  # t_hat_i, i = 0 .. N-1
    gammas: tuple[float, ...]  # gamma_i, i = 0 .. N-1
    solver: str = "heun"
    S_noise: float = 1.0
    guidance: float | None = None

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def churn_steps(self) -> list[int]:
        """Indices of the steps that draw churn noise (gamma_i > 0), in order."""
        return [i for i, g in enumerate(self.gammas) if g > 0]

    @property
    def num_evals(self) -> int:
        """Number of denoiser evaluations (NFE): 2N - 1 for Heun to sigma = 0, N for Euler."""
        second = sum(1 for t in self.sigmas[1:] if t > 0) if self.solver == "heun" else 0
        return self.num_steps + second

    def churn_std(self, i: int) -> float:
        """sqrt(t_hat^2 - t^2) S_noise for step i (Alg. 2 l.6)."""
        return math.sqrt(max(self.t_hats[i] ** 2 - self.sigmas[i] ** 2, 0.0)) * self.S_noise

    @classmethod
    def build(cls, *, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
              rho: float = 7.0, sigmas=None, S_churn: float = 0.0, S_min: float = 0.0,
              S_max: float = float("inf"), S_noise: float = 1.0, solver: str = "heun",
              guidance: float | None = None, round_sigma=None) -> "SamplingPlan":
        """Plan from EDM's rho schedule (Eq. 5), or from an explicit ``sigmas`` grid."""
        if solver not in ("heun", "euler"):
            raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
        if guidance is not None and not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite weight (0: unconditional, 1: "
                             f"conditional), got {guidance}")
        check_churn_options(S_churn, S_min, S_max, S_noise)
        grid = validate_sigmas(sigmas if sigmas is not None
                               else edm_sigmas(num_steps, sigma_min, sigma_max, rho))
        grid = round_positive_sigmas(grid, round_sigma)
        repeats = sum(1 for a, b in itertools.pairwise(grid) if a == b)
        if repeats:  # kept, as NVlabs' sampler keeps them: results equal sample_edm's
            warnings.warn(f"{repeats} of the {len(grid) - 1} steps start and end on the same "
                          "noise level after rounding to the model's trained levels "
                          "(round_sigma): zero-length steps that spend evaluations without "
                          "integrating; fewer steps or a larger sigma_min avoid them",
                          RuntimeWarning, stacklevel=2)
        gammas = churn_gammas(grid, S_churn, S_min, S_max)
        t_hats = round_positive_sigmas([t + g * t for t, g in zip(grid, gammas)], round_sigma)
        return cls(tuple(grid), tuple(t_hats), tuple(gammas), solver, float(S_noise),
                   None if guidance is None else float(guidance))

