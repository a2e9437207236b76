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
disjoint seed sets. Training runs already in --out are continued or reused (resume), so a
second call only re-scores.

Outputs in --out: edm/ and edm2/ (the runs), phema/ (the reconstructions), edm2_table.md,
edm2_results.json (the rows, training wall times, parameter counts and the options).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from edm_fast.io.checkpoints import latest_checkpoint, load_denoiser_checkpoint
from edm_fast.eval.compare import DigitsScorer, compare, format_table, reference_row, runs_for
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
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 kimg of training, 50 samples x 2, NFE 7")
    args = p.parse_args(argv)
    if args.quick:
        args.kimg, args.samples, args.repeats, args.nfe = 2.0, 50, 2, 7
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = dict(data="digits", cond=True, batch=args.batch, kimg=args.kimg, seed=args.seed,
                  progress=False, sample_every_kimg=0, ckpt_every_kimg=max(args.kimg / 4, 1),
                  log_every=10)
    edm_cfg = TrainConfig(out=str(out / "edm"), preset="tiny", loss="edm", dropout=0.0,
                          **common)
    edm2_cfg = TrainConfig(out=str(out / "edm2"), preset="tiny-edm2",
                           snapshot_every_kimg=max(args.kimg / 16, 0.5), **common)
    timings = {}
    for name, cfg in (("edm", edm_cfg), ("edm2", edm2_cfg)):
        timings[name] = _train(name, cfg)[0]

    sigma_rels = parse_sigma_rels(args.sigma_rel)
    paths = reconstruct_snapshots(out / "edm2", sigma_rels, out / "phema")
    models = {"edm": load_denoiser_checkpoint(out / "edm"),
              "edm2": load_denoiser_checkpoint(out / "edm2")}  # its first profile, 0.05
    for sigma_rel, path in zip(sigma_rels, paths):
        models[f"edm2 post-hoc {sigma_rel:.3f}"] = load_denoiser_checkpoint(path)
    params = {name: sum(p.numel() for p in den.model.parameters())
              for name, den in models.items()}

    scorer = DigitsScorer()
    runs = [spec for name in models for spec in runs_for(name, "edm_heun", [args.nfe])]
    rows = compare(models, runs, scorer, samples=args.samples, repeats=args.repeats,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    reference = reference_row(scorer, samples=args.samples, repeats=args.repeats)
    table = format_table(rows, scorer, reference=reference)
    header = (f"# EDM2 (tiny-edm2) against EDM (tiny) on the 16x16 digits\n\n"
              f"Equal budget: {args.kimg:g} kimg each, batch {args.batch}, seed {args.seed}, "
              f"class-conditional; Heun sampler at {args.nfe} NFE; {args.repeats} x "
              f"{args.samples} samples per row. Parameters: " +
              ", ".join(f"{k} {v:,}" for k, v in params.items() if "post-hoc" not in k) +
              ". Training wall time: " +
              ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) +
              " (a resumed or reused run counts only this call's time).\n\n"
              "'edm2' is the checkpoint's EMA (the tracked sigma_rel 0.05 profile); the "
              "post-hoc rows are reconstructed from the run's snapshots.\n\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "edm2_table.md").write_text(header + table + "\n")
    (out / "edm2_results.json").write_text(json.dumps(
        {"options": vars(args), "timings_s": timings, "params": params,
         "reference": reference, "rows": [row.to_json() for row in rows]}, indent=2))
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
