"""EDM versus DDPM, measured: sample quality against NFE on real data and on a 2-D toy mixture.

    python bench/compare_edm_ddpm.py --bundled-logs /work/bundled   # full run, ~24 min, 1 thread
    python bench/compare_edm_ddpm.py --quick --out /tmp/cmp          # smoke test, ~2 min

Digits: the two bundled models, ``load_denoiser('default')`` (EDM) and ``'default-ddpm'``
(DDPM), are the same tiny DDPM++ net (preset 'tiny', 16x16, class-conditional, label dropout
0.1) trained on the same data with the same batch (128), optimiser (Adam, lr 1e-3) and budget
(256 kimg); only the loss and preconditioning differ (EDM Eq. 7/8 versus Ho et al.'s
epsilon loss). Scores: feature-space FD against the real digits (DigitsClassifier features,
NOT Inception-FID) and the classifier accuracy of class-conditional samples (label = seed mod 10).

Toy: EDM and DDPM versions of the 'toy-mlp' net trained here with ``edm_fast.train.loop`` on the 2-D
ring mixture (same net, data, batch, optimiser and budget), plus the mixture's exact denoiser,
which isolates the sampler from training error. Scores: sliced W2 to fresh true samples and
the mean exact log-likelihood under the true mixture. Toy nets already in --work are reused
only when their checkpoint metadata (the TrainConfig under meta['train']) shows the same data,
net, loss, budget, batch, lr and seed as this run asks for, trained to the end; otherwise the
script refuses before doing anything. The reports state the budget read from the checkpoints.
--quick trains into its own default --work (runs/compare-toy-quick) for that reason.

The full run took 23.6 min on one CPU thread (13.5 min toy, training both toy nets included;
10 min digits), the trajectory pictures 36 s more (docs/COMPARISON.md).

Every (net, sampler, NFE) row is scored on --repeats disjoint seed sets of --samples seeds and
reported as mean ± standard error. Outputs (in --out): {digits,toy}_table.md,
{digits,toy}_quality_vs_nfe.png, {digits,toy}_samples.png, {digits,toy}_results.json,
loss_curves.png and the trajectory pictures trajectories_1d.{gif,png}, trajectories_2d.png
(exact denoisers of the 1-D bimodal and 2-D ring mixtures, edm_fast.eval.trajectories).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from edm_fast.eval.compare import (
    DigitsScorer,
    ToyScorer,
    check_reference_size,
    check_report_folder,
    compare,
    find_row,
    paired_difference,
    reference_row,
    runs_for,
    write_report,
)

# (net, sampler, NFEs); the quick variant keeps the structure with fewer, cheaper points.
DIGITS_RUNS = [
    ("edm", "edm_heun", [7, 11, 19, 35]), ("edm", "edm_euler", [11, 35]),
    ("edm", "edm_churn", [19, 35]),
    ("ddpm", "ddpm", [10, 50, 100, 1000]), ("ddpm", "ddim", [10, 50, 100]),
    ("ddpm", "edm_heun", [7, 11, 19, 35]),
]
TOY_RUNS = [
    ("exact", "edm_heun", [7, 11, 19, 35]), ("exact", "ddpm", [10, 50, 100, 1000]),
    ("edm", "edm_heun", [7, 11, 19, 35]), ("edm", "edm_euler", [11, 35]),
    ("edm", "edm_churn", [19, 35]),
    ("ddpm", "ddpm", [10, 50, 100, 1000]), ("ddpm", "ddim", [10, 50, 100]),
    ("ddpm", "edm_heun", [7, 11, 19, 35]),
]
QUICK_NFES = {"edm_heun": [7, 35], "edm_euler": [35], "edm_churn": [35], "ddpm": [10, 1000],
              "ddim": [10]}
# (a, b) pairs whose paired difference a - b is reported: the paper's claim and its ablations.
HEADLINES = [
    (("edm", "edm_heun", 35), ("ddpm", "ddpm", 1000)),
    (("ddpm", "edm_heun", 35), ("ddpm", "ddpm", 1000)),
    (("edm", "edm_heun", 35), ("ddpm", "edm_heun", 35)),
    (("edm", "edm_heun", 35), ("edm", "edm_euler", 35)),
    (("edm", "edm_churn", 35), ("edm", "edm_heun", 35)),
    (("exact", "edm_heun", 35), ("exact", "ddpm", 1000)),
    (("edm", "edm_euler", 11), ("ddpm", "ddpm", 1000)),
    (("ddpm", "ddpm", 100), ("ddpm", "ddpm", 1000)),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200, help="digits samples per seed set")
    p.add_argument("--toy-samples", type=int, default=4000, help="toy samples per seed set")
    p.add_argument("--repeats", type=int, default=4, help="seed sets per row (for the SE)")
    p.add_argument("--out", default="docs/figures", help="folder for tables, plots, JSON")
    p.add_argument("--work", default=None,
                   help="folder for the toy training runs and saved rows (default: "
                   "runs/compare-toy, or runs/compare-toy-quick with --quick)")
    p.add_argument("--toy-kimg", type=float, default=2048.0, help="toy training budget (kimg)")
    p.add_argument("--toy-batch", type=int, default=512, help="toy training batch")
    p.add_argument("--bundled-logs", default=None, metavar="DIR",
                   help="folder holding edm/log.jsonl and ddpm/log.jsonl of the bundled runs")
    p.add_argument("--only", choices=["digits", "toy", "trajectories", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--replot", action="store_true",
                   help="only rewrite the reports from the rows saved in --work by a past run")
    args = p.parse_args(argv)
    if args.work is None:
        args.work = "runs/compare-toy-quick" if args.quick else "runs/compare-toy"
    if args.quick:
        args.samples, args.toy_samples, args.repeats = 32, 256, 2
        args.toy_kimg = min(args.toy_kimg, 51.2)
    return args


def run_list(table, quick: bool):
    runs = []
    for model, sampler, nfes in table:
        runs += runs_for(model, sampler, QUICK_NFES[sampler] if quick else nfes)
    return runs


def headlines(rows, scorer) -> str:
    """Markdown bullet list of paired differences a - b (same seeds) for HEADLINES."""
    lines = []
    for a_key, b_key in HEADLINES:
        a, b = find_row(rows, *a_key), find_row(rows, *b_key)
        if a is None or b is None:
            continue
        diffs = ", ".join(f"Δ{m} = {d:+.3f} ± {se:.3f}" for m in scorer.metrics
                          for d, se in [paired_difference(a, b, m)])
        lines.append(f"- {a.spec.label()} @ {a.spec.nfe} minus {b.spec.label()} @ "
                     f"{b.spec.nfe}: {diffs}")
    return "\n".join(lines)


def run_digits(args, out: Path) -> None:
    from edm_fast.io.models import load_denoiser

    start = time.perf_counter()
    scorer = DigitsScorer()
    print(f"[digits] classifier holdout accuracy {scorer.classifier.holdout_accuracy:.3f}")
    ref = reference_row(scorer, samples=args.samples, repeats=args.repeats)
    saved = Path(args.work) / "digits_rows.pt"
    if args.replot:
        rows = torch.load(saved, weights_only=False)
    else:
        models = {"edm": load_denoiser("default"), "ddpm": load_denoiser("default-ddpm")}
        rows = compare(models, run_list(DIGITS_RUNS, args.quick), scorer, samples=args.samples,
                       repeats=args.repeats, batch=256,
                       log=lambda s: print("[digits]", s, flush=True))
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rows, saved)
    notes = (f"{args.samples} samples x {args.repeats} seed sets per row (mean ± SE over the "
             f"sets; labels = seed mod 10). fd_pooled = one FD of all {args.samples * args.repeats}"
             f" samples of a row (less biased, no SE). 'real data' = class-balanced random real "
             f"digits scored the same way; they come from the 1797 digits that also define the "
             f"reference, so that row is optimistic, the pooled one most. Classifier holdout "
             f"accuracy {scorer.classifier.holdout_accuracy:.3f}. Time = all sets, 1 CPU thread. "
             f"Paired differences (same seeds):\n\n{headlines(rows, scorer)}")
    bias = scorer.bias_note(args.samples, args.repeats)
    if bias:
        notes = f"Warning: {bias}\n\n{notes}"
    write_report(rows, scorer, out, "digits", reference=ref, notes=notes,
                 title="Digits 16x16: bundled EDM vs DDPM nets (same net, data, budget)")
    print(f"[digits] done in {time.perf_counter() - start:.0f} s")


TOY_LOSSES = ("edm", "ddpm")
# TrainConfig fields that must agree for a toy checkpoint in --work to be reused
REUSE_KEYS = ("data", "preset", "loss", "kimg", "batch", "lr", "seed")


def toy_config(args, loss: str, run: Path):
    """The TrainConfig of one toy net: the same for EDM and DDPM but for the loss."""
    from edm_fast.train.loop import TrainConfig

    return TrainConfig(data="toy:gmm2d", preset="toy-mlp", loss=loss, kimg=args.toy_kimg,
                       batch=args.toy_batch, lr=1e-3, seed=0, out=str(run), progress=False,
                       ckpt_every_kimg=1e9, sample_every_kimg=0)


def reuse_mismatch(meta: dict, cfg) -> str:
    """Why a checkpoint (its metadata) is not the net that ``cfg`` would train, or '' when it is:
    the same REUSE_KEYS in meta['train'], and trained to the end of the budget."""
    saved = meta.get("train")
    if not isinstance(saved, dict):
        return "its metadata records no training config"
    wanted = dataclasses.asdict(cfg)
    diffs = [f"{k}={saved.get(k)!r} (this run: {wanted[k]!r})" for k in REUSE_KEYS
             if saved.get(k) != wanted[k]]
    steps = math.ceil(cfg.kimg * 1000 / cfg.batch)  # train()'s step count for this budget
    if not diffs and meta.get("step") != steps:
        diffs.append(f"it stopped at step {meta.get('step')} of {steps}")
    return ", ".join(diffs)


def _toy_meta(run: Path) -> dict | None:
    """The metadata of the newest checkpoint in a toy run folder, or None when it has none."""
    from edm_fast.io.checkpoints import latest_checkpoint, read_checkpoint

    latest = latest_checkpoint(run)
    return None if latest is None else read_checkpoint(latest, prefixes=())[1]


def check_toy_work(args, work: Path) -> list[str]:
    """One message per toy checkpoint in ``work`` that this run would reuse but must not: it
    was trained with another budget or config (reusing it would report the wrong budget)."""
    from edm_fast.io.checkpoints import CheckpointError

    problems = []
    for loss in TOY_LOSSES:
        run = work / loss
        try:
            meta = _toy_meta(run)
        except CheckpointError as exc:
            problems.append(f"cannot reuse the toy net in {run}: {exc}")
            continue
        why = None if meta is None else reuse_mismatch(meta, toy_config(args, loss, run))
        if why:
            problems.append(f"{run} holds a toy net that does not match this run: {why}; "
                            f"delete {run}, pass another --work, or match --toy-kimg and "
                            f"--toy-batch to it")
    return problems


def trained_budget(work: Path) -> str:
    """The budget the toy nets in ``work`` were actually trained with, from their checkpoints."""
    found = {}
    for loss in TOY_LOSSES:
        meta = _toy_meta(work / loss)
        if meta is not None and isinstance(meta.get("train"), dict):
            found[loss] = (f"{meta['step'] * meta['train']['batch'] / 1000:g} kimg "
                           f"({meta['step']} steps at batch {meta['train']['batch']})")
    if not found:
        return f"toy nets: training budget unknown (no checkpoints in {work})"
    if len(set(found.values())) == 1 and len(found) == len(TOY_LOSSES):
        return f"toy nets trained for {next(iter(found.values()))}"
    return "toy nets trained for " + ", ".join(f"{v} ({k})" for k, v in found.items())


def train_toy(args, work: Path) -> dict:
    """EDM and DDPM toy-mlp nets on the 2-D ring mixture, same everything but the loss. Nets
    already in ``work`` are reused; ``check_toy_work`` has made sure they match this run."""
    from edm_fast.io.models import load_denoiser
    from edm_fast.train.loop import train

    models = {}
    for loss in TOY_LOSSES:
        run = work / loss
        if _toy_meta(run) is None:
            t0 = time.perf_counter()
            summary = train(toy_config(args, loss, run))
            print(f"[toy] trained {loss}: {summary['steps']} steps, final loss "
                  f"{summary['final_loss']:.4f}, {time.perf_counter() - t0:.0f} s", flush=True)
        else:
            print(f"[toy] reusing the {loss} net in {run}", flush=True)
        models[loss] = load_denoiser(run)
    return models


def run_toy(args, out: Path, work: Path) -> None:
    from edm_fast.nets.toy import ring_mixture_2d

    start = time.perf_counter()
    mixture = ring_mixture_2d()
    scorer = ToyScorer(mixture)
    ref = reference_row(scorer, samples=args.toy_samples, repeats=args.repeats)
    if args.replot:
        rows = torch.load(work / "toy_rows.pt", weights_only=False)
    else:
        models = {"exact": mixture.as_denoiser(), **train_toy(args, work)}
        rows = compare(models, run_list(TOY_RUNS, args.quick), scorer, samples=args.toy_samples,
                       repeats=args.repeats, batch=args.toy_samples, keep=1000,
                       log=lambda s: print("[toy]", s, flush=True))
        torch.save(rows, work / "toy_rows.pt")
    notes = (f"{args.toy_samples} samples x {args.repeats} seed sets per row; "
             f"{trained_budget(work)}; 'exact' = the mixture's "
             f"closed-form denoiser. Paired differences (same seeds):\n\n"
             f"{headlines(rows, scorer)}")
    write_report(rows, scorer, out, "toy", reference=ref, mixture=mixture, notes=notes,
                 title="2-D ring mixture: toy-mlp EDM vs DDPM nets, and the exact denoiser")
    print(f"[toy] done in {time.perf_counter() - start:.0f} s")


TRAJECTORY_RUNS = [("edm_heun", 35, "EDM Heun (Alg. 1), 18 steps = 35 NFE"),
                   ("ddpm", 35, "DDPM ancestral, 35 steps = 35 NFE"),
                   ("ddpm", 1000, "DDPM ancestral, 1000 steps = 1000 NFE")]


def make_trajectories(out: Path, quick: bool) -> None:
    """Paths of three samplers with the exact denoiser over p(x; sigma): 1-D GIF + PNG, 2-D grid."""
    from edm_fast.nets.toy import bimodal_mixture_1d, ring_mixture_2d
    from edm_fast.eval.trajectories import (
        animate_trajectories_1d,
        plot_frames_2d,
        plot_trajectories_1d,
        record_trajectories,
    )

    start = time.perf_counter()
    n = 200 if quick else 2000
    for mixture, dim in ((bimodal_mixture_1d(), 1), (ring_mixture_2d(), 2)):
        exact = mixture.as_denoiser()
        trajs = [record_trajectories(exact, sampler, nfe, range(n), dim, title=title)
                 for sampler, nfe, title in TRAJECTORY_RUNS]
        if dim == 1:
            plot_trajectories_1d(mixture, trajs, out / "trajectories_1d.png")
            animate_trajectories_1d(mixture, trajs, out / "trajectories_1d.gif",
                                    frames=8 if quick else 36)
        else:
            plot_frames_2d(mixture, trajs, out / "trajectories_2d.png")
    print(f"[trajectories] done in {time.perf_counter() - start:.0f} s")


def _losses(log: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    return [r["kimg"] for r in records], [r["loss"] for r in records]


def plot_loss_curves(panels: dict[str, dict[str, Path]], path: Path) -> None:
    """One panel per dataset, the EDM and DDPM training losses against kimg (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {k: {n: p for n, p in v.items() if p.exists()} for k, v in panels.items()}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        print("[loss] no training logs found; loss_curves.png not written")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), dpi=90,
                             squeeze=False)
    for ax, (title, logs) in zip(axes[0], panels.items()):
        for name, log in logs.items():
            kimg, loss = _losses(log)
            color = "tab:blue" if "EDM" in name else "tab:red"
            ax.plot(kimg, loss, lw=1.2, label=name, color=color)
        ax.set_yscale("log")
        ax.set_xlabel("training images (kimg)")
        ax.set_ylabel("training loss (per element)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.text(0.5, 0.005, "The two losses are different quantities (EDM: Eq. 8 weighted so that "
             "lambda c_out^2 = 1; DDPM: epsilon MSE); compare shapes, not levels.",
             ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def preflight(args, out: Path, work: Path) -> list[str]:
    """Everything that can be checked before the first minute of training or sampling: the
    output folder, the real digits the digits reference needs, and the toy nets in --work."""
    problems = []
    parts = {"toy": ("toy",), "digits": ("digits",), "all": ("toy", "digits")}.get(args.only, ())
    checks = [lambda part=part: check_report_folder(out, part) for part in parts or (None,)]
    if "digits" in parts:
        checks.append(lambda: check_reference_size(args.samples, args.repeats))
    for check in checks:
        try:
            check()
        except ValueError as exc:
            problems.append(str(exc))
    if "toy" in parts and not args.replot:
        problems += check_toy_work(args, work)
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out, work = Path(args.out), Path(args.work)
    problems = preflight(args, out, work)
    for problem in problems:
        print(f"compare_edm_ddpm.py: error: {problem}", file=sys.stderr)
    if problems:
        return 2
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.only in ("toy", "all"):
        run_toy(args, out, work)
    if args.only in ("digits", "all"):
        run_digits(args, out)
    if args.only in ("trajectories", "all"):
        make_trajectories(out, args.quick)
    panels = {"2-D ring mixture, toy-mlp (this script)": {
        "EDM loss": work / "edm" / "log.jsonl", "DDPM loss": work / "ddpm" / "log.jsonl"}}
    if args.bundled_logs:
        root = Path(args.bundled_logs)
        panels = {"digits 16x16, bundled 'tiny' nets": {
            "EDM loss": root / "edm" / "log.jsonl", "DDPM loss": root / "ddpm" / "log.jsonl"},
            **panels}
    plot_loss_curves(panels, out / "loss_curves.png")
    print(f"all done in {time.perf_counter() - start:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
