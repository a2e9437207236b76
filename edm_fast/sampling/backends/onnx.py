"""The 'onnx' backend: the Python executor over an ONNX Runtime session of D.

At construction the denoiser D(x; sigma, labels) is exported once with ``export_onnx`` (dynamic
batch, checked against PyTorch) and loaded into an ``onnxruntime.InferenceSession``; export,
check, session creation and one warm-up evaluation are reported as ``warmup_seconds``. ``run``
then executes ``plan.program`` (backends/executor.py) with the step arithmetic in torch (the
backend's dtype) on the session's device and one session call per evaluation. The session's
inputs and outputs are float32 buffers bound once per row count (``OrtEvaluator``);
classifier-free guidance is one call of 2N rows (``guidance.Guidance``). An autoguidance
``guide`` is exported and checked the same way into a session of its own.

Devices: 'cpu' uses the CPU execution provider. 'cuda[:i]' needs onnxruntime-gpu (the CUDA
execution provider); the session then reads and writes torch's CUDA tensors in place through
I/O binding, so nothing crosses to the host. TF32 is off by default on the CUDA provider
(``tf32=True`` turns it on) so that float32 results stay within the reference tolerance.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
import weakref

import torch

from ...guidance import Guidance
from ...io.onnx_export import OUTPUT_NAME, export_onnx, make_session, read_onnx_metadata
from ...io.onnx_export import onnx_net_dtype
from ...plan import SamplingPlan
from .executor import SigmaVectorCache, unwrap_guided
from .host_loop import HostLoopBackend

__all__ = ["OnnxBackend"]

CUDA_PROVIDER = "CUDAExecutionProvider"


def _providers(device: torch.device, tf32: bool):
    """The session's execution providers for ``device``; raises when the device has none."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise ValueError(f"the onnx backend runs on 'cpu' or 'cuda', not {device.type!r}")
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        raise RuntimeError("the onnx backend on CUDA needs onnxruntime-gpu (this onnxruntime has "
                           f"{ort.get_available_providers()}); install it or use device='cpu'")
    index = device.index if device.index is not None else torch.cuda.current_device()
    options = {"device_id": str(index), "use_tf32": "1" if tf32 else "0"}
    return [(CUDA_PROVIDER, options), "CPUExecutionProvider"]


class _Binding:
    """float32 input, sigma, label and output buffers of one row count, bound once to an
    ``IOBinding`` (no per-call binding, no host round trip)."""

    def __init__(self, session, device: torch.device, rows: int, sample_shape, label_dim: int):
        import numpy as np

        float32 = np.float32
        self.x = torch.zeros((rows, *sample_shape), dtype=torch.float32, device=device)
        self.sigma = torch.ones((rows,), dtype=torch.float32, device=device)
        self.labels = (torch.zeros((rows, label_dim), dtype=torch.float32, device=device)
                       if label_dim > 0 else None)
        self.out = torch.empty_like(self.x)
        where = "cuda" if device.type == "cuda" else "cpu"
        index = ((device.index if device.index is not None else torch.cuda.current_device())
                 if device.type == "cuda" else 0)
        inputs = {"x": self.x, "sigma": self.sigma, "class_labels": self.labels}
        self.binding = session.io_binding()
        for spec in session.get_inputs():  # by name, as export_onnx names them
            t = inputs.get(spec.name)
            if t is None:
                raise ValueError(f"the ONNX model has an input {spec.name!r} that the sampler "
                                 "cannot feed (expected x, sigma and, for a conditional model, "
                                 "class_labels)")
            self.binding.bind_input(spec.name, where, index, float32, tuple(t.shape),
                                    t.data_ptr())
        self.binding.bind_output(OUTPUT_NAME, where, index, float32, tuple(self.out.shape),
                                 self.out.data_ptr())


class OrtEvaluator:
    """D(x; sigma, labels) through the session: ``evaluate(x, sigma (B,), labels (B, L) | None)``
    copies the inputs into the bound buffers of B rows, runs the session (which writes D into
    the output buffer in place) and returns a copy of it in float32. Not thread-safe (the
    buffers are shared); ``Sampler`` serialises calls with its lock."""

    def __init__(self, session, device: torch.device, sample_shape, label_dim: int):
        self.session, self.device = session, device
        self.sample_shape, self.label_dim = tuple(sample_shape), label_dim
        self._bindings: dict[int, _Binding] = {}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        rows = x.shape[0]
        slot = self._bindings.get(rows)
        if slot is None:
            slot = self._bindings[rows] = _Binding(self.session, self.device, rows,
                                                   self.sample_shape, self.label_dim)
        slot.x.copy_(x)
        slot.sigma.copy_(sigma)
        if slot.labels is not None:
            if labels is None:
                slot.labels.zero_()
            else:
                slot.labels.copy_(labels)
        if self.device.type == "cuda":  # ORT runs on its own stream: torch's writes must be done
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(slot.binding)  # returns once D is written
        return slot.out.clone()


def _own_net_dtype(denoiser) -> torch.dtype:
    """The dtype a ``precond.Denoiser``'s network runs in; float32 for any other module."""
    dtype = getattr(denoiser, "net_dtype", None)
    if dtype is None and hasattr(denoiser, "model"):
        param = next(denoiser.model.parameters(), None)
        dtype = None if param is None else param.dtype
    return torch.float32 if dtype is None else dtype


class OnnxBackend(HostLoopBackend):
    """Run a SamplingPlan with ONNX Runtime evaluating D.

    Args:
        denoiser: a ``precond.Denoiser`` (a ``GuidedDenoiser`` is unwrapped; its weight is used
            when ``plan.guidance`` is None).
        plan: the planned run (``SamplingPlan.build``).
        batch_shape: (N, *sample_shape); other batch sizes work too (dynamic batch).
        dtype: the dtype of the sampler state and step math (float32, or float64); the graph's
            inputs and outputs are float32.
        device: 'cpu' or 'cuda[:i]' (see the module docstring).
        label_dim: defaults to the denoiser's.
        model_path: where to write the .onnx file (default: a private temporary directory,
            removed with the backend); with ``reuse_model=True`` an existing file whose metadata
            matches is loaded instead of re-exported.
        net_dtype: the network's dtype in the graph, fp32 or fp16 in any spelling of
            ``edm_fast.precision`` (None: the network's own); bf16 is refused (ONNX Runtime has
            no bf16 convolutions). fp16 is meant for CUDA; on the CPU it runs at about float32's
            speed (18.5 vs 17.0 ms per forward, bundled model, batch 16, AVX512 EPYC).
        opset, exporter, check: passed to ``export_onnx``.
        guide: autoguidance's guide denoiser, exported (always afresh, next to the model) in
            the same net_dtype and run by a session of its own.
        threads: ONNX Runtime intra-op threads (default torch.get_num_threads()).
        tf32: allow TF32 on the CUDA provider.

    Not thread-safe by itself (the bound buffers are shared by all calls of one batch size);
    ``Sampler`` serialises calls with its lock.
    """

    name = "onnx"

    @staticmethod
    def unavailable_reason() -> str | None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"the onnx backend needs onnx and onnxruntime ({exc})"
        return None

    def __init__(self, denoiser, plan: SamplingPlan, batch_shape, *,
                 dtype: torch.dtype = torch.float32, device="cpu", label_dim: int | None = None,
                 model_path: str | os.PathLike | None = None, reuse_model: bool = False,
                 net_dtype=None, opset: int = 17, exporter: str = "auto", check: bool = True,
                 threads: int | None = None, tf32: bool = False, guide=None):
        start = time.perf_counter()
        denoiser, self.plan = unwrap_guided(denoiser, plan)
        self.batch_shape = tuple(int(n) for n in batch_shape)
        self.dtype, self.device = dtype, torch.device(device)
        self.label_dim = int(denoiser.label_dim if label_dim is None else label_dim)
        self.net_dtype = onnx_net_dtype(_own_net_dtype(denoiser) if net_dtype is None
                                        else net_dtype)
        if self.plan.guidance is not None and self.label_dim <= 0 and guide is None:
            raise ValueError("guidance needs a class-conditional denoiser (label_dim > 0)")
        if dtype == torch.float64:
            warnings.warn(f"the onnx backend runs the network in {str(self.net_dtype)[6:]}; only "
                          "the step math runs in float64 (use backend='reference' for a float64 "
                          "network)", stacklevel=3)
        providers = _providers(self.device, tf32)
        self.model_path = self._model_path(model_path)
        self.export_report = None
        if not (reuse_model and os.path.exists(self.model_path) and self._metadata_matches()):
            self.export_report = export_onnx(
                denoiser, self.model_path, sample_shape=self.batch_shape[1:],
                label_dim=self.label_dim, opset=opset, dtype=self.net_dtype,
                batch=self.batch_shape[0], check=check, exporter=exporter)
        self.session = make_session(self.model_path, providers=providers, threads=threads)
        if self.device.type == "cuda" and CUDA_PROVIDER not in self.session.get_providers():
            raise RuntimeError("onnxruntime could not start its CUDA provider (missing CUDA or "
                               "cuDNN libraries?); the session would run on the CPU")
        self.evaluate = OrtEvaluator(self.session, self.device, self.batch_shape[1:],
                                     self.label_dim)
        self.guide = None
        if guide is not None:
            guide_path = os.path.splitext(self.model_path)[0] + "-guide.onnx"
            guide_dtype = onnx_net_dtype(_own_net_dtype(guide) if net_dtype is None else net_dtype)
            self.guide_export_report = export_onnx(
                guide, guide_path, sample_shape=self.batch_shape[1:], label_dim=self.label_dim,
                opset=opset, dtype=guide_dtype, batch=self.batch_shape[0], check=check,
                exporter=exporter)
            self.guide = OrtEvaluator(make_session(guide_path, providers=providers,
                                                   threads=threads),
                                      self.device, self.batch_shape[1:], self.label_dim)
        self.guidance = Guidance(self.plan.guidance, guide=self.guide)
        self.sigmas = SigmaVectorCache(self.plan.program, dtype, self.device)
        self._warmup()
        self.warmup_seconds = time.perf_counter() - start

    # -- set-up ---------------------------------------------------------------------------------
    def _model_path(self, model_path) -> str:
        if model_path is not None:
            return os.fspath(model_path)
        workdir = tempfile.mkdtemp(prefix="edm_fast_onnx_")
        self._cleanup = weakref.finalize(self, shutil.rmtree, workdir, ignore_errors=True)
        return os.path.join(workdir, "denoiser.onnx")

    def _metadata_matches(self) -> bool:
        meta = read_onnx_metadata(self.model_path)
        return (meta.get("edm_fast.label_dim") == str(self.label_dim)
                and meta.get("edm_fast.sample_shape") == ",".join(map(str, self.batch_shape[1:]))
                and meta.get("edm_fast.net_dtype") == str(self.net_dtype).removeprefix("torch.")
                and meta.get("edm_fast.dynamic_batch") == "1")
