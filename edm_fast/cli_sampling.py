"""The sampling options of the CLI (sample, plan, bench, serve): the solver, its schedule and
options, as ``edm_fast.plan.SamplingPlan.build`` takes and checks them, and the execution
options (backend, device, dtype, batch)."""

from __future__ import annotations

import argparse

__all__ = ["add_sampling_options", "sampling_options"]


def _float_or_inf(text: str) -> float:
    return float("inf") if text.lower() in ("inf", "infinity") else float(text)


def _float_pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (_float_or_inf(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two noise levels), got {text!r}") \
            from None
    return lo, hi


def _sigma_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of noise levels, got "
                                         f"{text!r}") from None


def add_sampling_options(p: argparse.ArgumentParser, execution: bool = True) -> None:
    """The solver and schedule options (edm_fast.plan.SamplingPlan.build checks them), shared
    by sample, bench, serve and plan; with ``execution`` also --backend, --device, --dtype and
    --batch."""
    from .plan import SCHEDULES
    from .solvers import ODE_FAMILIES, SOLVERS, solver_help

    g = p.add_argument_group("sampler", "solvers (NFE per step, whether noise is injected):\n"
                             + solver_help())
    g.add_argument("--steps", type=int, default=18, metavar="N",
                   help="number of sampling steps N (heun: 2N-1 network evaluations, the "
                   "other solvers N)")
    g.add_argument("--solver", choices=list(SOLVERS), default="heun",
                   help="the sampling method (listed above)")
    g.add_argument("--schedule", choices=SCHEDULES, default="edm",
                   help="noise levels: edm (Eq. 5, --rho), logsnr (uniform in log sigma), or "
                   "the grids of vp, ve, iddpm, ddpm (EDM Table 1)")
    g.add_argument("--sigmas", type=_sigma_list, default=None, metavar="S0,S1,..",
                   help="an explicit decreasing grid of noise levels (replaces --schedule)")
    g.add_argument("--sigma-min", type=float, default=None, metavar="S",
                   help="lowest noise level (default: 0.002, raised to the model's lowest)")
    g.add_argument("--sigma-max", type=float, default=None, metavar="S",
                   help="highest noise level (default: 80, lowered to the model's highest)")
    g.add_argument("--rho", type=float, default=7.0, help="schedule exponent rho (Eq. 5)")
    g.add_argument("--S-churn", type=float, default=0.0, dest="S_churn",
                   help="euler/heun stochasticity (Alg. 2); 0 = deterministic Algorithm 1")
    g.add_argument("--S-min", type=float, default=0.0, dest="S_min",
                   help="churn only where sigma >= S_min")
    g.add_argument("--S-max", type=_float_or_inf, default=float("inf"), dest="S_max",
                   help="churn only where sigma <= S_max")
    g.add_argument("--S-noise", type=float, default=1.0, dest="S_noise",
                   help="noise inflation of the churn or ancestral step")
    g.add_argument("--ode", choices=list(ODE_FAMILIES), default="edm",
                   help="euler/heun: the sigma(t), s(t) pair of EDM Table 1 that Alg. 1 "
                   "integrates (vp, ve: NVlabs' --schedule/--scaling pairs)")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="heun: the second-order step's parameter (App. D.2; 1 = Heun, "
                   "0.5 = midpoint)")
    g.add_argument("--eta", type=float, default=None,
                   help="ddim, euler_ancestral, dpmpp_*_sde: noise amount (0 = the ODE form; "
                   "default: ddim 0, the others 1)")
    g.add_argument("--order", type=int, default=None,
                   help="unipc (<= 3, default 3), ipndm and lms (<= 4, default 4)")
    g.add_argument("--variance", choices=["beta", "beta_tilde"], default="beta",
                   help="ddpm: the posterior variance of Ho et al. (beta or beta-tilde)")
    g.add_argument("--guidance-interval", type=_float_pair, default=None, metavar="LO,HI",
                   help="apply --guidance only at noise levels LO <= sigma <= HI "
                   "(Kynkaanniemi et al. 2024)")
    if not execution:
        return
    r = p.add_argument_group("execution")
    r.add_argument("--backend", choices=["auto", "reference", "compiled", "cpp", "onnx"],
                   default="auto", help="sampling backend; auto: the fastest that loads here "
                   "(on the CPU, a job under 4096 images keeps 'reference', which needs no "
                   "compile or export to amortise)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    r.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="dtype of the sampler state (float64 = golden reference)")
    r.add_argument("--batch", type=int, default=64, metavar="B", help="images per batch")


def sampling_options(args) -> dict:
    """The Sampler keyword arguments of the options ``_add_sampling_options`` added."""
    return {"solver": args.solver, "num_steps": args.steps, "schedule": args.schedule,
            "sigmas": args.sigmas, "sigma_min": args.sigma_min, "sigma_max": args.sigma_max,
            "rho": args.rho, "S_churn": args.S_churn, "S_min": args.S_min, "S_max": args.S_max,
            "S_noise": args.S_noise, "ode": args.ode, "alpha": args.alpha, "eta": args.eta,
            "order": args.order, "variance": args.variance,
            "guidance_interval": args.guidance_interval}
