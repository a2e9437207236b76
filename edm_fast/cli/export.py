"""``edm-fast export``: write a model for deployment (ONNX, AOTInductor, TorchScript, safetensors).

Examples:
    edm-fast export --format onnx --out digits.onnx             # bundled model, dynamic batch
    edm-fast export --ckpt run/ --format onnx --dtype float16 --out d16.onnx
    edm-fast export --format aoti --batch 16 --out digits.pt2         # static batch of 16
    edm-fast export --format torchscript --out digits.ts
    edm-fast export --format aoti --dtype bf16 --out digits-bf16.pt2  # network in bfloat16
    edm-fast export --format openvino --out ir/digits.xml              # + ir/digits.bin
    edm-fast export --ckpt run/ --format safetensors --dtype float16 --out digits.safetensors

onnx, aoti and torchscript export the preconditioned denoiser D(x; sigma, class_labels) (EDM
Eq. 7) with float32 inputs and outputs; ``--dtype float16`` (onnx, aoti, torchscript) or
``bfloat16`` (aoti, torchscript) runs the network inside in that precision. openvino writes an
IR (.xml and the .bin of its weights beside it) converted from the ONNX export, in float32: the
precision it runs in is chosen when it is loaded (``--net-dtype``, docs/PRECISION.md).
safetensors writes the EMA weights and config
(``checkpoints.export_inference_checkpoint``) with the weights in ``--dtype``.

--out must end in the suffix of --format (none is added): .onnx, .xml (openvino), .pt2 (aoti),
.ts or
.torchscript (torchscript: the suffixes `edm-fast sample` knows as TorchScript; a .pt file is
read as an NVlabs training state), .safetensors. Missing parent folders are created; an existing
folder or an unwritable location is refused before the model is loaded.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .sampling_options import add_model_option

__all__ = ["SUFFIXES", "add_export_command", "check_out_file"]

FORMATS = ("onnx", "openvino", "aoti", "torchscript", "safetensors")
# The suffixes --out may end in, per format: those the loaders tell the formats apart by
# (models.EXPORT_SUFFIXES, the C++ loader's '.pt2' -> AOTInductor). The first one is suggested.
SUFFIXES = {"onnx": (".onnx",), "openvino": (".xml",), "aoti": (".pt2",),
            "torchscript": (".ts", ".torchscript"),
            "safetensors": (".safetensors",)}


def add_export_command(sub, formatter) -> None:
    """Register ``export`` on the subparsers ``sub`` (``formatter``: the help formatter class)."""
    p = sub.add_parser(
        "export", formatter_class=formatter, help="export a model for deployment",
        description=__doc__)
    add_model_option(p, "checkpoint, run folder or bundled model name ('default')")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="output format")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output file, ending in the suffix of --format (not added for you): "
                   ".onnx, .xml (openvino), .pt2 (aoti), .ts or .torchscript (torchscript), "
                   ".safetensors; "
                   "missing parent folders are created")
    p.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset (onnx only)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], type=_dtype_name,
                   default="float32", help="dtype of the network's weights and activations "
                   "(also fp32, fp16, bf16; bfloat16: aoti, torchscript, safetensors; openvino: "
                   "float32, its precision is chosen at load time)")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="static batch size (None: dynamic batch; not for safetensors)")
    p.add_argument("--device", default="cpu",
                   help="device of the aoti / torchscript export (cpu, cuda, cuda:N)")
    p.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                   help="torch.onnx exporter (onnx only; see edm_fast.io.onnx_export)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare ONNX Runtime with PyTorch after the export (onnx only)")
    p.set_defaults(func=_cmd_export)


def _dtype_name(text: str) -> str:
    """--dtype in its long name ('bf16' -> 'bfloat16'), as edm_fast.precision reads it."""
    from ..precision import parse_net_dtype

    try:
        parsed = parse_net_dtype(text)
    except ValueError:
        return text  # argparse then names the choices
    return text if parsed in (None, "auto") else str(parsed).removeprefix("torch.")


def check_out_file(out, suffixes, writer: str) -> Path:
    """Raise ValueError now, before anything is loaded or exported, unless ``out`` can be
    written as a file: it ends in one of ``suffixes`` (exactly: none is added), it is not an
    existing folder or a read-only file, and its nearest existing ancestor is a writable folder
    (the missing folders in between are created when the file is written). ``writer`` says
    what writes it ("--format onnx writes").
    """
    from ..io.samples import check_writable_folder

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is an existing folder; name the file to write in it, "
                         f"e.g. {out / ('model' + suffixes[0])}")
    if out.suffix not in suffixes:
        expected = " or ".join(suffixes)
        if not out.suffix:
            raise ValueError(f"--out {out}: {writer} a {expected} file; name it "
                             f"{out.with_name(out.name + suffixes[0])} (no suffix is added)")
        owner = [f for f, sx in SUFFIXES.items() if out.suffix in sx and sx != suffixes]
        hint = (f" (a {out.suffix} file is what `edm-fast export --format {owner[0]}` writes)"
                if owner else " (edm-fast reads a .pt file as an NVlabs training state)"
                if out.suffix == ".pt" else "")
        raise ValueError(f"--out {out}: {writer} a {expected} file, not {out.suffix}{hint}")
    if out.name.startswith("ckpt-") and out.suffix == ".safetensors":
        raise ValueError(f"--out {out}: ckpt-*.safetensors names a training checkpoint (which "
                         "--resume would pick up); choose another name")
    check_writable_folder(out.parent, out)
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"cannot write {out}: the file exists and is read-only")
    return out


def _check_format_options(args) -> None:
    """Refuse an option that the chosen --format would silently ignore."""
    from ..device import resolve_device

    if args.format not in ("onnx", "openvino"):  # openvino converts the ONNX export
        for flag, given in (("--opset", args.opset != 17), ("--exporter", args.exporter != "auto"),
                            ("--no-check", not args.check)):
            if given:
                raise ValueError(f"{flag} applies to --format onnx only (and openvino, which "
                                 f"converts the ONNX export), not {args.format}")
    if args.format == "openvino" and args.dtype != "float32":
        raise ValueError(f"--dtype {args.dtype}: an OpenVINO IR is written in float32; the "
                         "precision it runs in is chosen when it is loaded (--net-dtype)")
    if args.format in ("onnx", "openvino", "safetensors") and args.device != "cpu":
        raise ValueError(f"--device {args.device}: --format {args.format} is written on the "
                         "CPU; --device applies to aoti and torchscript")
    args.device = str(resolve_device(args.device))  # a clear error for a missing device


def _cmd_export(args) -> int:
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    _check_format_options(args)
    check_out_file(args.out, SUFFIXES[args.format], f"--format {args.format} writes")
    start = time.perf_counter()
    if args.format == "safetensors":
        path = _export_safetensors(args)
    else:
        path = _EXPORTERS[args.format](args, *_load(args))
    print(f"wrote {path} ({args.format}, {args.dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


def _load(args):
    """(Denoiser on the CPU, sample shape) of --ckpt."""
    from ..io.models import load_denoiser
    from ..precond import require_denoiser
    from ..sampling.sampler import model_shape

    denoiser = load_denoiser(args.ckpt, device="cpu")
    require_denoiser(denoiser, f"export of {args.ckpt!r}")
    return denoiser.eval(), model_shape(denoiser)


def _export_onnx(args, denoiser, shape) -> str:
    from ..io.onnx_export import OnnxCheckError, export_onnx

    try:
        report = export_onnx(denoiser, args.out, sample_shape=shape, opset=args.opset,
                             dtype=args.dtype, dynamic_batch=args.batch is None,
                             batch=args.batch or 2, check=args.check,
                             exporter=args.exporter)
    except OnnxCheckError as exc:
        raise ValueError(str(exc)) from exc
    batch = "dynamic" if report.dynamic_batch else str(args.batch)
    print(f"inputs {', '.join(report.input_names)} (batch {batch}); opset {report.opset}, "
          f"{report.exporter} exporter, {report.export_seconds:.1f} s")
    if report.checks:
        print(f"ONNX Runtime vs PyTorch: max relative error {report.max_rel_err:.2e} "
              f"(tolerance {report.tolerance:g}, {len(report.checks)} cases)")
    return report.path


def _export_torch(args, denoiser, shape) -> str:
    """aoti / torchscript via edm_fast.io.export, with the network in --dtype."""
    import torch

    from ..io.export import export_aoti, export_torchscript
    from ..io.onnx_export import net_in_dtype
    from ..precision import parse_net_dtype

    denoiser = net_in_dtype(denoiser, parse_net_dtype(args.dtype))
    example = (args.batch or 2, *shape)
    if args.format == "aoti":
        return export_aoti(denoiser, example, device=args.device, dtype=torch.float32,
                           path=args.out, dynamic_batch=args.batch is None)
    if args.batch is not None:
        print("note: a TorchScript trace keeps the batch dynamic; --batch only sets the example")
    return export_torchscript(denoiser, example, device=args.device, dtype=torch.float32,
                              path=args.out)


def _export_safetensors(args) -> str:
    from ..io.checkpoints import export_inference_checkpoint
    from ..io.models import BUNDLED, TOYS, bundled_path, exported_format
    from ..precision import parse_net_dtype

    if args.batch is not None:
        raise ValueError("--batch does not apply to --format safetensors")
    if args.ckpt in TOYS:
        raise ValueError(f"{args.ckpt!r} is an analytic toy model, with no weights to export")
    if exported_format(args.ckpt):
        raise ValueError(f"{args.ckpt} is an exported {exported_format(args.ckpt)} model; export "
                         "from the .safetensors checkpoint it came from")
    if Path(args.ckpt).suffix.lower() in (".pkl", ".pt"):
        raise ValueError(f"{args.ckpt} is an NVlabs snapshot: `edm-fast convert {args.ckpt} "
                         "--out FILE.safetensors` converts it")
    src = bundled_path(args.ckpt) if args.ckpt in BUNDLED else args.ckpt
    return str(export_inference_checkpoint(src, args.out, dtype=parse_net_dtype(args.dtype)))


def _export_openvino(args, denoiser, shape) -> str:
    from ..io.onnx_export import OnnxCheckError
    from ..io.openvino_export import export_openvino
    from ..optional import require

    require("openvino", "--format openvino")
    try:
        report = export_openvino(denoiser, args.out, sample_shape=shape, opset=args.opset,
                                 dynamic_batch=args.batch is None, batch=args.batch or 2,
                                 check=args.check, exporter=args.exporter)
    except OnnxCheckError as exc:
        raise ValueError(str(exc)) from exc
    batch = "dynamic" if report.dynamic_batch else str(args.batch)
    print(f"inputs {', '.join(report.input_names)} (batch {batch}); converted from the ONNX "
          f"export (opset {report.opset}); weights in {os.path.splitext(report.path)[0]}.bin")
    return report.path


_EXPORTERS = {"onnx": _export_onnx, "openvino": _export_openvino, "aoti": _export_torch,
              "torchscript": _export_torch}
