"""``edm-fast metrics``: FID, FD_DINOv2 and precision/recall of generated images, offline.

Examples:
    edm-fast metrics --images samples/ --ref cifar10-32x32.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth
    edm-fast metrics --images samples.npz --ref real/ --metrics fid,fd_dinov2,pr \\
        --inception-weights pt_inception.pth --dinov2-weights dinov2_vitl14_pretrain.pth
    edm-fast metrics --ref real/ --write-ref real-stats.npz --metrics fid,pr \\
        --inception-weights pt_inception.pth

--images and a folder --ref are a folder of images (searched recursively) or an .npz of samples
('samples' as edm-fast sample writes, or 'arr_0' uint8 NHWC). A --ref file holds reference
statistics: an .npz in NVlabs/edm's format ('mu', 'sigma' of Inception features) or NVlabs/edm2's
.pkl (FID and FD_DINOv2; read without running code), as NVlabs publishes them for its data sets;
--write-ref saves those of a folder --ref (with FD_DINOv2's and the features precision/recall
needs when those metrics are asked for). The feature networks load from weight files you
supply: pytorch-fid's pt_inception-2015-12-05-6726825d.pth and DINOv2's
dinov2_vitl14_pretrain.pth (state dicts, or the same keys as .safetensors); see docs/METRICS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["METRICS", "add_metrics_command", "cmd_metrics"]

METRICS = ("fid", "fd_dinov2", "pr")


def add_metrics_command(sub, formatter) -> None:
    """Register ``metrics`` on the subparsers ``sub`` (argparse) with help ``formatter``."""
    p = sub.add_parser("metrics", formatter_class=formatter, description=__doc__,
                       help="FID, FD_DINOv2, precision/recall from weight files you supply")
    p.add_argument("--images", default=None, metavar="DIR|NPZ",
                   help="generated images: a folder or an .npz of samples")
    p.add_argument("--ref", required=True, metavar="NPZ|PKL|DIR",
                   help="reference: statistics (NVlabs/edm .npz, NVlabs/edm2 .pkl) or a folder "
                   "of real images")
    p.add_argument("--metrics", default="fid", metavar="LIST",
                   help=f"comma-separated, of {', '.join(METRICS)}")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (for fid and pr)")
    p.add_argument("--dinov2-weights", default=None, metavar="PATH",
                   help="DINOv2's dinov2_vitl14_pretrain.pth (for fd_dinov2)")
    p.add_argument("--write-ref", default=None, metavar="OUT.npz",
                   help="save the statistics of a folder --ref to this .npz")
    p.add_argument("--k", type=int, default=3,
                   help="k of precision/recall's k-th nearest neighbour radii, as in the paper")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_metrics)


def _parse_metrics(text: str) -> list[str]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics {text!r}: choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def _reference_from_stats(path: Path, metrics: list[str]) -> dict:
    from ..eval.fid import load_reference_stats

    ref = load_reference_stats(path)
    needs = {"fid": "mu", "fd_dinov2": "dinov2_mu", "pr": "inception_features"}
    for metric in metrics:
        if needs[metric] not in ref:
            hint = (" (NVlabs' files hold statistics only): give --ref a folder of real images"
                    if metric == "pr" else ": give --ref a folder of real images, or a file "
                    "written by --write-ref with this metric")
            raise ValueError(f"{path} has no '{needs[metric]}' for {metric}{hint}")
    if "pr" in metrics and ref["inception_features"].ndim != 2:
        raise ValueError(f"{path}: 'inception_features' must be (N, 2048)")
    return ref


def _reference_from_images(folder: Path, metrics: list[str], nets: dict, args) -> dict:
    from ..eval.fid import feature_statistics

    features = _features(folder, nets, args)
    ref = {}
    if "inception" in features:
        ref["mu"], ref["sigma"] = feature_statistics(features["inception"])
        if "pr" in metrics:
            ref["inception_features"] = features["inception"].float().numpy()
    if "dinov2" in features:
        ref["dinov2_mu"], ref["dinov2_sigma"] = feature_statistics(features["dinov2"])
    return ref


def _features(source: Path, nets: dict, args) -> dict:
    from ..eval.metric_images import compute_features

    features = compute_features(source, nets, batch=args.batch, device=args.resolved_device,
                                progress=sys.stderr.isatty())
    n = len(next(iter(features.values())))
    if n < 2:
        raise ValueError(f"{source}: {n} image; the statistics need at least 2")
    print(f"edm-fast metrics: {n} images in {source}", file=sys.stderr)
    return features


def cmd_metrics(args) -> int:
    import torch

    from ..device import resolve_device
    from ..eval.feature_nets import load_dinov2, load_inception
    from ..eval.fid import frechet_distance_to_stats, precision_recall, save_reference_stats

    metrics = _parse_metrics(args.metrics)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    ref_path = Path(args.ref)
    if not ref_path.exists():
        raise FileNotFoundError(f"--ref {ref_path}: no such file or folder")
    if args.images is None and args.write_ref is None:
        raise ValueError("give --images to score, or --write-ref to save the statistics of --ref")
    if args.images is not None and not Path(args.images).exists():
        raise FileNotFoundError(f"--images {args.images}: no such file or folder")
    if args.write_ref is not None:
        if not ref_path.is_dir():
            raise ValueError("--write-ref saves the statistics of a folder of images: give "
                             "--ref a folder")
        if Path(args.write_ref).suffix != ".npz":
            raise ValueError(f"--write-ref {args.write_ref}: the statistics file is an .npz")
    ref = None if ref_path.is_dir() else _reference_from_stats(ref_path, metrics)

    args.resolved_device = resolve_device(args.device)
    nets = {}
    if "fid" in metrics or "pr" in metrics:
        nets["inception"] = load_inception(args.inception_weights, args.resolved_device)
    if "fd_dinov2" in metrics:
        nets["dinov2"] = load_dinov2(args.dinov2_weights, args.resolved_device)

    with torch.inference_mode():
        if ref is None:
            ref = _reference_from_images(ref_path, metrics, nets, args)
            if args.write_ref is not None:
                path = save_reference_stats(args.write_ref, **ref)
                print(f"reference statistics of {ref_path} -> {path}")
        if args.images is None:
            return 0
        features = _features(Path(args.images), nets, args)

    if "fid" in metrics:
        value = frechet_distance_to_stats(features["inception"], ref["mu"], ref["sigma"])
        print(f"fid {value:.4f}")
    if "fd_dinov2" in metrics:
        value = frechet_distance_to_stats(features["dinov2"], ref["dinov2_mu"],
                                          ref["dinov2_sigma"])
        print(f"fd_dinov2 {value:.4f}")
    if "pr" in metrics:
        device = args.resolved_device  # float64 distances: MPS has no float64, use the CPU
        precision, recall = precision_recall(torch.from_numpy(ref["inception_features"]),
                                             features["inception"], k=args.k,
                                             device="cpu" if device.type == "mps" else device)
        print(f"precision {precision:.4f}")
        print(f"recall {recall:.4f}")
    return 0
