"""``edm-fast compare``: sample quality against NFE for an EDM and a DDPM model of the same data.

The digits by default; with ``--data`` any labelled data the models were trained on (an image
folder label/file.jpg, mnist:DIR, ...): a small classifier is then trained on a stratified 80%
of that data (its features give the Frechet distance, its predictions the accuracy of
class-conditional samples) and the real-data floor is scored on the held-out 20%.

A short, command-line version of bench/compare_edm_ddpm.py (which also covers the 2-D toy
mixture and writes docs/COMPARISON.md's figures). Scores: feature-space Frechet distance with
the digits classifier's features (NOT Inception-FID) and classifier accuracy of
class-conditional samples, each as mean +- SE over seed sets. The options are checked before
any sampling: the class-balanced real-data reference needs samples x repeats real digits
(1748 at most), and below 64 samples per seed set (the feature dimension) the FD is
dominated by small-sample bias (a warning, also in the report).
"""

from __future__ import annotations

import sys

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
    p.add_argument("--data", default="digits",
                   help="the labelled data both models learned: 'digits' (the bundled models' "
                   "16x16 digits), an image folder label/file.jpg, mnist:DIR, ... (as train "
                   "--data; loaded at the models' resolution and channels)")
    p.add_argument("--classifier-steps", type=int, default=400, metavar="N",
                   help="training steps of the scoring classifier for --data other than digits")
    p.add_argument("--samples", type=int, default=100, help="samples per seed set")
    p.add_argument("--repeats", type=int, default=2, help="seed sets per row (for the SE)")
    p.add_argument("--full", action="store_true", help="also DDPM at 1000 steps")
    p.add_argument("--out", default="compare-out", help="folder for the table, plot and JSON")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of torch (default: torch's, one per core); on a loaded or "
                   "shared CPU, 1 can be several times faster")
    p.set_defaults(func=_cmd_compare)


def _check_args(args) -> None:
    """Everything that can be checked before the models load and the sampling starts (minutes):
    sizes, the real digits the reference needs at this size, and the output folder."""
    from ..eval.compare import check_reference_size, check_report_folder

    if args.samples < 2 or args.repeats < 1:
        raise ValueError("--samples must be >= 2 and --repeats >= 1")
    if args.classifier_steps < 1:
        raise ValueError("--classifier-steps must be >= 1")
    check_report_folder(args.out, _prefix(args))
    if _digits(args):
        check_reference_size(args.samples, args.repeats)


def _digits(args) -> bool:
    return args.data == "digits"


def _prefix(args) -> str:
    return "digits" if _digits(args) else "labelled"


def _load_models(args) -> dict:
    """The two denoisers, checked to be class-conditional models of one sample shape (for the
    digits: 1x16x16 and 10 classes, what the digits scorer scores)."""
    from ..io.models import load_denoiser
    from ..sampling.sampler import model_shape

    models = {"edm": load_denoiser(args.edm), "ddpm": load_denoiser(args.ddpm)}
    shapes = {name: (tuple(model_shape(den)), getattr(den, "label_dim", 0))
              for name, den in models.items()}
    for name, (shape, classes) in shapes.items():
        if _digits(args) and (shape != (1, 16, 16) or classes != 10):
            raise ValueError(f"compare scores class-conditional digits models (samples 1x16x16, "
                             f"10 classes) unless --data names their data; --{name} "
                             f"{getattr(args, name)!r} has samples {shape} and {classes} classes")
        if classes < 2:
            raise ValueError(f"compare scores class-conditional models; --{name} "
                             f"{getattr(args, name)!r} has no classes (train it with --cond)")
    if shapes["edm"] != shapes["ddpm"]:
        raise ValueError(f"the two models differ: --edm has samples {shapes['edm'][0]} and "
                         f"{shapes['edm'][1]} classes, --ddpm {shapes['ddpm'][0]} and "
                         f"{shapes['ddpm'][1]}; compare models of the same data")
    return models


def _scorer(args, models):
    """The digits scorer, or a classifier trained on --data at the models' sample shape."""
    from ..eval.compare import DigitsScorer, LabelledDataScorer
    from ..train.data import load_dataset
    from ..sampling.sampler import model_shape

    if _digits(args):
        return DigitsScorer()
    channels, resolution = model_shape(models["edm"])[0], model_shape(models["edm"])[-1]
    label_dim = models["edm"].label_dim
    data = load_dataset(args.data, resolution=resolution, channels=channels, progress=False)
    if data.num_classes != label_dim:
        raise ValueError(f"--data {args.data!r} has {data.num_classes} classes, the models "
                         f"{label_dim}: compare models with the data they were trained on")
    scorer = LabelledDataScorer.for_dataset(data, steps=args.classifier_steps)
    print(f"[compare] scoring classifier trained on {len(scorer.labels_seen)} images of "
          f"{args.data}; accuracy on the {len(scorer.real)} held out: "
          f"{scorer.holdout_accuracy:.3f}", flush=True)
    return scorer


def _bias_warning(scorer, args) -> str:
    """The small-sample bias warning for the report, or ''."""
    note = scorer.bias_note(args.samples, args.repeats)
    return f"Warning: {note}" if note else ""


def _cmd_compare(args) -> int:
    from ..device import busy_cpu_note, set_threads
    from ..eval.compare import compare, reference_row, runs_for, write_report

    _check_args(args)
    set_threads(args.threads)
    note = None if args.threads else busy_cpu_note()
    if note:
        print(note, file=sys.stderr)
    models = _load_models(args)
    scorer = _scorer(args, models)
    runs = []
    for model, sampler, nfes in ROWS:
        runs += runs_for(model, sampler, nfes + ([1000] if args.full and sampler == "ddpm" else []))
    rows = compare(models, runs, scorer, samples=args.samples, repeats=args.repeats,
                   log=lambda s: print("[compare]", s, flush=True))
    ref = reference_row(scorer, samples=args.samples, repeats=args.repeats)
    data = "the digits" if _digits(args) else args.data
    paths = write_report(rows, scorer, args.out, _prefix(args), reference=ref,
                         title=f"{args.edm} (EDM) vs {args.ddpm} (DDPM) on {data}",
                         notes=_bias_warning(scorer, args))
    print(paths["table"].read_text())
    print(f"plot: {paths['plot']}")
    return 0
