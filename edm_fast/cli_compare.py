"""``edm-fast compare``: sample quality against NFE for an EDM and a DDPM model on the digits.

A short, command-line version of bench/compare_edm_ddpm.py (which also covers the 2-D toy
mixture and writes docs/COMPARISON.md's figures). Scores: feature-space Frechet distance with
the digits classifier's features (NOT Inception-FID) and classifier accuracy of
class-conditional samples, each as mean +- SE over seed sets. The options are checked before
any sampling: the class-balanced real-data reference needs samples x repeats real digits
(1748 at most), and below 64 samples per seed set (the feature dimension) the FD is
dominated by small-sample bias (a warning, also in the report).
"""

from __future__ import annotations

__all__ = ["add_compare_command"]

# (net, sampler, NFEs) rows; --full adds DDPM's 1000-step row (slow on a CPU)
ROWS = [("edm", "edm_heun", [7, 11, 19, 35]), ("edm", "edm_euler", [11, 35]),
        ("ddpm", "ddpm", [10, 50, 100]), ("ddpm", "ddim", [10, 50]),
        ("ddpm", "edm_heun", [11, 35])]


def add_compare_command(sub, formatter) -> None:
    p = sub.add_parser("compare", formatter_class=formatter, help="EDM vs DDPM: quality vs NFE",
                       description=__doc__)
    p.add_argument("--edm", default="default", help="EDM model (name or checkpoint)")
    p.add_argument("--ddpm", default="default-ddpm", help="DDPM model (name or checkpoint)")
    p.add_argument("--samples", type=int, default=100, help="samples per seed set")
    p.add_argument("--repeats", type=int, default=2, help="seed sets per row (for the SE)")
    p.add_argument("--full", action="store_true", help="also DDPM at 1000 steps")
    p.add_argument("--out", default="compare-out", help="folder for the table, plot and JSON")
    p.set_defaults(func=_cmd_compare)


def _check_args(args) -> None:
    """Everything that can be checked before the models load and the sampling starts (minutes):
    sizes, the real digits the reference needs at this size, and the output folder."""
    from .compare import check_reference_size, check_report_folder

    if args.samples < 2 or args.repeats < 1:
        raise ValueError("--samples must be >= 2 and --repeats >= 1")
    check_report_folder(args.out, "digits")
    check_reference_size(args.samples, args.repeats)


def _load_models(args) -> dict:
    """The two denoisers, checked to be what the digits scorer can score."""
    from .models import load_denoiser
    from .sampler import _model_shape

    models = {"edm": load_denoiser(args.edm), "ddpm": load_denoiser(args.ddpm)}
    for name, den in models.items():  # the scorer is a classifier of the 10 digits at 16x16
        shape, classes = tuple(_model_shape(den)), getattr(den, "label_dim", 0)
        if shape != (1, 16, 16) or classes != 10:
            raise ValueError(f"compare scores class-conditional digits models (samples 1x16x16, "
                             f"10 classes); --{name} {getattr(args, name)!r} has samples {shape} "
                             f"and {classes} classes")
    return models


def _bias_warning(scorer, args) -> str:
    """The small-sample bias warning for the report, or ''."""
    note = scorer.bias_note(args.samples, args.repeats)
    return f"Warning: {note}" if note else ""


def _cmd_compare(args) -> int:
    from .compare import DigitsScorer, compare, reference_row, runs_for, write_report

    _check_args(args)
    models = _load_models(args)
    scorer = DigitsScorer()
    runs = []
    for model, sampler, nfes in ROWS:
        runs += runs_for(model, sampler, nfes + ([1000] if args.full and sampler == "ddpm" else []))
    rows = compare(models, runs, scorer, samples=args.samples, repeats=args.repeats,
                   log=lambda s: print("[compare]", s, flush=True))
    ref = reference_row(scorer, samples=args.samples, repeats=args.repeats)
    paths = write_report(rows, scorer, args.out, "digits", reference=ref,
                         title=f"{args.edm} (EDM) vs {args.ddpm} (DDPM) on the digits",
                         notes=_bias_warning(scorer, args))
    print(paths["table"].read_text())
    print(f"plot: {paths['plot']}")
    return 0
