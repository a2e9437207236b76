"""Autoguidance with EDM2 nets and tuned post-hoc EMA lengths on the digits.

    python bench/autoguidance_ema_digits.py --main-run runs/edm2-vs-edm/edm2 --out runs/agema
    python bench/autoguidance_ema_digits.py --main-run RUN --out runs/agema --interval 0.28,5.42
    python bench/autoguidance_ema_digits.py --main-run RUN --quick --out /tmp/agema   # smoke test

Autoguidance (Karras et al. 2024, arXiv 2406.02507, Eq. 1: D_g + w (D - D_g)) guides the main
net with a smaller, shorter-trained version of itself; the paper's gains came with both nets'
EMA lengths tuned by post-hoc EMA (EDM2, arXiv 2312.02696, App. C, Alg. 3). The main net is an
EDM2 run given by --main-run (``tiny-edm2``, class-conditional digits, with power-EMA snapshots,
e.g. the edm2/ run of bench/edm2_vs_edm_digits.py). The guide is trained here on the same data:
``tiny-edm2`` with --guide-channels base channels (8: about a quarter of the main net's
parameters, as the paper guides EDM2-S with XS) for --guide-kimg at batch 128, seed
--guide-seed, the EDM2 recipe (no label dropout: EDM2 nets have none), snapshots every
guide-kimg / 16. A guide run already in --out is continued or reused (resume), so a second call
only reconstructs and re-scores. Both runs' snapshots are reconstructed at the EMA lengths of
--main-sigma-rel and --guide-sigma-rel (``reconstruct_snapshots``, Alg. 3 of the EDM2 paper),
at each run's latest snapshot.

Every row samples with ``edm_fast.sampling.Sampler`` (Heun, EDM Alg. 1 without churn, at --nfe
evaluations, the EDM sigma grid of Eq. 5): the main net unguided at each main sigma_rel; the
guide alone at each guide sigma_rel (to show how much weaker it is); autoguidance for every
(main sigma_rel, guide sigma_rel, w in --weights), and with --interval also autoguidance applied
only for sigma inside [lo, hi] (Kynkaanniemi et al. 2024). Guided rows also evaluate the guide
at every step, so they cost an unguided row plus a guide-alone row.

Scores (edm_fast.eval.compare.DigitsScorer): feature-space FD to the real digits (a digits
classifier's features, not Inception-FID) and the classifier accuracy of class-conditional
samples (label = seed mod 10), mean +- standard error over --repeats disjoint seed sets of
--samples seeds each. Every row uses the same seeds, so differences are paired (mean +- SE of
per-seed-set differences): each guided row against the unguided row of the same main
sigma_rel, and the best guided row against the best unguided row (best: lowest mean FD).

Outputs in --out: guide-<kimg>kimg-<channels>ch-seed<seed>/ (the guide run), phema-main/ and
phema-guide/ (the reconstructions), autoguidance_ema_table.md and autoguidance_ema_results.json
(the rows with per-seed-set scores and their EMA lengths and weights, the paired differences,
the best rows, the options, the guide's training time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from edm_fast.errors import EdmFastError
from edm_fast.eval.compare import (
    DigitsScorer,
    format_score,
    format_table,
    paired_difference,
    reference_row,
    strict_json,
)
from edm_fast.io.checkpoints import (
    CheckpointError,
    build_net_from_spec,
    latest_checkpoint,
    net_spec,
    read_checkpoint,
)
from edm_fast.io.models import load_denoiser
from edm_fast.sampling.sampler import Sampler
from edm_fast.train.loop import TrainConfig, train
from edm_fast.train.phema import parse_sigma_rels
from edm_fast.train.phema_snapshots import list_snapshots, reconstruct_snapshots

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoguidance_digits import difference_table, parse_floats, score_sampler

PRESET = "tiny-edm2"
GUIDE_BATCH = 128
DIGITS_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: which net(s), at which EMA lengths, with which guidance."""

    name: str
    kind: str                        # "unguided" | "guide alone" | "autoguidance"
    main_sigma_rel: float | None
    guide_sigma_rel: float | None
    weight: float | None = None
    interval: tuple[float, float] | None = None


def main_run_config(run: Path) -> dict:
    """The checkpoint metadata of the latest snapshot of the EDM2 run ``run``; EdmFastError
    when it has no snapshots or is not a class-conditional digits run of an EDM2 net."""
    try:
        snapshots = list_snapshots(run)
    except (FileNotFoundError, EdmFastError) as exc:
        raise EdmFastError(f"--main-run: {exc}; the main net must be an EDM2 run with "
                           f"snapshots ({PRESET}, snapshot_every_kimg > 0)") from None
    try:
        _, meta = read_checkpoint(snapshots[-1].path, prefixes=("\0",))  # the metadata only
    except CheckpointError as exc:
        raise EdmFastError(f"--main-run {run}: {exc}") from None
    net, data = meta.get("net") or {}, meta.get("data") or {}
    label_dim = (net.get("kwargs") or {}).get("label_dim")
    if net.get("arch") != "edm2":
        raise EdmFastError(f"--main-run {run} holds a {net.get('arch')!r} net; this measures "
                           "EDM2 nets")
    if data.get("name") != "digits" or label_dim != DIGITS_CLASSES:
        raise EdmFastError(f"--main-run {run} is not a class-conditional digits run (data "
                           f"{data.get('spec')!r}, label_dim {label_dim})")
    return meta


def param_count(spec: dict) -> int:
    """Parameters of the net a checkpoint's ``net`` spec describes, counted before baking
    (a baked EDM2 net holds its weights as buffers)."""
    return sum(p.numel() for p in build_net_from_spec(spec).parameters())


def guide_spec(channels: int, resolution: int) -> dict:
    """The guide's net: ``PRESET`` with ``channels`` base channels; ValueError when the preset
    cannot take that many (its attention heads are 16 channels wide)."""
    spec = net_spec(PRESET, img_resolution=resolution, img_channels=1,
                    label_dim=DIGITS_CLASSES, model_channels=channels)
    build_net_from_spec(spec)  # the constructor checks the channel counts
    return spec


def train_guide(out: Path, data: str, kimg: float, seed: int, channels: int) -> tuple[float, dict]:
    """Train (or continue, or reuse) the guide: ``PRESET`` with ``channels`` base channels, the
    EDM2 recipe, class-conditional, ``kimg`` at batch GUIDE_BATCH, power-EMA snapshots every
    kimg / 16; (wall seconds of this call, training summary)."""
    cfg = TrainConfig(out=str(out), data=data, preset=PRESET, cond=True, batch=GUIDE_BATCH,
                      kimg=kimg, seed=seed, progress=False, sample_every_kimg=0,
                      ckpt_every_kimg=max(kimg / 4, 1), snapshot_every_kimg=kimg / 16,
                      log_every=10, net_overrides={"model_channels": channels})
    start = time.perf_counter()
    summary = train(cfg, resume=latest_checkpoint(cfg.out) is not None)
    seconds = time.perf_counter() - start
    print(f"[guide {kimg:g} kimg, {channels} channels] {summary['steps']} steps, final loss "
          f"{summary['final_loss']}, {seconds:.0f} s", file=sys.stderr, flush=True)
    return seconds, summary


def reconstruct(run: Path, sigma_rels: list[float], out: Path) -> dict[float, torch.nn.Module]:
    """The run's post-hoc EMA at each sigma_rel (EDM2 Alg. 3), at its latest snapshot, written
    into ``out`` and loaded for inference (weight normalisation baked once, which the ONNX
    export needs)."""
    paths = reconstruct_snapshots(run, sigma_rels, out)
    return {s: load_denoiser(path) for s, path in zip(sigma_rels, paths)}


def make_variants(main_srs, guide_srs, weights, interval) -> list[Variant]:
    """Unguided rows, guide-alone rows, then autoguidance (and interval) rows per main
    sigma_rel, guide sigma_rel and weight."""
    variants = [Variant(f"main sigma_rel {m:.3f}, unguided", "unguided", m, None)
                for m in main_srs]
    variants += [Variant(f"guide sigma_rel {g:.3f} alone", "guide alone", None, g)
                 for g in guide_srs]
    for m in main_srs:
        for g in guide_srs:
            for w in weights:
                name = f"main {m:.3f} / guide {g:.3f}, w={w:g}"
                variants.append(Variant(name, "autoguidance", m, g, w))
                if interval is not None:
                    variants.append(Variant(f"{name}, sigma in [{interval[0]:g}, {interval[1]:g}]",
                                            "autoguidance", m, g, w, interval))
    return variants


def sampler_for(variant: Variant, mains: dict, guides: dict, common: dict,
                onnx_dir: Path | None) -> Sampler:
    """The row's Sampler. With the onnx backend, each net's export in ``onnx_dir`` (this call's
    own temporary folder, so a file there is always this call's export of that net) is reused
    by the later rows of the same main net; the backend exports a guide afresh every time."""
    if variant.kind == "guide alone":
        model, key, guided = guides[variant.guide_sigma_rel], f"guide-{variant.guide_sigma_rel}", {}
    else:
        model, key = mains[variant.main_sigma_rel], f"main-{variant.main_sigma_rel}"
        guided = ({} if variant.kind == "unguided" else
                  dict(guide=guides[variant.guide_sigma_rel], guidance=variant.weight,
                       guidance_interval=variant.interval))
    if onnx_dir is not None:
        options = {**common["backend_options"], "model_path": onnx_dir / f"{key}.onnx",
                   "reuse_model": True}
        common = {**common, "backend_options": options}
    return Sampler(model, **common, **guided)


def best(rows, variants, kind: str):
    """(row, variant) of ``kind`` with the lowest mean FD."""
    pairs = [(r, v) for r, v in zip(rows, variants) if v.kind == kind]
    return min(pairs, key=lambda pair: pair[0].stat("fd")[0])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--main-run", required=True,
                   help=f"the main net: an EDM2 run folder ({PRESET}, class-conditional "
                        "digits) with power-EMA snapshots")
    p.add_argument("--out", required=True, help="folder for the guide run and the report")
    p.add_argument("--main-sigma-rel", default="0.05,0.1,0.15",
                   help="post-hoc EMA lengths of the main net")
    p.add_argument("--guide-sigma-rel", default="0.05,0.1,0.2",
                   help="post-hoc EMA lengths of the guide")
    p.add_argument("--guide-kimg", type=float, default=32.0, help="training length of the guide")
    p.add_argument("--guide-seed", type=int, default=1, help="the guide run's seed")
    p.add_argument("--guide-channels", type=int, default=8,
                   help=f"base channels of the guide's {PRESET} (the main net's has 16; 8 gives "
                        "about a quarter of its parameters)")
    p.add_argument("--weights", default="1.2,1.5,2", help="autoguidance weights w (1: none)")
    p.add_argument("--interval", default="",
                   help="'lo,hi': also autoguidance applied only for sigma in [lo, hi] "
                        "('' leaves these rows out)")
    p.add_argument("--nfe", type=int, default=35, help="Heun evaluations (2 steps - 1), odd")
    p.add_argument("--samples", type=int, default=400, help="samples per seed set")
    p.add_argument("--repeats", type=int, default=4, help="disjoint seed sets per row")
    p.add_argument("--sample-batch", type=int, default=200, help="samples per sampler call")
    p.add_argument("--backend", default="onnx",
                   help="Sampler backend for every row: onnx (the fastest CPU backend here) or "
                        "reference, compiled, auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a 1-kimg guide, 60 samples x 2, NFE 7, w = 1.5, the first "
                        "sigma_rel of each list")
    args = p.parse_args(argv)
    try:
        args.main_srs = parse_sigma_rels(args.main_sigma_rel)
        args.guide_srs = parse_sigma_rels(args.guide_sigma_rel)
        args.weight_list = parse_floats(args.weights)
        args.interval_pair = tuple(parse_floats(args.interval)) or None
    except (EdmFastError, ValueError) as exc:
        p.error(str(exc))
    if args.quick:
        args.guide_kimg, args.samples, args.repeats, args.nfe = 1.0, 60, 2, 7
        args.weight_list = [1.5]
        args.main_srs, args.guide_srs = args.main_srs[:1], args.guide_srs[:1]
    if not args.weight_list:
        p.error("--weights is empty; give at least one w")
    if args.nfe < 1 or args.nfe % 2 == 0:
        p.error(f"--nfe must be odd (Heun: 2 steps - 1), got {args.nfe}")
    if args.interval_pair is not None and len(args.interval_pair) != 2:
        p.error(f"--interval takes 'lo,hi', got {args.interval!r}")
    if not args.guide_kimg > 0:
        p.error(f"--guide-kimg must be > 0, got {args.guide_kimg:g}")
    try:
        main_meta = main_run_config(Path(args.main_run))
    except EdmFastError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    args.resolution = int(main_meta["sample_shape"][-1])
    try:
        args.guide_params = param_count(guide_spec(args.guide_channels, args.resolution))
    except ValueError as exc:
        p.error(f"--guide-channels {args.guide_channels}: {exc} (use a multiple of 8)")
    args.data = main_meta["data"]["spec"]
    args.main_params = param_count(main_meta["net"])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    guide_dir = out / f"guide-{args.guide_kimg:g}kimg-{args.guide_channels}ch-seed{args.guide_seed}"
    scorer = DigitsScorer(resolution=args.resolution)
    scorer.check_sizes(args.samples, args.repeats)
    guide_seconds, guide_summary = train_guide(guide_dir, args.data, args.guide_kimg,
                                               args.guide_seed, args.guide_channels)
    mains = reconstruct(Path(args.main_run), args.main_srs, out / "phema-main")
    guides = reconstruct(guide_dir, args.guide_srs, out / "phema-guide")
    main_params = args.main_params
    main_kimg = list_snapshots(args.main_run)[-1].nimg / 1000

    steps = (args.nfe + 1) // 2
    common = dict(solver="heun", num_steps=steps, batch_size=args.sample_batch, device="cpu",
                  backend=args.backend)
    if args.backend == "onnx":  # (sampler_for adds where each net's export is kept)
        common["backend_options"] = {}
    variants = make_variants(args.main_srs, args.guide_srs, args.weight_list, args.interval_pair)
    with tempfile.TemporaryDirectory(prefix="agema_onnx_") as tmp:
        onnx_dir = Path(tmp) if args.backend == "onnx" else None
        rows = [score_sampler(v.name, sampler_for(v, mains, guides, common, onnx_dir), scorer,
                              args.nfe, samples=args.samples, repeats=args.repeats)
                for v in variants]
    try:
        reference = reference_row(scorer, samples=args.samples, repeats=args.repeats)
    except ValueError as exc:  # more samples than class-balanced real digits
        print(f"no real-data row: {exc}", file=sys.stderr)
        reference = None

    metrics = scorer.metrics
    unguided = {v.main_sigma_rel: r for r, v in zip(rows, variants) if v.kind == "unguided"}
    differences = {r.spec.model: {m: paired_difference(r, unguided[v.main_sigma_rel], m)
                                  for m in metrics}
                   for r, v in zip(rows, variants) if v.kind == "autoguidance"}
    best_u, best_uv = best(rows, variants, "unguided")
    best_g, best_gv = best(rows, variants, "autoguidance")
    best_difference = {m: paired_difference(best_g, best_u, m) for m in metrics}

    per_main = []
    for m, baseline in unguided.items():
        guided = [r for r, v in zip(rows, variants)
                  if v.kind == "autoguidance" and v.main_sigma_rel == m]
        per_main.append(f"Main sigma_rel {m:.3f} (baseline: {baseline.spec.model}):\n\n"
                        + difference_table(guided, baseline, metrics))
    header = (
        f"# Autoguidance with post-hoc EMA lengths, EDM2 nets, 16x16 digits\n\n"
        f"Main net: {args.main_run} ({PRESET}, {main_params:,} parameters, reconstructed at "
        f"{main_kimg:g} kimg). Guide: {PRESET} with {args.guide_channels} base channels "
        f"({args.guide_params:,} parameters), the EDM2 recipe, class-conditional, "
        f"{args.guide_kimg:g} kimg at batch {GUIDE_BATCH}, seed {args.guide_seed} "
        f"({guide_seconds:.0f} s of training in this call). Both reconstructed by post-hoc EMA "
        f"(EDM2 Alg. 3) at the sigma_rel in each row's name. Heun at {args.nfe} NFE ({steps} "
        f"steps); guided rows evaluate two networks per step. {args.repeats} x {args.samples} "
        f"samples per row, the same seeds in every row. 'w': autoguidance D_g + w (D - D_g) "
        f"(arXiv 2406.02507 Eq. 1)" + ("; 'sigma in [lo, hi]': only there"
                                       if args.interval_pair else "")
        + ". FD: feature FD of a digits classifier (not Inception-FID), lower is better; acc: "
        "that classifier's accuracy on the conditional samples.\n\n")
    note = scorer.bias_note(args.samples, args.repeats)
    summary = (
        f"Best unguided: main sigma_rel {best_uv.main_sigma_rel:.3f}, FD "
        f"{format_score(*best_u.stat('fd'))}, acc {format_score(*best_u.stat('acc'))}.\n"
        f"Best autoguided: main sigma_rel {best_gv.main_sigma_rel:.3f}, guide sigma_rel "
        f"{best_gv.guide_sigma_rel:.3f}, w={best_gv.weight:g}"
        + (f", sigma in [{best_gv.interval[0]:g}, {best_gv.interval[1]:g}]"
           if best_gv.interval else "")
        + f", FD {format_score(*best_g.stat('fd'))}, acc {format_score(*best_g.stat('acc'))}.\n"
        f"Best autoguided - best unguided (paired): FD "
        f"{format_score(*best_difference['fd'])}, acc {format_score(*best_difference['acc'])} "
        "(negative FD and positive acc are improvements).\n")
    body = (format_table(rows, scorer, reference=reference)
            + "\nPaired differences of each guided row to the unguided row of the same main "
              "sigma_rel (mean +- SE over the seed sets; negative FD and positive acc are "
              "improvements):\n\n" + "\n".join(per_main)
            + "\nThe best guided row (lowest FD) against the best unguided row:\n\n"
            + difference_table([best_g], best_u, metrics) + "\n" + summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoguidance_ema_table.md").write_text(
        header + (f"{note}\n\n" if note else "") + body)

    options = {k: v for k, v in vars(args).items()}
    results = {
        "options": options, "main_params": main_params, "main_kimg": main_kimg,
        "guide_params": args.guide_params, "guide_train_seconds": guide_seconds,
        "guide_summary": guide_summary, "reference": reference,
        "rows": [{**dataclasses.asdict(v), **r.to_json()} for r, v in zip(rows, variants)],
        "paired_differences": differences,
        "best": {"unguided": best_u.spec.model, "autoguided": best_g.spec.model,
                 "difference": best_difference}}
    (out / "autoguidance_ema_results.json").write_text(json.dumps(strict_json(results),
                                                                  indent=2))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
