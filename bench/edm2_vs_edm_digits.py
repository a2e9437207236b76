"""EDM2 against EDM on the digits at an equal training budget, and post-hoc EMA against the EMA
the run tracked.

    python bench/edm2_vs_edm_digits.py --out runs/edm2-vs-edm                 # 256 kimg each
    python bench/edm2_vs_edm_digits.py --quick --out /tmp/edm2-vs-edm          # smoke test

Both nets are trained here with ``edm-fast train``'s library entry point on the 16x16 digits,
class-conditional, with the same batch, number of images and seed: ``tiny`` (DDPM++,
~0.3M parameters) with EDM's loss, lr 1e-3 and a half-life EMA; ``tiny-edm2`` (the
magnitude-preserving U-Net, ~0.3M parameters) with the EDM2 recipe of edm_fast.train.edm2 (the
learned-uncertainty loss, the inverse-square-root learning rate, power-function EMAs at
sigma_rel 0.05 and 0.10). The EDM2 run's snapshots are then reconstructed at --sigma-rel
values by post-hoc EMA (edm_fast.train.phema_snapshots, Alg. 3 of the paper), and every net is
sampled with EDM's Heun sampler at --nfe and scored with edm_fast.eval.compare.DigitsScorer:
feature-space FD to the real digits (a classifier's features, not Inception-FID) and the
classifier accuracy of class-conditional samples, mean +- standard error over --repeats
disjoint seed sets. Every checkpoint of both runs (each 1/8 of the budget, the EMA as
trained) is scored the same way, for the training curve (--no-curve: the final nets only).
Training runs already in --out are continued or reused (resume), so a second call only
re-scores; --train-only edm|edm2|both trains and stops (e.g. the two runs in two processes).

Outputs in --out: edm/ and edm2/ (the runs), phema/ (the reconstructions), edm2_table.md,
edm2_results.json (the rows, training minutes from the runs' logs, parameter counts and the
options), and in --figures (default OUT/figures) edm2_vs_edm_training.png (FD and accuracy
against training kimg, the post-hoc EMA rows at the end) and edm2_vs_edm_samples.png (the
first 40 samples of edm, edm2 and the best post-hoc EMA, the same seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from edm_fast.io.checkpoints import latest_checkpoint, load_denoiser_checkpoint
from edm_fast.eval.compare import (
    DigitsScorer,
    compare,
    format_table,
    reference_row,
    runs_for,
    strict_json,
)
from edm_fast.io.samples import tile_images
from edm_fast.train.phema import parse_sigma_rels
from edm_fast.train.phema_snapshots import reconstruct_snapshots
from edm_fast.train.loop import TrainConfig, train


def _train(name: str, cfg: TrainConfig) -> tuple[float, dict]:
    """Train (or continue, or reuse) one run; (wall seconds of this call, summary)."""
    start = time.perf_counter()
    summary = train(cfg, resume=latest_checkpoint(cfg.out) is not None)
    seconds = time.perf_counter() - start
    print(f"[{name}] {summary['steps']} steps, {summary['kimg']:g} kimg, final loss "
          f"{summary['final_loss']}, {seconds:.0f} s", file=sys.stderr, flush=True)
    return seconds, summary


def checkpoints(run: Path, batch: int, every: int) -> list[tuple[float, Path]]:
    """(kimg, file) of the run folder's checkpoints at multiples of ``every`` steps, in order
    (``ckpt-<step>.safetensors``; one written when a run was interrupted is left out)."""
    steps = sorted(int(f.stem.split("-")[1]) for f in run.glob("ckpt-*.safetensors"))
    return [(step * batch / 1000, run / f"ckpt-{step:08d}.safetensors")
            for step in steps if step % every == 0]


def curve_name(net: str, kimg: float) -> str:
    return f"{net} @ {kimg:g} kimg"


def training_minutes(run: Path, batch: int) -> float:
    """Training time of a run from its log.jsonl: steps between records / their img/s."""
    seconds, last = 0.0, 0
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "img_per_s" not in record:
            continue
        if record["step"] > last:  # (steps repeated after a resume are counted once)
            seconds += (record["step"] - last) * batch / record["img_per_s"]
        last = record["step"]
    return seconds / 60


def plot_training_curve(rows, scorer, reference, path: Path, *, final_kimg: float) -> Path:
    """FD and accuracy (mean +- SE) against training kimg for both nets, the post-hoc EMA rows
    at the final kimg, and the real-data level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    for ax, metric in zip(axes, ("fd", "acc")):
        for net, color in (("edm", "tab:blue"), ("edm2", "tab:red")):
            points = sorted((float(r.spec.model.split(" @ ")[1].split()[0]), r.stat(metric))
                            for r in rows if r.spec.model.startswith(f"{net} @ "))
            points += [(final_kimg, r.stat(metric)) for r in rows if r.spec.model == net]
            ax.errorbar([k for k, _ in points], [m for _, (m, _) in points],
                        yerr=[se for _, (_, se) in points], color=color, marker="o", ms=3.5,
                        capsize=2, label=f"{net} (EMA as trained)")
        for i, r in enumerate(row for row in rows if "post-hoc" in row.spec.model):
            m, se = r.stat(metric)
            ax.errorbar([final_kimg * (1.02 + 0.015 * i)], [m], yerr=[se], color="tab:orange",
                        marker="s", ms=3.5, capsize=2,
                        label="edm2 post-hoc EMA (sigma_rel increasing to the right)"
                        if i == 0 else None)
        if reference is not None and metric in reference:
            ax.axhline(reference[metric][0], color="0.4", lw=1, label="real digits")
        if metric == "fd":
            ax.set_yscale("log")
        ax.set_xlabel("training kimg (batch 128)")
        ax.set_title(scorer.titles.get(metric, metric), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_samples(rows, path: Path, count: int = 40, ncol: int = 20) -> Path:
    """One line per row: its first ``count`` samples (seeds 0.., the same in every line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.35 * len(rows)), dpi=100,
                             squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        grid = (tile_images(row.examples[:count].float().clamp(-1, 1), ncol, padding=1,
                            background=1.0) + 1) / 2
        ax.imshow(grid[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        fd, se = row.stat("fd")
        ax.set_title(f"{row.spec.model}: FD {fd:.2f} +- {se:.2f}", fontsize=8, pad=2)
        ax.set_axis_off()
    fig.tight_layout(pad=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the runs and the report")
    p.add_argument("--kimg", type=float, default=256.0, help="training budget of each net")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sigma-rel", default="0.05,0.1,0.15,0.2",
                   help="post-hoc EMA lengths to reconstruct from the EDM2 run")
    p.add_argument("--nfe", type=int, default=35, help="Heun sampler evaluations (2 steps - 1)")
    p.add_argument("--samples", type=int, default=500, help="samples per seed set")
    p.add_argument("--repeats", type=int, default=3, help="disjoint seed sets per row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-curve", action="store_true",
                   help="score only the final nets, not every checkpoint of both runs")
    p.add_argument("--figures", default=None,
                   help="folder for the figures (default: OUT/figures)")
    p.add_argument("--train-only", default=None, choices=["edm", "edm2", "both"],
                   help="train (or continue) these runs and stop, e.g. each in its own "
                        "process; a later call scores them")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 kimg of training, 50 samples x 2, NFE 7")
    args = p.parse_args(argv)
    if args.quick:
        args.kimg, args.samples, args.repeats, args.nfe = 2.0, 50, 2, 7
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = dict(data="digits", cond=True, batch=args.batch, kimg=args.kimg, seed=args.seed,
                  progress=False, sample_every_kimg=0, ckpt_every_kimg=max(args.kimg / 8, 1),
                  keep_ckpts=1000, log_every=10)  # every checkpoint kept: the training curve
    edm_cfg = TrainConfig(out=str(out / "edm"), preset="tiny", loss="edm", dropout=0.0,
                          **common)
    edm2_cfg = TrainConfig(out=str(out / "edm2"), preset="tiny-edm2",
                           snapshot_every_kimg=max(args.kimg / 16, 0.5), **common)
    timings = {}
    for name, cfg in (("edm", edm_cfg), ("edm2", edm2_cfg)):
        if args.train_only in (None, "both", name):
            timings[name] = _train(name, cfg)[0]
    if args.train_only:
        return 0

    sigma_rels = parse_sigma_rels(args.sigma_rel)
    paths = reconstruct_snapshots(out / "edm2", sigma_rels, out / "phema")
    models = {"edm": load_denoiser_checkpoint(out / "edm"),
              "edm2": load_denoiser_checkpoint(out / "edm2")}  # its first profile, 0.05
    for sigma_rel, path in zip(sigma_rels, paths):
        models[f"edm2 post-hoc {sigma_rel:.3f}"] = load_denoiser_checkpoint(path)
    params = {name: sum(p.numel() for p in den.model.parameters())
              for name, den in models.items()}
    every = max(1, round(common["ckpt_every_kimg"] * 1000 / args.batch))  # as train() does
    curve = {} if args.no_curve else {
        (net, kimg): load_denoiser_checkpoint(path)
        for net in ("edm", "edm2") for kimg, path in checkpoints(out / net, args.batch, every)[:-1]}
    models.update({curve_name(net, kimg): den for (net, kimg), den in curve.items()})

    scorer = DigitsScorer()
    runs = [spec for name in models for spec in runs_for(name, "edm_heun", [args.nfe])]
    rows = compare(models, runs, scorer, samples=args.samples, repeats=args.repeats,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    reference = reference_row(scorer, samples=args.samples, repeats=args.repeats)
    final = [r for r in rows if " @ " not in r.spec.model]
    table = format_table(final, scorer, reference=reference)
    minutes = {net: training_minutes(out / net, args.batch) for net in ("edm", "edm2")}
    header = (f"# EDM2 (tiny-edm2) against EDM (tiny) on the 16x16 digits\n\n"
              f"Equal budget: {args.kimg:g} kimg each, batch {args.batch}, seed {args.seed}, "
              f"class-conditional; Heun sampler at {args.nfe} NFE; {args.repeats} x "
              f"{args.samples} samples per row. Parameters: " +
              ", ".join(f"{k} {v:,}" for k, v in params.items() if "post-hoc" not in k) +
              ". Training time (the runs' own logs, summed over resumed pieces): " +
              ", ".join(f"{k} {v:.1f} min" for k, v in minutes.items()) + ".\n\n"
              "'edm2' is the checkpoint's EMA (the tracked sigma_rel 0.05 profile); the "
              "post-hoc rows are reconstructed from the run's snapshots.\n\n")
    if curve:
        header_curve = ("\nDuring training (each run's EMA at its checkpoints, the same "
                        "seeds):\n\n")
        table += header_curve + format_table([r for r in rows if " @ " in r.spec.model],
                                             scorer)
    figures = Path(args.figures) if args.figures else out / "figures"
    plot_training_curve(rows, scorer, reference, figures / "edm2_vs_edm_training.png",
                        final_kimg=args.kimg)
    best = min((r for r in final if "post-hoc" in r.spec.model),
               key=lambda r: r.stat("fd")[0])
    plot_samples([r for r in final if r.spec.model in ("edm", "edm2")] + [best],
                 figures / "edm2_vs_edm_samples.png")
    out.mkdir(parents=True, exist_ok=True)
    (out / "edm2_table.md").write_text(header + table + "\n")
    (out / "edm2_results.json").write_text(json.dumps(strict_json(
        {"options": vars(args), "this_call_train_s": timings, "train_minutes": minutes,
         "params": params, "reference": reference, "rows": [row.to_json() for row in rows]}),
        indent=2))
    print(header + table)
    print(f"figures in {figures}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
