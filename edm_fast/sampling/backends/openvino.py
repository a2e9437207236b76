"""The 'openvino' backend: the Python executor over an OpenVINO compiled model of D.

At construction D(x; sigma, labels) becomes an OpenVINO model, from the ONNX export
(``source='onnx'``, default: the exported graph checked against PyTorch by ONNX Runtime), from
OpenVINO's own conversion of the torch module (``source='torch'``, ``openvino.convert_model``),
or from an IR file (``model_path`` ending in .xml, ``edm-fast export --format openvino``). It is
compiled for the CPU with:

- ``INFERENCE_PRECISION_HINT`` from ``net_dtype``: f32 (also for None: OpenVINO's own default
  on CPUs with bf16 instructions is bf16, which would change a float32 run's images), bf16 or
  f16. OpenVINO ignores a hint the CPU cannot honour and runs another precision; the effective
  hint is read back from the compiled model, and a mismatch is refused (EdmFastError), never
  run in a precision the user did not ask for.
- ``INFERENCE_NUM_THREADS`` = ``threads`` (default torch's thread count, which follows
  ``OMP_NUM_THREADS`` and ``--threads``).
- a dynamic batch (one compiled model for every row count, the guided 2N included), or with
  ``dynamic_batch=False`` one static-shape compiled model per row count, compiled on first use.

``run`` executes ``plan.program`` (backends/executor.py) with the step arithmetic in torch (the
backend's dtype); each evaluation is one synchronous inference of float32 buffers. An
autoguidance ``guide`` is converted from ``source`` the same way and compiled with the same
precision into an evaluator of its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings

import torch

from ...errors import BadFileError, EdmFastError
from ...guidance import Guidance
from ...plan import SamplingPlan
from .executor import SigmaVectorCache, unwrap_guided
from .host_loop import HostLoopBackend

__all__ = ["OpenVinoBackend", "OpenVinoEvaluator", "compile_for_cpu"]

# net_dtype -> the OpenVINO element type name of INFERENCE_PRECISION_HINT
_HINTS = {None: "f32", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def compile_for_cpu(core, model, net_dtype: torch.dtype | None, threads: int | None):
    """``model`` compiled for OpenVINO's CPU device in ``net_dtype``'s precision with
    ``threads`` threads; EdmFastError when the CPU runs another precision than the hint."""
    import openvino as ov

    hint = _HINTS[net_dtype]
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                 "INFERENCE_NUM_THREADS": threads})
    effective = compiled.get_property("INFERENCE_PRECISION_HINT")
    if effective != getattr(ov.Type, hint):
        from ...device import cpu_model

        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        raise EdmFastError(f"OpenVINO on this CPU ({cpu_model()}) ignores INFERENCE_PRECISION_HINT"
                           f"={hint} and would run {effective.get_type_name()}: its CPU plugin "
                           f"offers {', '.join(capabilities)}; choose another net_dtype")
    return compiled


class OpenVinoEvaluator:
    """D(x; sigma, labels) through OpenVINO: ``evaluate(x, sigma (B,), labels (B, L) | None)``
    returns D in float32 (a copy). One infer request per compiled model (static batch: one
    compiled model per row count). Not thread-safe; ``Sampler`` serialises calls."""

    def __init__(self, core, model, net_dtype, threads, dynamic_batch: bool, label_dim: int):
        self.core, self.model = core, model
        self.net_dtype, self.threads = net_dtype, threads
        self.dynamic_batch, self.label_dim = dynamic_batch, label_dim
        self._requests: dict = {}
        self.compiled = None
        if dynamic_batch:
            self.compiled = compile_for_cpu(core, model, net_dtype, threads)
            self._requests[None] = self.compiled.create_infer_request()

    def _request(self, rows: int):
        key = None if self.dynamic_batch else rows
        if key not in self._requests:  # a static-shape model for this row count
            import openvino as ov

            model = self.model.clone()
            model.reshape({inp.get_any_name(): ov.PartialShape([rows, *list(
                inp.get_partial_shape())[1:]]) for inp in model.inputs})
            self.compiled = compile_for_cpu(self.core, model, self.net_dtype, self.threads)
            self._requests[key] = self.compiled.create_infer_request()
        return self._requests[key]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        n = x.shape[0]
        inputs = [x.detach().float().cpu().contiguous().numpy(),
                  sigma.detach().float().cpu().reshape(-1).expand(n).contiguous().numpy()]
        if self.label_dim > 0:
            if labels is None:
                labels = torch.zeros(n, self.label_dim)
            inputs.append(labels.detach().float().cpu().contiguous().numpy())
        request = self._request(n)
        request.infer(inputs)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())


class OpenVinoBackend(HostLoopBackend):
    """Run a SamplingPlan with OpenVINO evaluating D (see the module docstring).

    Args:
        denoiser: a ``precond.Denoiser`` or a module in NVlabs' form (a ``GuidedDenoiser`` is
            unwrapped; its weight is used when ``plan.guidance`` is None).
        plan, batch_shape, dtype, label_dim: as for the onnx backend (the graph's inputs and
            outputs are float32; ``dtype`` is the sampler state's).
        device: 'cpu' (OpenVINO's CPU plugin).
        net_dtype: the network's precision (None or float32: f32; bfloat16; float16).
        source: 'onnx' (the checked ONNX export) or 'torch' (``openvino.convert_model``).
        model_path: an IR (.xml) to load instead of converting (e.g. from `edm-fast export
            --format openvino`); its metadata must fit the denoiser.
        dynamic_batch: one model for every batch size (default) or one static model per size.
        threads: OpenVINO's inference threads (default torch.get_num_threads()).
        opset, exporter, check: passed to ``export_onnx`` (source='onnx').
        guide: autoguidance's guide denoiser, converted from ``source`` (also when the main
            model comes from ``model_path``) and compiled as the main model is.
    """

    name = "openvino"

    @staticmethod
    def unavailable_reason() -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            return f"the openvino backend needs openvino: pip install 'edm-fast[openvino]' ({exc})"
        return None

    def __init__(self, denoiser, plan: SamplingPlan, batch_shape, *,
                 dtype: torch.dtype = torch.float32, device="cpu", label_dim: int | None = None,
                 net_dtype=None, source: str = "onnx",
                 model_path: str | os.PathLike | None = None, dynamic_batch: bool = True,
                 threads: int | None = None, opset: int = 17, exporter: str = "auto",
                 check: bool = True, guide=None):
        import openvino as ov

        from ...precision import parse_net_dtype

        start = time.perf_counter()
        denoiser, self.plan = unwrap_guided(denoiser, plan)
        self.batch_shape = tuple(int(n) for n in batch_shape)
        self.dtype, self.device = dtype, torch.device(device)
        if self.device.type != "cpu":
            raise ValueError(f"the openvino backend runs on 'cpu', not {str(self.device)!r}")
        self.label_dim = int(getattr(denoiser, "label_dim", 0) if label_dim is None
                             else label_dim)
        parsed = parse_net_dtype(net_dtype)
        if parsed == "auto":
            raise ValueError("the openvino backend takes a resolved net_dtype; Sampler resolves "
                             "'auto'")
        self.net_dtype = parsed
        if self.plan.guidance is not None and self.label_dim <= 0 and guide is None:
            raise ValueError("guidance needs a class-conditional denoiser (label_dim > 0)")
        if dtype == torch.float64:
            warnings.warn("the openvino backend runs the network in float32 or below; only the "
                          "step math runs in float64 (use backend='reference' for a float64 "
                          "network)", stacklevel=3)
        if source not in ("onnx", "torch"):
            raise ValueError(f"source must be 'onnx' or 'torch', got {source!r}")
        self.core = ov.Core()
        self.export_report = None
        if model_path is not None:
            model = self._read_ir(os.fspath(model_path))
        elif source == "onnx":
            model, self.export_report = self._from_onnx(denoiser, opset, exporter, check)
        else:
            model = self._from_torch(denoiser)
        self.evaluate = OpenVinoEvaluator(self.core, model, self.net_dtype, threads,
                                          dynamic_batch, self.label_dim)
        self.guide = None
        if guide is not None:
            guide_model = (self._from_onnx(guide, opset, exporter, check)[0]
                           if source == "onnx" else self._from_torch(guide))
            self.guide = OpenVinoEvaluator(self.core, guide_model, self.net_dtype, threads,
                                           dynamic_batch, self.label_dim)
        self.guidance = Guidance(self.plan.guidance, guide=self.guide)
        self.sigmas = SigmaVectorCache(self.plan.program, dtype, self.device)
        self._warmup()
        self.warmup_seconds = time.perf_counter() - start

    # -- set-up ---------------------------------------------------------------------------------
    def _read_ir(self, path: str):
        from ...io.openvino_export import read_openvino_metadata

        if not path.endswith(".xml"):
            raise ValueError(f"model_path of the openvino backend is an IR (.xml), got {path!r}")
        try:
            model = self.core.read_model(path)
        except RuntimeError as exc:  # OpenVINO's parse errors: the file, in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise BadFileError(f"{path} is not a readable OpenVINO IR ({first})") from None
        meta = read_openvino_metadata(model)
        want = {"edm_fast.label_dim": str(self.label_dim),
                "edm_fast.sample_shape": ",".join(map(str, self.batch_shape[1:]))}
        wrong = {k: meta.get(k) for k, v in want.items() if meta.get(k) != v}
        if wrong:
            raise EdmFastError(f"{path} does not fit this denoiser: {wrong} (expected {want})")
        return model

    def _from_onnx(self, denoiser, opset: int, exporter: str, check: bool):
        from ...io.onnx_export import export_onnx

        workdir = tempfile.mkdtemp(prefix="edm_fast_ov_")
        try:
            path = os.path.join(workdir, "denoiser.onnx")
            report = export_onnx(
                denoiser, path, sample_shape=self.batch_shape[1:], label_dim=self.label_dim,
                opset=opset, batch=self.batch_shape[0], check=check, exporter=exporter)
            return self.core.read_model(path), report  # read into memory: the file can go
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _from_torch(self, denoiser):
        import openvino as ov

        from ...io.export import prepare_for_export

        module, args, _, _, restore = prepare_for_export(
            denoiser, self.batch_shape, self.label_dim, "cpu", torch.float32, min_batch=2)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = ov.convert_model(module, example_input=args)
        finally:
            restore()
        batch = ov.Dimension()  # dynamic: the conversion fixes the example's shapes
        model.reshape({inp: ov.PartialShape([batch, *list(inp.get_partial_shape())[1:]])
                       for inp in model.inputs})
        return model
