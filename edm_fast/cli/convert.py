"""``edm-fast convert``: an official NVlabs/edm snapshot (or an edm-fast training checkpoint) to
an edm-fast inference checkpoint: safetensors with the EMA weights as ``ema.*`` and the config
(network, preconditioning, sample shape) as metadata, which ``edm-fast sample --ckpt`` loads.

Examples:
    edm-fast convert edm-cifar10-32x32-cond-vp.pkl --out cifar10-cond-vp.safetensors
    edm-fast convert edm-imagenet-64x64-cond-adm.pkl --out imagenet64.safetensors --dtype float16
    edm-fast convert runs/edm/ --out digits.safetensors        # latest checkpoint of a run

--out must end in .safetensors (it is not added); missing parent folders are created. The
bundled models ('default', 'default-ddpm') are already edm-fast checkpoints: copy one, e.g. in
float16, with `edm-fast export --ckpt default --format safetensors --out FILE.safetensors`.
"""

from __future__ import annotations

__all__ = ["add_convert_command", "cmd_convert"]

OFFICIAL_SUFFIXES = (".pkl", ".pt")  # network-snapshot-*.pkl, edm-*.pkl, training-state-*.pt


def add_convert_command(sub, formatter) -> None:
    """Register ``convert`` on the subparsers ``sub`` (argparse) with help ``formatter``."""
    p = sub.add_parser(
        "convert", formatter_class=formatter, help="convert an official EDM snapshot to an "
        "edm-fast checkpoint", description=__doc__)
    p.add_argument("src", metavar="SRC",
                   help="official .pkl snapshot or training-state-*.pt (read without running "
                   "its code), or an edm-fast .safetensors checkpoint or run folder")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="the inference checkpoint to write; must end in .safetensors (not "
                   "added for you); missing parent folders are created")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="store floating-point weights in this dtype (default: as in SRC); "
                   "they are loaded back into float32 networks")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    """Write ``args.out`` from ``args.src`` and print what it holds."""
    from pathlib import Path

    import torch

    from ..io.checkpoints import export_inference_checkpoint, read_checkpoint
    from .export import check_out_file
    from ..io.official import convert_official

    src = Path(args.src)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    _check_src(src)
    out = check_out_file(args.out, (".safetensors",), "convert writes")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is SRC itself; write the converted checkpoint elsewhere")
    # both check SRC completely (config, network size, weights: keys, shapes, dtypes, finite)
    # before writing anything, and write atomically
    if src.suffix in OFFICIAL_SUFFIXES:
        path = convert_official(src, args.out, dtype=dtype)
    else:
        path = export_inference_checkpoint(src, args.out, dtype=dtype)
    tensors, meta = read_checkpoint(path, prefixes=("ema.",))
    count = sum(t.numel() for t in tensors.values())
    precond = meta["precond"] if isinstance(meta["precond"], str) else meta["precond"]["name"]
    shape = meta.get("sample_shape")
    print(f"{src} -> {path}: {meta['net']['arch']} network ({len(tensors)} tensors, {count:,} "
          f"values), {precond} preconditioning, samples "
          f"{tuple(shape) if shape else '(shape not recorded)'}")
    return 0


def _check_src(src) -> None:
    """A clear error for a SRC that is not there or is an exported model, before anything is
    read or written."""
    from ..io.models import BUNDLED, TOYS, exported_format

    name = str(src)
    what = ("convert reads an official NVlabs snapshot (.pkl), a training-state-*.pt, or an "
            "edm-fast .safetensors checkpoint or run folder")
    if exported_format(src):
        raise ValueError(f"{src} is an exported {exported_format(src)} model, which cannot be "
                         f"converted back; {what}")
    if src.exists():
        return
    if name in BUNDLED:
        raise ValueError(f"{name!r} is a bundled model, already an edm-fast .safetensors "
                         f"checkpoint; {what}. To copy it (in float16 with --dtype float16), "
                         f"run `edm-fast export --ckpt {name} --format safetensors --out "
                         "FILE.safetensors`")
    if name in TOYS:
        raise ValueError(f"{name!r} is an analytic toy model with no weights to convert; {what}")
    raise FileNotFoundError(f"no file or folder at {src}; {what}")
