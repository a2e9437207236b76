"""What a 64x64 RGB image folder teaches a net in 10 minutes and in an hour on this CPU: trains
the recipes below, scores their checkpoints with a classifier of the folder's own images, and
writes the time table of the README and docs/OWN_PICTURES.md.

    python bench/photo_folder.py --out data/photos          # the folder (or bring your own)
    python bench/own_pictures_recipe.py --data data/photos --out runs/recipe --jobs 2
    python bench/own_pictures_recipe.py --data /tmp/photos --out /tmp/recipe --quick  # smoke

Each recipe is one ``edm-fast train`` command (printed, so it can be run by hand), run in its own
process with --threads torch threads (default 1: on a shared 2-core machine one thread per
process is the fastest setting), and timed here; --jobs runs recipes side by side. A finished
run in --out is reused (its wall time is read from recipe_time.json). Every checkpoint listed in
a recipe's ``score_kimg`` is sampled with EDM's Heun sampler (Alg. 1) at --nfe, class-conditional
without guidance, and scored by ``LabelledDataScorer``: a small classifier trained on a
stratified 80% of the folder gives the feature-space Frechet distance (not Inception-FID) and the
accuracy of the samples; the held-out 20% scored the same way is the real-data floor. Mean +-
standard error over --repeats disjoint seed sets.

Outputs in --out: the runs, recipe_table.md, recipe_results.json, and a sample grid per scored
checkpoint (recipe_<name>_<kimg>kimg.png, 8 seeds per class) beside real_images.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from edm_fast.eval.compare import (
    LabelledDataScorer,
    compare,
    format_table,
    reference_row,
    runs_for,
    sample_at_nfe,
)
from edm_fast.io.checkpoints import list_checkpoints, load_denoiser_checkpoint
from edm_fast.io.samples import save_grid
from edm_fast.train.data import load_dataset

try:
    from bench.results import append_results, command_line
except ImportError:  # run as a script from bench/
    from results import append_results, command_line


@dataclass(frozen=True)
class Recipe:
    """One training budget: the options of ``edm-fast train`` and the checkpoints to score."""

    name: str
    kimg: float
    options: tuple[str, ...]
    score_kimg: tuple[float, ...]
    ckpt_every: float = 0.0  # 0: one checkpoint, at the end

    def command(self, data: str, out: Path, threads: int) -> list[str]:
        return ["edm-fast", "train", "--data", data, "--kimg", f"{self.kimg:g}",
                "--ckpt-every", f"{self.ckpt_every or self.kimg:g}", "--sample-every", "0",
                "--threads", str(threads), "--no-progress", "--out", str(out / self.name),
                *self.options]


# The budgets were sized from the throughput of `tiny` at 64x64 RGB, batch 32, one thread on the
# 2-core AMD EPYC of December 2026 (about 27 img/s alone, about 25 img/s with two runs side by
# side): 15 kimg is about 10 minutes, 90 kimg about an hour. A short budget wants a short
# learning-rate ramp-up and an EMA half-life of about a tenth of the run (the defaults, 10 and
# 50 kimg, are sized for runs of hundreds of kimg).
_COMMON = ("--preset", "tiny", "--loss", "edm", "--cond", "--label-dropout", "0.1",
           "--batch", "32", "--lr", "1e-3")
# `small` (1.8M parameters, about 6 img/s) gets 21 kimg in the same hour: the bigger net against
# more images.
_SMALL = tuple("small" if option == "tiny" else option for option in _COMMON)
RECIPES = (
    Recipe("10min", 15, _COMMON + ("--lr-rampup-kimg", "1", "--ema-kimg", "1.5"), (15,)),
    Recipe("1hour", 90, _COMMON + ("--lr-rampup-kimg", "2", "--ema-kimg", "8"), (60, 90),
           ckpt_every=15),  # a run keeps its last 3 checkpoints: 60, 75 and 90 kimg
    Recipe("1hour-small", 21, _SMALL + ("--lr-rampup-kimg", "1", "--ema-kimg", "2"), (21,)),
)
QUICK = (
    Recipe("10min", 0.32, _COMMON + ("--lr-rampup-kimg", "0.1", "--ema-kimg", "0.05"), (0.32,)),
    Recipe("1hour", 0.64, _COMMON + ("--lr-rampup-kimg", "0.1", "--ema-kimg", "0.1"), (0.32, 0.64),
           ckpt_every=0.32),
)


def _train(recipe: Recipe, data: str, out: Path, threads: int) -> float:
    """Run (or reuse) one recipe; its training wall time in seconds."""
    record = out / recipe.name / "recipe_time.json"
    if record.exists():
        return json.loads(record.read_text())["seconds"]
    command = recipe.command(data, out, threads)
    print("$ OMP_NUM_THREADS=%d %s" % (threads, " ".join(command)), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": seconds, "command": command, "threads": threads}))
    return seconds


def _checkpoint_at(run: Path, kimg: float, batch: int) -> Path:
    """The checkpoint of `run` at `kimg` thousand images (within one batch)."""
    def images(path: Path) -> int:
        return int(path.stem.split("-")[-1]) * batch
    kept = list_checkpoints(run)
    found = [path for path in kept if abs(images(path) - 1000 * kimg) <= batch]
    if not found:
        sys.exit(f"error: {run} has no checkpoint at {kimg:g} kimg (it keeps "
                 f"{', '.join(p.name for p in kept)})")
    return found[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="labelled image folder (label/file.jpg)")
    parser.add_argument("--out", required=True, help="folder for the runs and the report")
    parser.add_argument("--jobs", type=int, default=1, help="recipes trained side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--nfe", type=int, default=35, help="Heun evaluations (2 steps - 1)")
    parser.add_argument("--samples", type=int, default=90, help="samples per seed set")
    parser.add_argument("--repeats", type=int, default=4, help="disjoint seed sets per row")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: a few hundred images of training, 24 samples x 2")
    parser.add_argument("--recipes", default=None,
                        help="comma list of the recipes to train and score (default: all: " +
                        ", ".join(r.name for r in RECIPES) + ")")
    args = parser.parse_args(argv)
    recipes = QUICK if args.quick else RECIPES
    if args.recipes:
        names = args.recipes.split(",")
        unknown = set(names) - {r.name for r in recipes}
        if unknown:
            parser.error(f"unknown recipe(s) {sorted(unknown)}")
        recipes = tuple(r for r in recipes if r.name in names)
    if args.quick:
        args.samples, args.repeats, args.nfe = 24, 2, 7
    torch.set_num_threads(args.threads * args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        walls = dict(zip([r.name for r in recipes],
                         pool.map(lambda r: _train(r, args.data, out, args.threads), recipes)))

    dataset = load_dataset(args.data, resolution=64)
    scorer = LabelledDataScorer.for_dataset(dataset, steps=400)
    models, minutes = {}, {}
    for recipe in recipes:
        for kimg in recipe.score_kimg:
            label = f"{recipe.name} @ {kimg:g} kimg"
            models[label] = load_denoiser_checkpoint(_checkpoint_at(out / recipe.name, kimg, 32))
            minutes[label] = walls[recipe.name] / 60 * kimg / recipe.kimg
    specs = [spec for label in models for spec in runs_for(label, "edm_heun", [args.nfe])]
    rows = compare(models, specs, scorer, samples=args.samples, repeats=args.repeats,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    reference = reference_row(scorer, samples=args.samples, repeats=args.repeats)

    classes = dataset.num_classes
    seeds = list(range(8 * classes))
    labels = torch.tensor([s // 8 for s in seeds])
    for label, denoiser in models.items():
        x = sample_at_nfe(denoiser, "edm_heun", args.nfe, seeds, scorer.shape, class_labels=labels)
        name = label.replace(" @ ", "_").replace(" ", "")
        save_grid(x.clamp(-1, 1), out / f"recipe_{name}.png", nrow=8)
    real = torch.stack([scorer.real[scorer.real_labels == c][:8] for c in range(classes)])
    save_grid(real.flatten(0, 1), out / "real_images.png", nrow=8)

    header = (f"# {args.data}: {len(dataset)} images, {classes} classes "
              f"({', '.join(dataset.class_names)}), 64x64 RGB\n\n"
              f"Heun at {args.nfe} NFE, {args.repeats} x {args.samples} samples per row; "
              f"scoring classifier's held-out accuracy {scorer.holdout_accuracy:.3f}. "
              "Training minutes (measured for each run's last checkpoint, pro rata for the "
              "earlier ones): " +
              ", ".join(f"{label} {m:.1f} min" for label, m in minutes.items()) + ".\n\n")
    table = format_table(rows, scorer, reference=reference)
    (out / "recipe_table.md").write_text(header + table + "\n")
    (out / "recipe_results.json").write_text(json.dumps(
        {"options": vars(args), "wall_seconds": walls, "minutes": minutes,
         "recipes": {r.name: r.command(args.data, out, args.threads) for r in recipes},
         "holdout_accuracy": scorer.holdout_accuracy, "reference": reference,
         "rows": [row.to_json() for row in rows]}, indent=2))
    if not args.quick:
        append_results("Own pictures at 64x64: what a CPU learns in 10 minutes and an hour",
                       header.split("\n", 1)[1] + table,
                       command_line("python bench/own_pictures_recipe.py " + " ".join(
                           sys.argv[1:] if argv is None else argv), ("OMP_",)))
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
