"""``edm-fast plan``: write the sampling program of a model and solver options to a text file
(edm_fast.io.program_file) that the standalone C++ binary ``edm_fast_sample`` runs."""

from __future__ import annotations

from .sampling_options import add_model_option, add_sampling_options, sampling_options

__all__ = ["add_plan_command", "cmd_plan"]


def add_plan_command(sub, formatter) -> None:
    """Register ``plan`` on the subparsers ``sub`` (argparse) with help ``formatter``."""
    p = sub.add_parser(
        "plan", formatter_class=formatter, help="write a sampling plan for edm_fast_sample",
        description="Write the sampling program of a model and a set of solver options to a "
        "text file (edm_fast.io.program_file), which the standalone C++ binary runs: "
        "edm_fast_sample --model MODEL.pt2 --plan FILE. The plan takes the model's sigma range "
        "and its rounding to trained levels (DDPM, iDDPM), as `edm-fast sample` does.")
    add_model_option(p, "checkpoint, run folder or bundled model name (for its sigma range)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance weight (the binary then needs --class)")
    p.add_argument("--out", required=True, metavar="FILE", help="the plan file to write")
    add_sampling_options(p, execution=False)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from ..io.models import load_denoiser
    from ..io.program_file import write_program_file
    from ..sampling.sampler import plan_for_model

    plan = plan_for_model(load_denoiser(args.ckpt, device="cpu"), **sampling_options(args),
                          guidance=args.guidance)
    path = write_program_file(args.out, plan)
    print(f"wrote {path}: {plan.solver}, {plan.num_steps} steps, {plan.num_evals} NFE, "
          f"{plan.num_noise} noise draws per sample")
    return 0
