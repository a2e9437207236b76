"""The sampling options of the CLI (sample, plan, bench, serve): the solver, its schedule and
options, as ``edm_fast.plan.SamplingPlan.build`` takes and checks them, and the execution
options (backend, device, dtype, net-dtype, batch)."""

from __future__ import annotations

import argparse

__all__ = ["add_sampling_options", "sampling_options"]


def _float_pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))  # 'inf' reads as infinity
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


MODEL_HELP = ("checkpoint (.safetensors, run folder, official .pkl or training-state .pt) or a "
              "model name: default, default-ddpm, toy-gmm (= toy-gmm2d), toy-gmm1d")


def add_model_option(p: argparse.ArgumentParser, model_help: str = MODEL_HELP) -> None:
    """--ckpt (alias --model): the model, a path or a name (edm_fast.io.models)."""
    p.add_argument("--ckpt", "--model", dest="ckpt", default="default", metavar="PATH|NAME",
                   help=model_help)


def add_guide_option(p: argparse.ArgumentParser, effect: str) -> None:
    """--guide-ckpt (alias --gnet): autoguidance's guide model, loaded like --ckpt; ``effect``
    says what the guide does for this command."""
    p.add_argument("--guide-ckpt", "--gnet", dest="guide_ckpt", default=None,
                   metavar="PATH|NAME",
                   help="autoguidance (Karras et al. 2024, arXiv 2406.02507): the guide model, "
                   "a smaller or less-trained model of the same task (same sample shape and "
                   "classes, or both unconditional), loaded like --ckpt and run in --net-dtype; "
                   + effect)


def add_sampling_options(p: argparse.ArgumentParser, execution: bool = True,
                         threads: bool = False) -> None:
    """The options of ``edm_fast.plan.SamplingOptions`` (generated from its fields; guidance is
    left to each command, whose help differs), shared by sample, serve and plan; with
    ``execution`` also --backend, --device, --dtype, --net-dtype and --batch, and with
    ``threads`` (a
    command that applies it: ``edm_fast.device.set_threads``) --threads."""
    from dataclasses import MISSING, fields

    from ..plan import SamplingOptions
    from ..solvers import solver_help

    parsers = {"floats": _sigma_list, "float_pair": _float_pair}
    g = p.add_argument_group("sampler", "solvers (NFE per step, whether noise is injected):\n"
                             + solver_help())
    for f in fields(SamplingOptions):
        if f.name == "guidance":
            continue
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kind = {"int": int, "int | None": int, "str": str}.get(str(f.type), float)
        kwargs = {"default": f.default if f.default is not MISSING else None,
                  "help": meta["help"], "dest": f.name,
                  "type": parsers[meta["parse"]] if meta["parse"] else kind}
        if meta["choices"]:
            kwargs["choices"] = list(meta["choices"])
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        g.add_argument(flag, **kwargs)
    if not execution:
        return
    r = p.add_argument_group("execution")
    from ..sampling.backends import BACKENDS
    from ..precision import NET_DTYPE_CHOICES

    r.add_argument("--backend", choices=["auto", *BACKENDS],
                   default="auto", help="sampling backend; auto: the fastest that loads here "
                   "(on the CPU, a job under 4096 images keeps 'reference', which needs no "
                   "compile or export to amortise)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    r.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="dtype of the sampler state (float64 = golden reference)")
    r.add_argument("--net-dtype", dest="net_dtype", choices=list(NET_DTYPE_CHOICES),
                   type=_net_dtype_name, default=None,
                   help="precision of the network only (the sampler state stays in --dtype): "
                   "fp32, bf16, fp16, or auto (bf16 where measured faster at fp32 quality: CPUs "
                   "with AMX-BF16 or AVX512-BF16 for networks >= 1 GFLOP/image, CUDA sm >= 80; "
                   "says what it chose). Default: the network as loaded (fp32 for edm-fast "
                   "checkpoints). A precision the device cannot run is refused; see "
                   "docs/PRECISION.md")
    r.add_argument("--batch", type=int, default=64, metavar="B", help="images per batch")
    if threads:
        r.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads (torch, and ONNX Runtime for --backend onnx); default: "
                       "torch's (one per core). On a loaded or shared CPU, 1 can be several "
                       "times faster")


def _net_dtype_name(text: str) -> str:
    """--net-dtype's value in its short name: 'bfloat16' is read as 'bf16', as Sampler reads
    it (edm_fast.precision), so the choices are checked on one spelling."""
    from ..precision import parse_net_dtype, short_name

    try:
        parsed = parse_net_dtype(text)
    except ValueError:
        return text  # argparse then names the choices
    return parsed if parsed == "auto" else short_name(parsed)


# The execution options that Sampler takes under the same name, passed on as they are.
SAMPLER_EXECUTION_OPTIONS = ("net_dtype",)


def sampling_options(args) -> dict:
    """The Sampler keyword arguments of the options ``add_sampling_options`` added (every field
    of SamplingOptions but guidance, which each command reads itself, and with ``execution``
    the options of SAMPLER_EXECUTION_OPTIONS)."""
    from dataclasses import fields

    from ..plan import SamplingOptions

    options = {f.name: getattr(args, f.name) for f in fields(SamplingOptions)
               if f.name != "guidance"}
    options.update({name: getattr(args, name) for name in SAMPLER_EXECUTION_OPTIONS
                    if hasattr(args, name)})
    return options
