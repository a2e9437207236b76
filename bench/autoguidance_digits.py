"""Autoguidance against no guidance and against classifier-free guidance on the digits.

    python bench/autoguidance_digits.py --out runs/ag                                # 64-kimg guide
    python bench/autoguidance_digits.py --out runs/ag128 --guide-kimg 128 --no-cfg   # another guide
    python bench/autoguidance_digits.py --quick --out /tmp/ag                        # smoke test

The main model is the bundled class-conditional digits model (``load_denoiser("default")``:
``tiny``, DDPM++ with ~0.3M parameters, EDM's loss, 256 kimg at batch 128, seed 0, dropout 0.1,
label dropout 0.1, lr 1e-3, EMA half-life 50 kimg). The guide is the same recipe trained here
for fewer images (--guide-kimg, with another seed): autoguidance's "bad version of the model
itself" (Karras et al. 2024, arXiv 2406.02507, Eq. 1: D_g + w (D - D_g)). A guide run already in
--out is continued or reused (resume), so a second call only re-scores.

Every row samples the main model with ``edm_fast.sampling.Sampler`` (Heun, EDM Alg. 1 without
churn, at --nfe evaluations, the EDM sigma grid of Eq. 5): no guidance; classifier-free
guidance D_u + w (D_c - D_u) at each --weights w (``Sampler(guidance=w)``); autoguidance at the
same w's (``Sampler(guide=..., guidance=w)``), and, with --interval, autoguidance applied only
for sigma inside that interval (Kynkaanniemi et al. 2024). The guide alone is scored too, to
show how much weaker it is. Guided rows evaluate two networks per step, so they cost about
twice the time of the unguided row at the same NFE.

Scores (edm_fast.eval.compare.DigitsScorer): feature-space FD to the real digits (a digits
classifier's features, not Inception-FID) and the classifier accuracy of class-conditional
samples (label = seed mod 10), mean +- standard error over --repeats disjoint seed sets of
--samples seeds each. Every row uses the same seeds, so the script also reports the paired
difference of each row to the unguided row (mean +- SE of per-seed-set differences).

Outputs in --out: guide-<kimg>kimg/ (the guide run), autoguidance_table.md and
autoguidance_results.json (the rows with per-seed-set scores, the paired differences, the
options, the guide's training time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from edm_fast.eval.compare import (
    DigitsScorer,
    Row,
    RunSpec,
    format_score,
    format_table,
    paired_difference,
    reference_row,
    strict_json,
)
from edm_fast.io.checkpoints import latest_checkpoint, load_denoiser_checkpoint
from edm_fast.io.model_card import model_card
from edm_fast.io.models import load_denoiser
from edm_fast.sampling.sampler import Sampler
from edm_fast.train.loop import TrainConfig, train


TINY_CHANNELS = 16  # the base channel count of the `tiny` preset (the bundled model's net)


def parse_floats(text: str) -> list[float]:
    """'1.2,1.5,2' -> [1.2, 1.5, 2.0] (empty text: [])."""
    return [float(v) for v in text.split(",") if v.strip()]


def train_guide(out: Path, kimg: float, seed: int, batch: int,
                channels: int = TINY_CHANNELS) -> tuple[float, dict]:
    """Train (or continue, or reuse) the guide: the bundled model's recipe at ``kimg``, its
    net ``tiny`` with ``channels`` base channels (a smaller guide below 16);
    (wall seconds of this call, training summary)."""
    overrides = {} if channels == TINY_CHANNELS else {"model_channels": channels}
    cfg = TrainConfig(out=str(out), data="digits", preset="tiny", loss="edm", cond=True,
                      label_dropout=0.1, batch=batch, kimg=kimg, seed=seed, progress=False,
                      sample_every_kimg=0, ckpt_every_kimg=max(kimg / 4, 1), log_every=10,
                      net_overrides=overrides)
    start = time.perf_counter()
    summary = train(cfg, resume=latest_checkpoint(cfg.out) is not None)
    seconds = time.perf_counter() - start
    print(f"[guide {kimg:g} kimg] {summary['steps']} steps, final loss "
          f"{summary['final_loss']}, {seconds:.0f} s", file=sys.stderr, flush=True)
    return seconds, summary


def score_sampler(name: str, sampler: Sampler, scorer: DigitsScorer, nfe: int, *, samples: int,
                  repeats: int) -> Row:
    """One row: the sampler's samples on ``repeats`` disjoint seed sets (seeds r*n .. r*n+n-1,
    labels seed mod 10, as ``compare`` draws them), scored per set and pooled."""
    row, start, pool = Row(RunSpec(name, "edm_heun", nfe)), time.perf_counter(), []
    for r in range(repeats):
        seeds = range(r * samples, (r + 1) * samples)
        labels = scorer.labels(seeds)
        x = sampler(seeds=seeds, class_labels=labels).float().cpu()
        for metric, value in scorer(x, labels, r).items():
            row.values.setdefault(metric, []).append(value)
        pool.append(x)
    row.pooled = scorer.pooled(torch.cat(pool), scorer.labels(range(repeats * samples)))
    row.seconds = time.perf_counter() - start
    scores = ", ".join(f"{m} {format_score(*row.stat(m))}" for m in scorer.metrics)
    print(f"{name}: {scores} ({row.seconds:.0f} s)", file=sys.stderr, flush=True)
    return row


def difference_table(rows: list[Row], baseline: Row, metrics) -> str:
    """Markdown: each row minus the baseline row, mean +- SE of per-seed-set differences."""
    lines = ["| net | " + " | ".join(f"{m} - unguided" for m in metrics) + " |",
             "|" + "---|" * (len(metrics) + 1)]
    for row in rows:
        if row is baseline:
            continue
        cells = [format_score(*paired_difference(row, baseline, m)) for m in metrics]
        lines.append(f"| {row.spec.model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the guide run and the report")
    p.add_argument("--model", default="default",
                   help="the main model (a name or checkpoint load_denoiser takes)")
    p.add_argument("--guide-kimg", type=float, default=64.0,
                   help="training length of the guide (the bundled model has 256)")
    p.add_argument("--guide-seed", type=int, default=1, help="the guide run's seed")
    p.add_argument("--guide-channels", type=int, default=TINY_CHANNELS,
                   help="base channels of the guide's net (the bundled model's `tiny` has 16; "
                        "8 gives a guide with about a quarter of its parameters, as the paper "
                        "guides EDM2-S with the smaller XS)"),
    p.add_argument("--batch", type=int, default=128, help="the guide run's batch")
    p.add_argument("--weights", default="1.2,1.5,2",
                   help="guidance weights w for both guidances (1: no guidance)")
    p.add_argument("--interval", default="0.28,5.42",
                   help="'lo,hi': also autoguidance applied only for sigma in [lo, hi] "
                        "('' leaves these rows out)")
    p.add_argument("--no-cfg", action="store_true",
                   help="leave out the classifier-free guidance rows (another guide, same main "
                        "model: those rows do not change)")
    p.add_argument("--nfe", type=int, default=35, help="Heun evaluations (2 steps - 1), odd")
    p.add_argument("--samples", type=int, default=400, help="samples per seed set")
    p.add_argument("--repeats", type=int, default=4, help="disjoint seed sets per row")
    p.add_argument("--sample-batch", type=int, default=200, help="samples per sampler call")
    p.add_argument("--backend", default="onnx",
                   help="Sampler backend for every row: onnx (the fastest CPU backend here; "
                        "its samples match 'reference' to 1e-6) or reference, compiled, auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a 1-kimg guide, 70 samples x 2, NFE 7, w = 1.5")
    args = p.parse_args(argv)
    if args.quick:
        args.guide_kimg, args.samples, args.repeats, args.nfe = 1.0, 70, 2, 7
        args.weights = "1.5"
    if args.nfe < 1 or args.nfe % 2 == 0:
        p.error(f"--nfe must be odd (Heun: 2 steps - 1), got {args.nfe}")
    weights = parse_floats(args.weights)
    interval = tuple(parse_floats(args.interval)) or None
    if interval is not None and len(interval) != 2:
        p.error(f"--interval takes 'lo,hi', got {args.interval!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)

    small = "" if args.guide_channels == TINY_CHANNELS else f"-{args.guide_channels}ch"
    guide_dir = out / f"guide-{args.guide_kimg:g}kimg{small}"
    guide_seconds, guide_summary = train_guide(guide_dir, args.guide_kimg, args.guide_seed,
                                               args.batch, args.guide_channels)
    main_model = load_denoiser(args.model)
    guide_model = load_denoiser_checkpoint(guide_dir)
    main_kimg = model_card(main_model).config.get("kimg")
    params = sum(q.numel() for q in main_model.parameters())
    guide_params = sum(q.numel() for q in guide_model.parameters())

    steps = (args.nfe + 1) // 2
    common = dict(solver="heun", num_steps=steps, batch_size=args.sample_batch,
                  device="cpu", backend=args.backend)
    guide_label = f"guide ({args.guide_kimg:g} kimg, {guide_params:,} params)"
    variants = [("unguided", dict()), (f"{guide_label} alone", dict(model=guide_model))]
    variants += [(f"CFG w={w:g}", dict(guidance=w)) for w in weights if not args.no_cfg]
    variants += [(f"autoguidance w={w:g}", dict(guide=guide_model, guidance=w))
                 for w in weights]
    if interval is not None:
        variants += [(f"autoguidance w={w:g}, sigma in [{interval[0]:g}, {interval[1]:g}]",
                      dict(guide=guide_model, guidance=w, guidance_interval=interval))
                     for w in weights]

    scorer = DigitsScorer()
    scorer.check_sizes(args.samples, args.repeats)
    rows = []
    for name, options in variants:
        model = options.pop("model", main_model)
        sampler = Sampler(model, **common, **options)
        rows.append(score_sampler(name, sampler, scorer, args.nfe, samples=args.samples,
                                  repeats=args.repeats))
    try:
        reference = reference_row(scorer, samples=args.samples, repeats=args.repeats)
    except ValueError as exc:  # more samples than class-balanced real digits
        print(f"no real-data row: {exc}", file=sys.stderr)
        reference = None
    table = format_table(rows, scorer, reference=reference)
    differences = difference_table(rows, rows[0], scorer.metrics)
    note = scorer.bias_note(args.samples, args.repeats)
    header = (
        f"# Autoguidance on the 16x16 digits\n\n"
        f"Main net: '{args.model}' ({params:,} parameters, {main_kimg} kimg). Guide: the same "
        f"recipe (tiny with {args.guide_channels} base channels, {guide_params:,} parameters; "
        f"EDM loss, class-conditional, label dropout 0.1) trained "
        f"{args.guide_kimg:g} kimg at batch {args.batch}, seed {args.guide_seed} "
        f"({guide_seconds:.0f} s of training in this call). Heun at {args.nfe} NFE "
        f"({steps} steps); guided rows evaluate two networks per step. {args.repeats} x "
        f"{args.samples} samples per row, the same seeds in every row. 'CFG': "
        f"classifier-free guidance; 'autoguidance': D_g + w (D - D_g) with the guide"
        + ("; 'sigma in [lo, hi]': only there" if interval else "") + ". FD: feature FD of "
        "a digits classifier (not Inception-FID), lower is better; acc: that classifier's "
        "accuracy on the conditional samples.\n\n" + (f"{note}\n\n" if note else ""))
    body = (table + "\nPaired differences to the unguided row (mean +- SE over the seed "
            "sets; negative FD and positive acc are improvements):\n\n" + differences)
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoguidance_table.md").write_text(header + body)

    results = {"options": vars(args), "guide_train_seconds": guide_seconds,
               "guide_summary": guide_summary,
               "main_params": params, "main_kimg": main_kimg, "reference": reference,
               "rows": [row.to_json() for row in rows],
               "paired_differences": {row.spec.model: {m: paired_difference(row, rows[0], m)
                                                       for m in scorer.metrics}
                                      for row in rows[1:]}}
    (out / "autoguidance_results.json").write_text(json.dumps(strict_json(results), indent=2))
    print(header + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
