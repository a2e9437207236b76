"""``edm-fast phema``: post-hoc EMA reconstruction (Karras et al. 2024, Sec. 3, Alg. 3).

Examples:
    edm-fast phema --ckpt runs/edm2 --sigma-rel 0.05,0.1 --out phema/
    edm-fast phema --ckpt raw-snapshots/edm2-img512-xs --sigma-rel 0.135 --out xs-0.135.safetensors
    edm-fast phema --ckpt runs/edm2 --sigma-rel 0.01,0.02,...,0.25 --kimg 2048 --out sweep/
    edm-fast phema --ckpt runs/edm2 --sigma-rel 0.05,0.1,0.15,0.2 --out sweep/ --sweep

--ckpt is a folder of power-EMA snapshots: an edm-fast run's phema-NIMG-SIGMA.safetensors, or
NVlabs' raw EDM2 snapshots PREFIX-KIMG-SIGMA.pkl (read without running their code). Each
reconstruction is written as an edm-fast inference checkpoint: --out FOLDER gets
phema-NIMG-SIGMA.safetensors per value, --out FILE.safetensors takes a single value. Every
sigma_rel lies in (0, 0.2887); 'a,b,...,c' is an evenly spaced range, as in NVlabs'
reconstruct_phema.py.

--sweep then scores every reconstruction (edm_fast.eval.phema_sweep: Heun at --sweep-nfe,
--sweep-repeats seed sets of --sweep-samples, the digits classifier's feature FD and accuracy;
runs on the bundled digits data only) and names the sigma_rel of lowest FD.
"""

from __future__ import annotations

__all__ = ["add_phema_command", "cmd_phema"]


def add_phema_command(sub, formatter) -> None:
    """Register ``phema`` on the subparsers ``sub`` (argparse) with help ``formatter``."""
    p = sub.add_parser("phema", formatter_class=formatter, description=__doc__,
                       help="reconstruct any EMA length after training (post-hoc EMA)")
    p.add_argument("--ckpt", required=True, metavar="RUN",
                   help="folder of power-EMA snapshots (an edm-fast run or NVlabs' raw EDM2 "
                   "snapshots)")
    p.add_argument("--sigma-rel", required=True, metavar="LIST",
                   help="EMA lengths to reconstruct, e.g. 0.05,0.1 or 0.01,0.02,...,0.25")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="a folder (one checkpoint per value), or FILE.safetensors for one value")
    p.add_argument("--kimg", type=int, default=None, metavar="KIMG",
                   help="training time of the reconstruction: the latest snapshot within this "
                   "kimg (default: the latest snapshot)")
    p.add_argument("--in-sigma-rel", default=None, metavar="LIST",
                   help="use only the snapshots of these tracked sigma_rel (default: all)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the written weights (the reconstruction runs in float32)")
    p.add_argument("--sweep", action="store_true",
                   help="score each reconstruction on the digits (feature FD, accuracy) and name "
                   "the best sigma_rel (digits runs only)")
    p.add_argument("--sweep-samples", type=int, default=200, metavar="N",
                   help="samples per seed set of --sweep")
    p.add_argument("--sweep-repeats", type=int, default=2, metavar="R",
                   help="disjoint seed sets of --sweep (mean +- SE over them)")
    p.add_argument("--sweep-nfe", type=int, default=35, metavar="NFE",
                   help="Heun evaluations per sample in --sweep (odd: 2 steps - 1)")
    p.set_defaults(func=cmd_phema)


def cmd_phema(args) -> int:
    import torch

    from ..train.phema import parse_sigma_rels
    from ..train.phema_snapshots import kimg_to_nimg, list_snapshots, reconstruct_snapshots

    sigma_rels = parse_sigma_rels(args.sigma_rel)
    if args.sweep and (args.sweep_nfe < 1 or args.sweep_nfe % 2 == 0):
        raise ValueError(f"--sweep-nfe must be odd (Heun: 2 steps - 1), got {args.sweep_nfe}")
    if args.sweep and (args.sweep_samples < 2 or args.sweep_repeats < 1):
        raise ValueError("--sweep-samples must be >= 2 and --sweep-repeats >= 1")
    in_sigma_rels = None if args.in_sigma_rel is None else parse_sigma_rels(args.in_sigma_rel)
    nimg = None
    if args.kimg is not None:
        if args.kimg < 1:
            raise ValueError(f"--kimg must be >= 1, got {args.kimg}")
        files = list_snapshots(args.ckpt, sigma_rels=in_sigma_rels)
        exact = [s.nimg for s in files if s.nimg // 1000 == args.kimg]
        nimg = max(exact) if exact else kimg_to_nimg(args.kimg)
    if args.sweep:  # refused before reconstructing, from the first snapshot's metadata
        from ..eval.phema_sweep import require_digits
        from ..io.checkpoints import read_checkpoint

        first = list_snapshots(args.ckpt, sigma_rels=in_sigma_rels)[0]  # (none: it raises)
        meta = {} if first.official else read_checkpoint(first.path, prefixes=("\0",))[1]
        require_digits((meta.get("data") or {}).get("name"))
    paths = reconstruct_snapshots(args.ckpt, sigma_rels, args.out, nimg=nimg,
                                  in_sigma_rels=in_sigma_rels, dtype=getattr(torch, args.dtype))
    for sigma_rel, path in zip(sigma_rels, paths):
        print(f"sigma_rel {sigma_rel:.3f} -> {path}")
    if args.sweep:
        import sys

        from ..eval.compare import format_score
        from ..eval.phema_sweep import sweep_sigma_rel

        def progress(line):  # one line per sigma_rel as it is scored (minutes each on a CPU)
            print(line, file=sys.stderr, flush=True)

        rows, best = sweep_sigma_rel(paths, sigma_rels, samples=args.sweep_samples,
                                     repeats=args.sweep_repeats, nfe=args.sweep_nfe,
                                     log=progress)
        for sigma_rel, row in zip(sigma_rels, rows):
            print(f"sigma_rel {sigma_rel:.3f}: FD {format_score(*row.stat('fd'))}, accuracy "
                  f"{format_score(*row.stat('acc'))}")
        print(f"best sigma_rel (lowest FD): {best:.3f} -> {paths[sigma_rels.index(best)]}")
    return 0
