"""``edm-fast train``: its options are generated from the fields of
``edm_fast.train.config.TrainConfig`` (name, type, default); the table ``OPTIONS`` adds each one's
flag, help text and valid range, which the parser checks as it reads the value."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import MISSING, dataclass, fields
from typing import Callable

__all__ = ["OPTIONS", "Option", "Range", "add_train_command", "cmd_train", "interrupted_note"]


@dataclass(frozen=True)
class Range:
    """The values an option takes: ``accepts(value)``, and what ``rule`` says of them."""

    rule: str
    accepts: Callable[[float], bool]


POSITIVE = Range("must be a finite number > 0", lambda v: 0 < v < math.inf)
NON_NEGATIVE = Range("must be a finite number >= 0", lambda v: 0 <= v < math.inf)
FINITE = Range("must be a finite number", math.isfinite)
AT_LEAST_ONE = Range("must be >= 1", lambda v: v >= 1)
PROBABILITY = Range("is a probability in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_ONE = Range("is a probability in [0, 1)", lambda v: 0 <= v < 1)


@dataclass(frozen=True)
class Option:
    """How a TrainConfig field (or, for ``resume``, a flag of the command) is offered: its flags
    (default: --the-field-name), help, metavar, choices, valid range, and a parser for a value
    that is not a plain int, float or str."""

    help: str
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    choices: tuple | None = None
    range: Range | None = None
    parse: Callable[[str], object] | None = None


def _sigma_rel_list(text: str) -> tuple:
    """--ema-sigma-rel: '0.05,0.1' -> (0.05, 0.1), checked as edm-fast phema checks them."""
    from ..errors import EdmFastError
    from ..train.phema import parse_sigma_rels

    try:
        return tuple(parse_sigma_rels(text))
    except EdmFastError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The options of `edm-fast train` by help group, in the order --help lists them. Every field of
# TrainConfig is here or in NOT_OPTIONS. --seed has no range here: train() checks it, after the
# options that name a length or rate.
OPTIONS: dict[str, dict[str, Option]] = {
    "data and model": {
        "data": Option("digits[:RES], mnist:PATH, toy:gmm1d|gmm2d|moons|swissroll, or an image "
                       "folder root/<label>/<file>.jpg"),
        "resolution": Option("image size (default: data's)", range=AT_LEAST_ONE),
        "channels": Option("image channels (default: data's)", choices=(1, 3)),
        "preset": Option("network preset (edm_fast.nets.PRESETS)"),
        "max_pixels": Option("skip (with a note) image files whose header declares more than N "
                             "pixels, before decoding them (a guard against decompression bombs)",
                             metavar="N", range=POSITIVE),
        "loss": Option("training objective; also selects the preconditioning (default: edm2 for "
                       "EDM2 presets, edm for the others)",
                       choices=("edm", "ddpm", "vp", "ve", "edm2")),
        "cond": Option("class-conditional on the data's labels"),
        "label_dropout": Option("label dropout probability (enables classifier-free guidance)",
                                range=BELOW_ONE),
        "dropout": Option("override the preset's dropout", range=BELOW_ONE),
        "augment": Option("non-leaking augmentation probability (EDM App. F.2); 0 = off",
                          metavar="P", range=PROBABILITY),
        "xflip": Option("mirror each training image left-right with probability 1/2 (as NVlabs' "
                        "--xflip: mirrored images count as real data, so the model also "
                        "generates mirrored ones; for photos, not for digits or text). Applied "
                        "before --augment, whose own flips are undone by its conditioning"),
    },
    "optimisation": {
        "kimg": Option("training length in thousands of images", range=POSITIVE),
        "batch": Option("global batch size", range=POSITIVE),
        "batch_gpu": Option("at most N images per forward pass on each device; the rest of the "
                            "batch accumulates gradients (same result as the full batch, less "
                            "memory; EDM2 nets: to the 1e-4 of their weight normalisation, once "
                            "per pass)", metavar="N", range=POSITIVE),
        "lr": Option("Adam learning rate after the ramp-up (EDM2: alpha_ref, before the decay); "
                     "default 1e-3 for EDM, the preset's for EDM2 (NVlabs' values; 1e-2 for "
                     "tiny-edm2)", range=POSITIVE),
        "lr_rampup_kimg": Option("learning-rate ramp-up length in thousands of images (default "
                                 "10; 10000 for the paper's EDM2 presets)", range=NON_NEGATIVE),
        "lr_decay_batches": Option("EDM2: learning-rate decay time t_ref in batches, lr / "
                                   "sqrt(max(t / t_ref, 1)) (NVlabs' --decay); 0 = none; "
                                   "default: the preset's (70000 img512, 35000 img64, 500 "
                                   "tiny-edm2)", flags=("--decay",), metavar="BATCHES",
                                   range=NON_NEGATIVE),
        "p_mean": Option("mean of ln(sigma) in the EDM / EDM2 loss (default: -1.2 for EDM, the "
                         "preset's for EDM2: -0.4 img512, -0.8 img64, tiny-edm2)",
                         flags=("--P-mean", "--P_mean"), metavar="MEAN", range=FINITE),
        "p_std": Option("standard deviation of ln(sigma) in the EDM / EDM2 loss (default: 1.2 "
                        "for EDM; 1.0 img512, 1.6 img64 and tiny-edm2)",
                        flags=("--P-std", "--P_std"), metavar="STD", range=POSITIVE),
        "ema_halflife_kimg": Option("EMA half-life in thousands of images (EDM runs)",
                                    flags=("--ema-kimg",), range=POSITIVE),
        "ema_sigma_rels": Option("EDM2: the power-function EMA profiles tracked (sigma_rel, "
                                 "comma list; NVlabs' stds); the first (smallest) is the "
                                 "checkpoints' EMA", flags=("--ema-sigma-rel",), metavar="LIST",
                                 parse=_sigma_rel_list),
        "grad_clip": Option("max gradient norm", range=POSITIVE),
        "amp": Option("mixed precision autocast", choices=("none", "bf16", "fp16")),
        "seed": Option("seed of the initial weights, data order, noise levels and noise"),
        "max_steps": Option("stop after this many steps", range=POSITIVE),
    },
    "run": {
        "out": Option("run folder"),
        "resume": Option("continue from the latest readable checkpoint in --out with the run's "
                         "saved options; options given on the command line override them where "
                         "the run allows (lr, EMA, lengths, checkpoint periods); a different "
                         "data, loss, batch, seed or network option is refused by name"),
        "device": Option("auto, cpu, cuda, cuda:N or mps"),
        "threads": Option("CPU threads of torch (default: torch's, one per core); on a loaded "
                          "or shared CPU, 1 can be several times faster", metavar="N",
                          range=AT_LEAST_ONE),
        "workers": Option("data loader processes", range=NON_NEGATIVE),
        "ckpt_every_kimg": Option("checkpoint period in kimg", flags=("--ckpt-every",),
                                  range=POSITIVE),
        "snapshot_every_kimg": Option("EDM2: period of the power-EMA snapshots "
                                      "phema-NIMG-SIGMA.safetensors that `edm-fast phema --ckpt "
                                      "RUN` reconstructs from (0: at the end only; default: 8389 "
                                      "= 8 Mi images for the paper's presets, 10 for tiny-edm2)",
                                      flags=("--snapshot-every",), metavar="KIMG",
                                      range=NON_NEGATIVE),
        "sample_every_kimg": Option("sample-grid period in kimg (0: end only)",
                                    flags=("--sample-every",), range=NON_NEGATIVE),
        "progress": Option("no progress bars (data loading, training)", flags=("--no-progress",)),
    },
}

# TrainConfig fields that the command line does not set (the library's defaults hold).
NOT_OPTIONS = ("ema_rampup_ratio", "keep_ckpts", "log_every", "max_nonfinite", "net_overrides")
# Flags of the command that are no TrainConfig field: a switch, or an int option with a default.
COMMAND_FLAGS = {"resume": bool, "threads": int}


def _checked(kind: type, name: str, flag: str, valid: Range | None) -> Callable[[str], object]:
    """The argparse ``type=`` of an int or float option: the value, or a one-line error naming
    the option and its range ('--kimg must be a finite number > 0, got 0.0'; a field whose
    name differs from its flag is named as the library's messages name it, with the flag:
    'ema_halflife_kimg (--ema-kimg) must be ...')."""
    label = f"{name} ({flag})" if "_" in name else flag

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{label} takes {noun}, got {text!r}") from None
        if valid is not None and not valid.accepts(value):
            raise argparse.ArgumentTypeError(f"{label} {valid.rule}, got {value}")
        return value

    return parse


def _value_type(annotation: str) -> type:
    """int, float, str or bool from a field's annotation ('float | None' -> float)."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    base = text.replace(" | None", "").replace("typing.Optional[", "").rstrip("]")
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    if base not in kinds:
        raise TypeError(f"TrainConfig field of type {annotation!r}: give it a parse= in OPTIONS")
    return kinds[base]


def add_train_command(sub, formatter) -> None:
    """Register ``train`` on the subparsers ``sub`` (argparse) with help ``formatter``, one
    option per TrainConfig field of OPTIONS."""
    from ..train.config import TrainConfig

    config_fields = {f.name: f for f in fields(TrainConfig)}
    listed = {name for group in OPTIONS.values() for name in group}
    missing = set(config_fields) - listed - set(NOT_OPTIONS)
    if missing:  # a new TrainConfig field: offer it (OPTIONS) or say why not (NOT_OPTIONS)
        raise RuntimeError(f"TrainConfig fields without a train option: {sorted(missing)}")
    p = sub.add_parser(
        "train", formatter_class=formatter, help="train an EDM or EDM2 (or DDPM/VP/VE) model",
        description="Train a denoiser with the EDM loss (EDM Sec. 5) or a baseline loss on the "
        "same net, or an EDM2 preset (--preset tiny-edm2, edm2-img64-s, ...) with the EDM2 "
        "recipe: learned-uncertainty loss, inverse-square-root learning rate, power-function "
        "EMA with snapshots for `edm-fast phema` (docs/EDM2.md). Checkpoints are atomic and "
        "hold everything needed to resume bit for bit; use torchrun --nproc_per_node=K -m "
        "edm_fast train ... for data parallelism.")
    for title, options in OPTIONS.items():
        g = p.add_argument_group(title)
        for name, option in options.items():
            flags = option.flags or ("--" + name.replace("_", "-"),)
            if COMMAND_FLAGS.get(name) is bool:
                g.add_argument(*flags, action="store_true", help=option.help)
                continue
            if name in COMMAND_FLAGS:
                g.add_argument(*flags, dest=name, default=None, metavar=option.metavar,
                               help=option.help, type=_checked(COMMAND_FLAGS[name], name,
                                                               flags[0], option.range))
                continue
            field = config_fields[name]
            default = field.default if field.default is not MISSING else field.default_factory()
            if option.parse is None and _value_type(field.type) is bool:
                g.add_argument(*flags, dest=name, help=option.help,
                               action="store_false" if default else "store_true")
                continue
            kind = _value_type(field.type) if option.parse is None else None
            kwargs = {"dest": name, "default": default, "help": option.help}
            if option.parse is not None:
                kwargs["type"] = option.parse
            elif kind is not str:
                kwargs["type"] = _checked(kind, name, flags[0], option.range)
            if option.choices:
                kwargs["choices"] = list(option.choices)
            if option.metavar:
                kwargs["metavar"] = option.metavar
            g.add_argument(*flags, **kwargs)
    p.set_defaults(func=cmd_train, parser=p, interrupted_note=interrupted_note)


def explicit_options(args) -> set[str]:
    """The option names (dests) set on the command line: the train arguments are parsed again
    into a namespace whose every name already holds a marker, which argparse leaves in place
    for an option that was not given (it fills only missing names with defaults)."""
    marker = object()
    namespace = argparse.Namespace(**{k: marker for k in vars(args)})
    argv = args.argv[args.argv.index(args.command) + 1:]
    args.parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not marker}


def interrupted_note(args, exc: KeyboardInterrupt) -> str:
    """What an interrupted run leaves: the step it stopped at and the checkpoint to --resume
    from."""
    from ..io.checkpoints import latest_checkpoint
    from ..train.loop import TrainingInterrupted

    stopped = f" at step {exc.step}" if isinstance(exc, TrainingInterrupted) else ""
    latest = latest_checkpoint(args.out)
    if latest is None:
        return f"{stopped}; no checkpoint was written yet, so start again without --resume"
    return (f"{stopped}; saved {latest}; continue with the same command and --resume")


def cmd_train(args) -> int:
    from ..device import busy_cpu_note, set_threads
    from ..train.config import TrainConfig, resumed_config
    from ..train.loop import train

    set_threads(args.threads)
    note = None if args.threads else busy_cpu_note(None if args.device == "auto" else args.device)
    if note:
        print(note, file=sys.stderr)

    config_fields = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in config_fields})
    if args.resume:
        cfg = resumed_config(cfg, explicit_options(args))
    summary = train(cfg, resume=args.resume)
    if not summary.get("checkpoint"):
        return 0  # not the main process of a torchrun job
    if summary["steps_this_run"] == 0:
        print(f"{args.out} is already at step {summary['steps']} ({summary['kimg']:g} kimg), the "
              "length asked for: nothing to train (raise --kimg or --max-steps to continue)")
        return 0
    resumed = summary["steps_this_run"] != summary["steps"]
    count = (f"{summary['steps_this_run']} steps, {summary['steps']} in all" if resumed
             else f"{summary['steps']} steps")
    print(f"trained {count} ({summary['kimg']:g} kimg), final loss "
          f"{summary['final_loss']:.4f} (mean of the last {summary['final_loss_steps']} "
          f"steps, as logged in log.jsonl) -> {summary['checkpoint']}")
    return 0
