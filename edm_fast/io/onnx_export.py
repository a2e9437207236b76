"""ONNX export of the preconditioned denoiser D(x; sigma, labels) for ONNX Runtime.

**What is exported.** D of EDM Eq. 7, not only the raw network F, through the branch-free
``export.ExportableDenoiser`` (the same module the AOTInductor / TorchScript exports use):

    D(x, sigma[, class_labels]) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma),
                                                                  class_labels)

| name             | shape              | dtype   | note                                          |
|------------------|--------------------|---------|-----------------------------------------------|
| ``x``            | (B, *sample_shape) | float32 | input: the noisy state                        |
| ``sigma``        | (B,)               | float32 | input: one noise level per row (never folded) |
| ``class_labels`` | (B, label_dim)     | float32 | input: one-hot, zeros = unconditional; only   |
|                  |                    |         | when label_dim > 0                            |
| ``denoised``     | (B, *sample_shape) | float32 | output: D(x; sigma, labels)                   |

B is the symbolic dimension ``batch`` (``dynamic_batch=True``), so one file serves every batch
size, including the 2N batch of classifier-free guidance; with ``dynamic_batch=False`` it is
fixed. ``dtype`` is the dtype of the *network* inside the graph (weights and activations):
float32, or float16 (a half copy of F; the preconditioning and the graph's inputs/outputs stay
float32, exactly as ``precond.Denoiser`` runs around a half network). Every file carries the
``edm_fast.*`` metadata of ``export.export_metadata`` plus ``edm_fast.net_dtype``,
``edm_fast.opset`` and ``edm_fast.exporter`` as ONNX ``metadata_props``.

**What is not exported.** The sampling loop: churn (Alg. 2 l.5-6), the Euler step and the Heun
correction (l.7-11), and the guidance mix. They are a few element-wise ops per step that
``backends.onnx.OnnxBackend`` runs in torch on the session's device around one session call per
evaluation (the t_N = 0 step would need a second graph without the correction, and guidance a
third); the cost of a step is the network, which is in the graph.

**Exporter.** ``exporter='auto'`` uses the TorchScript-based exporter (``dynamo=False``). On
torch 2.13 and 2.11 both exporters export our SongUNet, DhariwalUNet and MLP correctly at
opset 18, but at the default opset 17 the dynamo exporter (which emits opset 18 and converts
down with the ONNX version converter) writes an invalid DhariwalUNet graph (a ``Split`` with the
opset-18 ``num_outputs`` attribute); the TorchScript exporter emits any opset 13..21 natively,
needs no onnxscript (absent from the GPU images), and takes 0.2-1 s instead of 4-9 s for the tiny
nets. It is deprecated upstream, so 'auto' falls back to the dynamo exporter (at opset >= 18,
with a warning) when it fails or is gone; EDM2 nets, whose convolutions it cannot export, go to
the dynamo exporter directly. ``exporter='dynamo'`` asks for it directly.

**Check.** With ``check=True`` ONNX Runtime (CPU execution provider unless ``providers`` says
otherwise) evaluates the file on random inputs at every sigma of ``CHECK_SIGMAS`` and batch
sizes 1 and 3 (the export batch when static), against the PyTorch module in the same dtype. The
error of one case is max|D_ort - D_torch| / max|D_torch|; the report holds every case and the
maximum, and ``OnnxCheckError`` is raised when the maximum exceeds ``TOLERANCE[dtype]`` (1e-4
for float32, 1e-2 for float16; measured on the tiny test nets: <= 1.2e-6 and <= 2.4e-3, and
1.3e-5 for the bundled DDPM model, whose c_noise is a nearest-level index).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence

import torch

from .export import (ExportableDenoiser, export_metadata, output_file, prepare_for_export,
                     require_exportable, unwrap_guidance)
from .files import atomic_write
from .model_card import model_card, record_card
from ..precond import Denoiser

__all__ = [
    "CHECK_SIGMAS",
    "NET_DTYPES",
    "net_in_dtype",
    "onnx_net_dtype",
    "OUTPUT_NAME",
    "TOLERANCE",
    "OnnxCheckError",
    "OnnxExportReport",
    "check_onnx",
    "export_onnx",
    "make_session",
    "read_onnx_metadata",
]

CHECK_SIGMAS = (0.002, 0.05, 1.0, 20.0, 80.0)  # EDM's sigma range and points inside it
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}  # max|ort - torch| / max|torch|
NET_DTYPES = {"float32": torch.float32, "float16": torch.float16}
OUTPUT_NAME = "denoised"
OPSETS = (13, 21)  # the opsets this module exports and tests (the TorchScript exporter's range)
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's own opset; lower ones go through a converter


class OnnxCheckError(RuntimeError):
    """ONNX Runtime does not reproduce PyTorch within the tolerance; ``.report`` has the cases."""

    exit_code = 1  # the CLI prints the message as one line (edm_fast.errors)

    def __init__(self, message: str, report: OnnxExportReport):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class OnnxExportReport:
    """What ``export_onnx`` wrote and how well ONNX Runtime reproduces PyTorch."""

    path: str
    exporter: str  # 'torchscript' or 'dynamo'
    opset: int
    dtype: str  # the network's dtype inside the graph
    input_names: list[str]
    dynamic_batch: bool
    export_seconds: float
    checks: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    # (batch, sigma, relative error) per check case
    tolerance: float | None = None

    @property
    def max_rel_err(self) -> float | None:
        """The largest relative error of the check (NaN if any case was NaN; None when it did
        not run)."""
        return _worst(self.checks)[2] if self.checks else None


# ------------------------------------------------------------------------------------------
# Sessions and metadata.

def make_session(path, *, providers=None, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on ``path`` (CPU provider by default).

    ``threads`` (intra-op) defaults to ``torch.get_num_threads()``, so ONNX Runtime honours the
    same thread budget as torch (OMP_NUM_THREADS) instead of taking every core.
    """
    import onnxruntime as ort

    from .onnx_check import check_onnx_file

    check_onnx_file(path)  # external data stay inside the model's folder and files
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only (no "cannot constant fold" notes for float16)
    return ort.InferenceSession(os.fspath(path), sess_options=options,
                                providers=providers or ["CPUExecutionProvider"])


def read_onnx_metadata(path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (the edm_fast.* keys of ``export_onnx``)."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def _write_metadata(path: str, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(path)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)


# ------------------------------------------------------------------------------------------
# The two exporters.

def _export_torchscript(module, args, path: str, names, opset: int, dynamic_batch: bool) -> int:
    """torch.onnx.export(dynamo=False): traces the module; the batch axis named 'batch'."""
    axes = {name: {0: "batch"} for name in (*names, OUTPUT_NAME)} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own deprecation
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, args, path, dynamo=False, input_names=list(names),
                          output_names=[OUTPUT_NAME], opset_version=opset, dynamic_axes=axes,
                          do_constant_folding=True)
    return opset


def _export_dynamo(module, args, path: str, names, opset: int, dynamic_batch: bool) -> int:
    """torch.onnx.export(dynamo=True): torch.export + onnxscript, at opset >= 18."""
    if opset < DYNAMO_MIN_OPSET:
        warnings.warn(f"edm-fast: the dynamo ONNX exporter writes opset {DYNAMO_MIN_OPSET}, not "
                      f"{opset} (its down-conversion breaks DhariwalUNet)", RuntimeWarning,
                      stacklevel=3)
        opset = DYNAMO_MIN_OPSET
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({0: batch} for _ in args)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    try:  # the exporter's notes that are not about this model: optional torchvision ops, the
        # axis-name reuse of a shared batch dimension, torch's own pytree deprecation
        registration.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec",
                                    category=FutureWarning)
            program = torch.onnx.export(module, args, dynamo=True, input_names=list(names),
                                        output_names=[OUTPUT_NAME], opset_version=opset,
                                        dynamic_shapes=shapes, verbose=False)
    finally:
        registration.setLevel(level)
    program.save(path)
    return opset


def _torchscript_exports(module) -> bool:
    """False for a module holding an EDM2 U-Net: the TorchScript exporter refuses its
    convolutions ("kernel of unknown shape", baked weights or not), so 'auto'
    exports it with the dynamo exporter, at opset >= 18, without trying and warning."""
    from ..nets.edm2 import UNet as EDM2UNet

    modules = module.modules() if isinstance(module, torch.nn.Module) else ()
    return not any(isinstance(m, EDM2UNet) for m in modules)


def _run_exporter(exporter: str, module, args, path, names, opset, dynamic_batch):
    """(exporter used, opset written); 'auto' = TorchScript, dynamo if that fails (but not
    when the file cannot be written: an OSError is raised as it is)."""
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}")
    if exporter == "dynamo":
        return "dynamo", _export_dynamo(module, args, path, names, opset, dynamic_batch)
    if exporter == "auto" and not _torchscript_exports(module):
        return "dynamo", _export_dynamo(module, args, path, names, max(opset, DYNAMO_MIN_OPSET),
                                        dynamic_batch)
    try:
        return "torchscript", _export_torchscript(module, args, path, names, opset,
                                                  dynamic_batch)
    except OSError:
        raise  # the file cannot be written: the other exporter could not write it either
    except Exception as exc:
        if exporter == "torchscript":
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]  # not the whole graph
        warnings.warn(f"edm-fast: the TorchScript ONNX exporter failed ({type(exc).__name__}: "
                      f"{first_line}); using the dynamo exporter", RuntimeWarning, stacklevel=3)
        return "dynamo", _export_dynamo(module, args, path, names, opset, dynamic_batch)


# ------------------------------------------------------------------------------------------
# The check: ONNX Runtime against PyTorch on random inputs.

def _check_inputs(batch: int, sample_shape, label_dim: int, sigma: float, seed: int):
    """x = y + sigma n at the data scale, sigma (B,), one-hot labels with the last row zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *sample_shape), generator=gen) * (sigma**2 + 0.25) ** 0.5
    inputs = [x, torch.full((batch,), sigma)]
    if label_dim > 0:
        labels = torch.eye(label_dim)[torch.randint(label_dim, (batch,), generator=gen)]
        if batch > 1:
            labels[-1] = 0  # one unconditional row (the guidance branch)
        inputs.append(labels)
    return inputs


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def check_onnx(module, path, *, sample_shape: Sequence[int], label_dim: int,
               batches: Sequence[int] = (1, 3), sigmas: Sequence[float] = CHECK_SIGMAS,
               providers=None, tolerance: float | None = None) -> list[tuple[int, float, float]]:
    """(batch, sigma, relative error) of ONNX Runtime vs ``module`` for every case.

    module: the PyTorch D (an ``ExportableDenoiser``, or a ``Denoiser`` in eval mode) on the
    CPU; raises ``OnnxCheckError`` when ``tolerance`` is given and an error exceeds it.
    """
    if isinstance(module, Denoiser):
        module = ExportableDenoiser(module).eval()
    session = make_session(path, providers=providers)
    names = [i.name for i in session.get_inputs()]
    cases = []
    for b in batches:
        for k, sigma in enumerate(sigmas):
            inputs = _check_inputs(b, tuple(sample_shape), label_dim, float(sigma), 1000 * b + k)
            ref = module(*inputs)
            out = session.run([OUTPUT_NAME], {n: t.numpy() for n, t in zip(names, inputs)})[0]
            cases.append((b, float(sigma), _rel_err(torch.from_numpy(out), ref)))
    if tolerance is not None:
        _judge(cases, tolerance, os.fspath(path), None)
    return cases


def _worst(cases: list[tuple[int, float, float]]) -> tuple[int, float, float]:
    """The case with the largest error, a NaN one first (max() alone depends on the order)."""
    return max(cases, key=lambda case: math.inf if math.isnan(case[2]) else case[2])


def _judge(cases, tolerance: float, where: str, report: OnnxExportReport | None) -> None:
    """OnnxCheckError unless every error is a number within ``tolerance`` (NaN fails)."""
    b, sigma, err = _worst(cases)
    if math.isnan(err):
        raise OnnxCheckError(f"the check of {where} got NaN/Inf (batch {b}, sigma {sigma}): the "
                             "model's outputs are not finite; check the checkpoint's weights",
                             report)
    if not err <= tolerance:
        raise OnnxCheckError(f"ONNX Runtime differs from PyTorch by {err:.3g} (relative, batch "
                             f"{b}, sigma {sigma}) > tolerance {tolerance:g} for {where}", report)


# ------------------------------------------------------------------------------------------
# Public entry point.

def net_in_dtype(denoiser, dtype: torch.dtype):
    """The denoiser itself when F already runs in ``dtype``, else a copy with F in ``dtype``
    (a module in NVlabs' form is exported as it is, in float32 only)."""
    require_exportable(denoiser, "ONNX export")
    if not isinstance(denoiser, Denoiser):
        if dtype != torch.float32:
            raise ValueError("a float16 network inside the graph needs an edm_fast Denoiser "
                             "(F and its preconditioning apart); export this module in float32")
        return denoiser
    return record_card(denoiser.with_net_dtype(dtype), model_card(denoiser))  # same card


def onnx_net_dtype(dtype) -> torch.dtype:
    """The graph's network dtype from any ``net_dtype`` spelling (edm_fast.precision): float32
    or float16; bfloat16 is refused (ONNX Runtime has no bfloat16 convolutions: the openvino
    backend runs a float32 graph in bf16)."""
    from ..precision import parse_net_dtype

    parsed = parse_net_dtype(dtype)
    if parsed not in TOLERANCE:
        raise ValueError(f"an ONNX graph's network runs in fp32 or fp16, got {dtype!r}"
                         + (" (ONNX Runtime has no bf16 convolutions; the openvino backend "
                            "runs bf16)" if parsed == torch.bfloat16 else ""))
    return parsed


def export_onnx(denoiser, path: str | os.PathLike, *, sample_shape: Sequence[int],
                label_dim: int | None = None, opset: int = 17,
                dtype: torch.dtype | str = torch.float32, dynamic_batch: bool = True,
                batch: int = 2, check: bool = True, exporter: str = "auto",
                providers=None, tolerance: float | None = None) -> OnnxExportReport:
    """Write D(x, sigma[, class_labels]) to ``path`` as ONNX and check it with ONNX Runtime.

    Args:
        denoiser: a ``precond.Denoiser`` or a module in NVlabs' form (a ``GuidedDenoiser`` is
            unwrapped: guidance runs in the sampling loop as one 2N batch). Exported from a CPU
            copy if it lives elsewhere.
        sample_shape: one sample's shape, e.g. (3, 32, 32) or (2,).
        label_dim: must equal ``denoiser.label_dim`` (default); 0 = no ``class_labels`` input.
        opset: the ONNX opset (the dynamo exporter writes at least 18).
        dtype: the network's dtype in the graph, float32 or float16 (inputs stay float32).
        dynamic_batch: a symbolic batch dimension; else the graph takes exactly ``batch`` rows.
        batch: the export batch (traced at >= 2 when dynamic, so that no size-1 axis specialises).
        check: compare ONNX Runtime with PyTorch (see the module docstring); raises
            ``OnnxCheckError`` above ``tolerance`` (default ``TOLERANCE[dtype]``).
        exporter: 'auto' | 'torchscript' | 'dynamo' (see the module docstring).
        providers: ONNX Runtime providers of the check session (default CPU).

    ``path`` must not be a folder (IsADirectoryError before any tracing); its missing parent
    folders are created.

    Returns an ``OnnxExportReport`` (max relative error in ``report.max_rel_err``).
    """
    path, dtype = output_file(path), onnx_net_dtype(dtype)
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise ValueError(f"opset must be in {OPSETS[0]}..{OPSETS[1]}, got {opset}")
    denoiser = net_in_dtype(unwrap_guidance(denoiser), dtype)
    min_batch = 2 if dynamic_batch else 1
    module, args, label_dim, sample_shape, restore = prepare_for_export(
        denoiser, (int(batch), *sample_shape), label_dim, "cpu", torch.float32, min_batch)
    names = ["x", "sigma"] + (["class_labels"] if label_dim > 0 else [])
    try:
        start = time.perf_counter()
        meta = export_metadata(module, sample_shape, label_dim, torch.float32, "cpu",
                               dynamic_batch, args[0].shape[0])
        meta["edm_fast.net_dtype"] = str(dtype).removeprefix("torch.")

        reports = []

        def write(tmp):  # graph, metadata and check on a temporary file, renamed when passed
            with torch.no_grad():
                used, written = _run_exporter(exporter, module, args, str(tmp), names,
                                              int(opset), dynamic_batch)
            meta.update({"edm_fast.opset": str(written), "edm_fast.exporter": used})
            _write_metadata(str(tmp), meta)
            report = OnnxExportReport(path, used, int(written), meta["edm_fast.net_dtype"], names,
                                      dynamic_batch, time.perf_counter() - start)
            if check:  # before the rename: a model that fails its check never lands at path
                _check_report(report, tmp, module, sample_shape, label_dim, args[0].shape[0],
                              providers, TOLERANCE[dtype] if tolerance is None else tolerance)
            reports.append(report)

        atomic_write(path, write)
    finally:
        restore()
    return reports[0]


def _check_report(report: OnnxExportReport, model_file, module, sample_shape, label_dim: int,
                  batch: int, providers, tolerance: float) -> None:
    """Fill ``report.checks`` from ``model_file``; raise OnnxCheckError (carrying the report)
    when an error is above ``tolerance`` or not a number."""
    batches = (1, 3) if report.dynamic_batch else (batch,)
    report.checks = check_onnx(module, model_file, sample_shape=sample_shape,
                               label_dim=label_dim, batches=batches, providers=providers)
    report.tolerance = tolerance
    _judge(report.checks, tolerance, os.fspath(report.path), report)
