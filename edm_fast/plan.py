"""The sampling plan: validated options, the sigma grid and the Program every backend runs.

    plan = SamplingPlan.build(solver="dpmpp_2m", num_steps=10)
    plan.program        # LIN/EVAL ops (program.py), written by the solver's planner (solvers.py)

Options are checked once here, each error naming the option; everything downstream trusts the
plan. The grid is rounded to a discrete-time net's trained levels (round_sigma, EDM Table 1).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field, fields

import torch

from .program import Program
from .schedules import (check_churn_options, edm_sigmas, get_sigmas, round_positive_sigmas,
                        validate_sigmas)
from .solvers import ODE_FAMILIES, SOLVERS, plan_solver

__all__ = ["SamplingOptions", "SamplingPlan", "SCHEDULES", "logsnr_sigmas"]

SCHEDULES = ("edm", "logsnr", "vp", "ve", "iddpm", "ddpm")
_DEFAULT_ETA = {"dpmpp_2m_sde": 1.0, "dpmpp_3m_sde": 1.0, "euler_ancestral": 1.0, "ddim": 0.0}
_DEFAULT_ORDER = {"unipc": 3, "ipndm": 4, "lms": 4}


def logsnr_sigmas(num_steps: int, sigma_min: float = 0.002,
                  sigma_max: float = 80.0) -> torch.Tensor:
    """Uniform in log-SNR = -2 ln sigma from sigma_max to sigma_min, then 0 (k-diffusion's
    'exponential' grid)."""
    edm_sigmas(num_steps, sigma_min, sigma_max)  # the same checks of N and the range
    i = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
    sigmas = torch.exp(math.log(sigma_max) + i * (math.log(sigma_min) - math.log(sigma_max)))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _grid(schedule, num_steps, sigma_min, sigma_max, rho, sigmas) -> list[float]:
    """The grid: ``sigmas`` as given, or the schedule's (edm and logsnr span sigma_min ..
    sigma_max; vp, ve, iddpm and ddpm are EDM Table 1's grids with their own ranges)."""
    if sigmas is not None:
        if schedule != "edm":
            raise ValueError(f"schedule={schedule!r} and sigmas= both give the grid; pass one")
        return validate_sigmas(sigmas)
    if schedule == "edm":
        return validate_sigmas(edm_sigmas(num_steps, sigma_min, sigma_max, rho))
    if schedule == "logsnr":
        return validate_sigmas(logsnr_sigmas(num_steps, sigma_min, sigma_max))
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return validate_sigmas(get_sigmas(schedule, num_steps))


def _check_number(name: str, value, low: float, *, inclusive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (not inclusive and value == low):
        bound = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a finite number {bound} {low:g}, got {value!r}")
    return float(value)


def _option(default, help: str, *, flag: str | None = None, metavar: str | None = None,
            choices=None, parse: str | None = None):
    """A field of SamplingOptions with what the CLI needs to offer it (``parse``: how a
    command-line string becomes the value: 'floats' a comma list, 'float_pair' LO,HI)."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar,
                                            "choices": choices, "parse": parse})


@dataclass(frozen=True)
class SamplingOptions:
    """Every option of a sampling run, declared once: ``SamplingPlan.build`` takes them (and
    checks them), ``Sampler`` passes them on, and the CLI's options are generated from these
    fields (their flag, help and choices). None means the solver's or the model's default."""

    solver: str = _option("heun", "the sampling method (listed above)", choices=tuple(SOLVERS))
    num_steps: int = _option(18, "number of sampling steps N (heun: 2N-1 network evaluations, "
                             "the other solvers N)", flag="--steps", metavar="N")
    schedule: str = _option("edm", "noise levels: edm (Eq. 5, --rho), logsnr (uniform in log "
                            "sigma), or the grids of vp, ve, iddpm, ddpm (EDM Table 1)",
                            choices=SCHEDULES)
    sigmas: tuple[float, ...] | None = _option(
        None, "an explicit decreasing grid of noise levels (replaces --schedule)",
        metavar="S0,S1,..", parse="floats")
    sigma_min: float | None = _option(None, "lowest noise level (default: 0.002, raised to the "
                                      "model's lowest)", metavar="S")
    sigma_max: float | None = _option(None, "highest noise level (default: 80, lowered to the "
                                      "model's highest)", metavar="S")
    rho: float = _option(7.0, "schedule exponent rho (Eq. 5)")
    S_churn: float = _option(0.0, "euler/heun stochasticity (Alg. 2); 0 = deterministic "
                             "Algorithm 1")
    S_min: float = _option(0.0, "churn only where sigma >= S_min")
    S_max: float = _option(math.inf, "churn only where sigma <= S_max")
    S_noise: float = _option(1.0, "noise inflation of the churn or ancestral step")
    ode: str = _option("edm", "euler/heun: the sigma(t), s(t) pair of EDM Table 1 that Alg. 1 "
                       "integrates (vp, ve: NVlabs' --schedule/--scaling pairs)",
                       choices=tuple(ODE_FAMILIES))
    alpha: float = _option(1.0, "heun: the second-order step's parameter (App. D.2; 1 = Heun, "
                           "0.5 = midpoint)")
    eta: float | None = _option(None, "ddim, euler_ancestral, dpmpp_*_sde: noise amount (0 = "
                                "the ODE form; default: ddim 0, the others 1)")
    order: int | None = _option(None, "unipc (<= 3, default 3), ipndm and lms (<= 4, default 4)")
    variance: str = _option("beta", "ddpm: the posterior variance of Ho et al. (beta or "
                            "beta-tilde)", choices=("beta", "beta_tilde"))
    guidance: float | None = _option(None, "guidance weight w: classifier-free D_u + w (D_c - "
                                     "D_u) (1: conditional only), or with a guide model "
                                     "autoguidance D_g + w (D - D_g) (1: the main model "
                                     "alone)", metavar="W")
    guidance_interval: tuple[float, float] | None = _option(
        None, "apply --guidance only at noise levels LO <= sigma <= HI (Kynkaanniemi et al. "
        "2024)", metavar="LO,HI", parse="float_pair")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SamplingPlan:
    """One sampling run, planned: its options, the (rounded) grid and the program."""

    solver: str
    sigmas: tuple[float, ...]
    program: Program
    guidance: float | None = None
    guidance_interval: tuple[float, float] | None = None

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def num_evals(self) -> int:
        """Denoiser evaluations per image (NFE); guidance runs them at twice the batch."""
        return self.program.num_evals

    @property
    def num_noise(self) -> int:
        """Injected noise draws the program reads (after the latents), per seed."""
        return self.program.num_noise

    @classmethod
    def build(cls, *, solver: str = "heun", num_steps: int = 18, schedule: str = "edm",
              sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
              sigmas=None, S_churn: float = 0.0, S_min: float = 0.0,
              S_max: float = float("inf"), S_noise: float = 1.0, eta: float | None = None,
              order: int | None = None, ode: str = "edm", alpha: float = 1.0,
              variance: str = "beta", guidance: float | None = None,
              guidance_interval=None, round_sigma=None) -> "SamplingPlan":
        """Check every option once (errors name it) and plan the run. The sigma range
        defaults to EDM's 0.002 .. 80 (``Sampler`` passes the model's)."""
        sigma_min = 0.002 if sigma_min is None else sigma_min
        sigma_max = 80.0 if sigma_max is None else sigma_max
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        reads = SOLVERS[solver].options
        given = {"eta": eta is not None, "order": order is not None, "ode": ode != "edm",
                 "alpha": alpha != 1.0, "variance": variance != "beta",
                 "churn": S_churn != 0 or S_min != 0 or S_max != float("inf"),
                 "S_noise": S_noise != 1.0}
        for option, set_ in given.items():
            if set_ and option not in reads and not (option == "S_noise" and "churn" in reads):
                name = "S_churn/S_min/S_max" if option == "churn" else option
                raise ValueError(f"{name} does not apply to solver {solver!r} (it reads: "
                                 f"{', '.join(reads) or 'no options'})")
        check_churn_options(S_churn, S_min, S_max, S_noise)
        if ode not in ODE_FAMILIES:
            raise ValueError(f"ode must be one of {', '.join(ODE_FAMILIES)}, got {ode!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        options = {}
        if "churn" in reads:
            options.update(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                           ode=ode, alpha=alpha)
        if "eta" in reads:
            options.update(eta=_check_number("eta", _DEFAULT_ETA[solver] if eta is None else eta,
                                             0.0), S_noise=S_noise)
        if "order" in reads:
            top = {"unipc": 3}.get(solver, 4)
            order = _DEFAULT_ORDER[solver] if order is None else order
            if not isinstance(order, int) or isinstance(order, bool) \
                    or order not in range(1, top + 1):
                raise ValueError(f"order must be an integer 1..{top} for {solver}, got {order!r}")
            options["order"] = order
        if "variance" in reads:
            if variance not in ("beta", "beta_tilde"):
                raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
            options["variance"] = variance
        if guidance is not None and not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite weight (0: unconditional, 1: "
                             f"conditional), got {guidance}")
        interval = None
        if guidance_interval is not None:
            lo, hi = (float(v) for v in guidance_interval)
            if not 0 <= lo <= hi or math.isnan(hi):
                raise ValueError(f"guidance_interval must be (sigma_lo, sigma_hi) with 0 <= lo "
                                 f"<= hi, got {guidance_interval!r}")
            if guidance is None:
                raise ValueError("guidance_interval needs a guidance weight")
            interval = (lo, hi)
        grid = round_positive_sigmas(_grid(schedule, num_steps, sigma_min, sigma_max, rho,
                                           sigmas), round_sigma)
        repeats = sum(1 for a, b in itertools.pairwise(grid) if a == b)
        if repeats and solver in ("heun", "euler"):  # kept, as NVlabs' sampler keeps them
            warnings.warn(f"{repeats} of the {len(grid) - 1} steps start and end on the same "
                          "noise level after rounding to the model's trained levels "
                          "(round_sigma): zero-length steps that spend evaluations without "
                          "integrating; fewer steps or a larger sigma_min avoid them",
                          RuntimeWarning, stacklevel=2)
        elif repeats:  # multistep solvers divide by the step length: the level runs once
            grid = [a for a, b in itertools.zip_longest(grid, grid[1:]) if a != b]
            warnings.warn(f"{repeats} steps of the grid round to a level already on it (the "
                          f"model's trained levels); {solver} runs {len(grid) - 1} steps",
                          RuntimeWarning, stacklevel=2)
        if "churn" in reads and round_sigma is not None:
            options["round_sigma"] = lambda v: round_positive_sigmas([v], round_sigma)[0]
        program = plan_solver(solver, grid, guidance_interval=interval, **options)
        return cls(solver, tuple(grid), program, None if guidance is None else float(guidance),
                   interval)
