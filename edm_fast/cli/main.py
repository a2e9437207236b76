"""edm-fast command line: sample, train, export, convert, bench, compare, serve, phema, metrics.

Examples:
    edm-fast sample --steps 18 --out samples.png                 # bundled digits model
    edm-fast sample --model toy-gmm --steps 18 --seeds 0-999 --out samples.png
    edm-fast sample --ckpt run/ --class 3 --guidance 2 --seeds 0-63 --out grid.png
    edm-fast sample --ckpt run/ --guide-ckpt early-run/ --guidance 2 --out auto.png  # autoguidance
    edm-fast train --data digits --preset tiny --loss edm --kimg 200 --out runs/edm --cond
Run ``edm-fast <command> --help`` for every option.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from .sampling_options import add_sampling_options, sampling_options
from ..optional import MissingDependency

__all__ = ["main", "build_parser"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to an option's help unless X is None, the option is a plain flag
    (--cond, --no-progress: off unless given), or the help names its default."""

    def _get_help_string(self, action):
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                   argparse._StoreConstAction))
        if action.default is None or flag or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="edm-fast", description=__doc__,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"edm-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("sample", formatter_class=_Formatter, help="generate samples",
                       description="Generate samples: EDM's Heun sampler (Algorithm 2) by "
                       "default, or any solver of --solver. Each image depends only on its "
                       "seed, whatever the batch or device.")
    p.add_argument("--ckpt", "--model", dest="ckpt", default="default", metavar="PATH|NAME",
                   help="checkpoint (.safetensors, run folder, official .pkl or training-state "
                   ".pt) or a model name: default, default-ddpm, toy-gmm (= toy-gmm2d), "
                   "toy-gmm1d")
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,9")
    p.add_argument("--class", dest="class_label", default=None, metavar="K|NAME",
                   help="class to generate, by index or by the name it had in the training "
                   "data (e.g. a folder name); conditional models; default: cycle through "
                   "classes")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="guidance weight w: classifier-free D_u + w (D_c - D_u) (1 = conditional "
                   "only), or with --guide-ckpt autoguidance D_g + w (D - D_g) (1 = the main "
                   "model alone); --guidance-interval limits either to a range of noise levels")
    p.add_argument("--guide-ckpt", "--gnet", dest="guide_ckpt", default=None,
                   metavar="PATH|NAME",
                   help="autoguidance (Karras et al. 2024, arXiv 2406.02507): the guide model, "
                   "a smaller or less-trained model of the same task (same sample shape and "
                   "classes, or both unconditional), loaded like --ckpt and run in --net-dtype; "
                   "it gets the same labels and replaces classifier-free guidance; needs "
                   "--guidance; every backend but cpp")
    p.add_argument("--out", default="samples.png",
                   help="grid.png, a folder (one PNG per seed) or file.npz; toy models: a plot. "
                   "Under torchrun every rank writes its own seeds: into the shared folder, or "
                   "to NAME.rank<R>.png / .npz")
    add_sampling_options(p, threads=True)
    p.set_defaults(func=cmd_sample)

    from . import commands as cli_commands

    cli_commands.add_commands(sub, _Formatter, add_sampling_options)
    from .phema import add_phema_command

    add_phema_command(sub, _Formatter)
    from .metrics import add_metrics_command

    add_metrics_command(sub, _Formatter)
    return parser


def _class_index(value: str, label_dim: int, names: list[str]) -> int:
    """--class K or NAME (a class name stored in the checkpoint) as an index in 0..label_dim-1."""
    if value in names:
        return names.index(value)
    try:
        index = int(value)
    except ValueError:
        known = f"; its classes: {', '.join(names)}" if names else ""
        raise ValueError(f"--class {value!r} is neither an index nor a class name of the "
                         f"model{known}") from None
    if not 0 <= index < label_dim:
        raise ValueError(f"--class must be in 0..{label_dim - 1}")
    return index


def _labels_for(args, seeds, sampler):
    import torch

    label_dim = sampler.label_dim
    if label_dim == 0:
        if args.class_label is not None:
            raise ValueError("--class given, but the model is unconditional")
        return None
    if args.class_label is not None:
        from ..io.models import class_names

        index = _class_index(str(args.class_label), label_dim, class_names(sampler.denoiser))
        return torch.full((len(seeds),), index, dtype=torch.long)
    return torch.tensor([s % label_dim for s in seeds], dtype=torch.long)


def cmd_sample(args) -> int:
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from ..io.samples import check_output, output_kind, save_per_seed, save_samples
    from ..io.models import model_mixture
    from ..noise import parse_seeds
    from ..sampling.sampler import Sampler

    seeds = parse_seeds(args.seeds)
    total = len(seeds)
    if len(set(seeds)) != total:  # one file per seed: a repeat would overwrite its twin
        from collections import Counter

        twice = sorted(s for s, n in Counter(seeds).items() if n > 1)[:5]
        raise ValueError(f"--seeds lists seed(s) {', '.join(map(str, twice))} more than once")
    from ..device import busy_cpu_note, resolve_device, set_threads, setup_note
    from ..train.distributed import rank_device, shard_seeds

    device = rank_device(resolve_device(args.device))  # torchrun on CUDA: cuda:LOCAL_RANK
    set_threads(args.threads)
    seeds, rank, world = shard_seeds(seeds)
    if not seeds:  # more ranks than seeds: this one has nothing to do
        return 0
    note = None if args.threads or rank else busy_cpu_note(device)  # --threads: user's choice
    if note:
        print(f"edm-fast sample: {note}", file=sys.stderr)
    out = args.out if world == 1 else _rank_path(args.out, rank)
    check_output(out)  # before loading the model: the file kinds and a writable folder
    sampler = Sampler(args.ckpt, batch_size=min(args.batch, len(seeds)),
                      **sampling_options(args), guidance=args.guidance,
                      guide=args.guide_ckpt, dtype=getattr(torch, args.dtype), device=device,
                      backend=args.backend,
                      expected_images=len(seeds),
                      backend_options={"threads": args.threads} if args.threads
                      and args.backend == "onnx" else None)
    note = setup_note(sampler.warmup_seconds, sampler.backend_name, sampler.device)
    if note and rank == 0:
        print(f"edm-fast sample: {note}", file=sys.stderr)
    check_output(out, toy=len(sampler.shape) == 1)  # toy vectors: a .png plot or an .npz only
    labels = _labels_for(args, seeds, sampler)
    # a folder gets each batch's files as soon as it is sampled: an interrupted run keeps them
    per_seed_files = output_kind(out) == ""
    seconds, chunks = 0.0, []
    batches = range(0, len(seeds), sampler.batch_size)
    for lo in tqdm(batches, desc="sampling", unit="batch", disable=len(batches) < 2 or rank > 0):
        part = seeds[lo:lo + sampler.batch_size]
        start = time.perf_counter()
        images = sampler(seeds=part, class_labels=None if labels is None
                         else labels[lo:lo + sampler.batch_size]).cpu()
        seconds += time.perf_counter() - start
        if per_seed_files:
            save_per_seed(images, part, out)
        else:
            chunks.append(images)
    path = Path(out)
    if not per_seed_files:
        title = f"{args.ckpt}: {len(seeds)} samples, {args.num_steps} {args.solver} steps"
        path = save_samples(torch.cat(chunks), out, seeds=seeds, labels=labels,
                            mixture=model_mixture(args.ckpt), title=title)
    if rank == 0:
        nfe = sampler.num_evals
        print(f"{total} samples ({nfe} NFE each) with the '{sampler.backend_name}' "
              f"backend on {sampler.device}: {seconds:.2f} s sampling, "
              f"{sampler.warmup_seconds:.2f} s set-up -> {path}"
              + (" (rank 0)" if world > 1 else ""))
    return 0


def _rank_path(out: str, rank: int) -> str:
    from pathlib import Path

    from ..io.samples import output_kind

    p = Path(out)
    if output_kind(out):
        return str(p.with_name(f"{p.stem}.rank{rank}{p.suffix}"))
    return out  # a folder: every rank writes its own seeds' files into it


def _resume_hint(args, exc: KeyboardInterrupt) -> str:
    """What an interrupted command leaves: for train, the checkpoint to --resume from."""
    if args.command != "train":
        return ""
    from ..io.checkpoints import latest_checkpoint
    from ..train.loop import TrainingInterrupted

    stopped = f" at step {exc.step}" if isinstance(exc, TrainingInterrupted) else ""
    latest = latest_checkpoint(args.out)
    if latest is None:
        return f"{stopped}; no checkpoint was written yet, so start again without --resume"
    return (f"{stopped}; saved {latest}; continue with the same command and --resume")


# Library parameters whose option has another name (dest); the others are named as their dest.
_PARAMETER_DESTS = {"default_steps": "num_steps", "batch_size": "batch"}


def _name_options(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """An error from the library names Python parameters (num_steps, ema_halflife_kimg, S_churn);
    add the option of this command that sets each: 'num_steps (--steps) must be ...'. Only
    names with an underscore, which no English word in a message has, and only once."""
    import re

    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {action.dest: next(s for s in action.option_strings if s.startswith("--"))
             for action in subparsers.choices[command]._actions
             if any(s.startswith("--") for s in action.option_strings)}
    for name in sorted(set(re.findall(r"\b[A-Za-z]+_[A-Za-z_]+\b", message))):
        flag = flags.get(_PARAMETER_DESTS.get(name, name))
        if flag is not None and flag not in message:
            message = re.sub(rf"\b{name}\b", f"{name} ({flag})", message, count=1)
    return message


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the user typed
    plain_format = warnings.formatwarning
    # warnings reach a CLI user as one line each, not as a source location and a code line;
    # the deprecation notices of libraries (torch.export, torch.jit) are for developers
    warnings.formatwarning = (lambda message, category, *_, **__:
                              f"edm-fast {args.command}: warning: {message}\n")
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category)
            return args.func(args) or 0
    except (OSError, ValueError, MissingDependency) as exc:  # bad paths, options, files; extras
        message = _name_options(str(exc), parser, args.command)
        print(f"edm-fast {args.command}: error: {message}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # samplers.NonFiniteError: NaN/Inf from the model
        print(f"edm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"edm-fast {args.command}: interrupted{_resume_hint(args, exc)}", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # 130 for Ctrl-C, 143 for SIGTERM (as shells do)
    except RuntimeError as exc:
        from ..train.loop import TrainingDiverged

        if not isinstance(exc, TrainingDiverged):
            raise
        print(f"edm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = plain_format
        from ..train.distributed import close_distributed

        close_distributed()  # torchrun jobs (sample, train) leave the process group cleanly
