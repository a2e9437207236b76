"""The 'onnx' backend: EDM Algorithm 2 in torch around an ONNX Runtime session of D.

At construction the denoiser D(x; sigma, labels) is exported once with ``export_onnx`` (dynamic
batch, checked against PyTorch) and loaded into an ``onnxruntime.InferenceSession``; export,
check, session creation and one warm-up evaluation are reported as ``warmup_seconds``. ``run``
then executes a ``SamplingPlan`` (host scalars t_i, t_hat_i, gamma_i), step i:

    churn   x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps_k          (l.5-6; only if gamma_i > 0)
    Euler   d = (x_hat - D(x_hat; t_hat)) / t_hat,  x' = x_hat + (t_next - t_hat) d      (l.7-8)
    Heun    d' = (x' - D(x'; t_next)) / t_next,  x' = x_hat + (t_next - t_hat)(d/2 + d'/2) (l.9-11)

with the step math in torch (the backend's dtype) on the session's device and one session call
per evaluation. Classifier-free guidance evaluates the conditional and unconditional rows as
one batch of 2N, D_w = D_u + w (D_c - D_u), like ``guidance.GuidedDenoiser``.

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
import weakref

import torch

from ..guidance import one_hot_labels
from ..onnx_export import OUTPUT_NAME, _net_dtype, export_onnx, make_session, read_onnx_metadata
from ..samplers import NonFiniteError
from .plan import SamplingPlan

__all__ = ["OnnxBackend"]

CUDA_PROVIDER = "CUDAExecutionProvider"


def _split_guidance(denoiser, plan: SamplingPlan):
    """(inner Denoiser, plan with the guidance weight) for a GuidedDenoiser, else unchanged."""
    inner = getattr(denoiser, "denoiser", None)
    if inner is None or not hasattr(denoiser, "guidance"):
        return denoiser, plan
    if plan.guidance is None:
        plan = SamplingPlan(plan.sigmas, plan.t_hats, plan.gammas, plan.solver, plan.S_noise,
                            float(denoiser.guidance))
    return inner, plan


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


class _BoundSession:
    """Runs the session on float32 torch tensors in place (I/O binding, no host round trip)."""

    def __init__(self, session, device: torch.device):
        import numpy as np

        self.session, self.device, self.float32 = session, device, np.float32
        self.names = [i.name for i in session.get_inputs()]
        self.where = "cuda" if device.type == "cuda" else "cpu"
        self.index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 0
        if device.type == "cuda" and CUDA_PROVIDER not in session.get_providers():
            raise RuntimeError("onnxruntime could not start its CUDA provider (missing CUDA or "
                               "cuDNN libraries?); the session would run on the CPU")

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """D for inputs (x, sigma[, labels]), each float32, contiguous, on the device."""
        binding = self.session.io_binding()
        for name, t in zip(self.names, inputs):
            binding.bind_input(name, self.where, self.index, self.float32, tuple(t.shape),
                               t.data_ptr())
        out = torch.empty_like(inputs[0])
        binding.bind_output(OUTPUT_NAME, self.where, self.index, self.float32, tuple(out.shape),
                            out.data_ptr())
        if self.where == "cuda":  # ORT runs on its own stream: torch's writes must be done
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)  # returns once the outputs are written
        return out


class OnnxBackend:
    """Run a SamplingPlan with ONNX Runtime evaluating D.

    Args:
        denoiser: a ``precond.Denoiser`` (a ``GuidedDenoiser`` is unwrapped; its weight is used
            when ``plan.guidance`` is None).
        plan: the host scalars of the run (``SamplingPlan.build``).
        batch_shape: (N, *sample_shape); other batch sizes work too (dynamic batch).
        dtype: the dtype of the sampler state and step math (float32, or float64); the graph's
            inputs and outputs are float32.
        device: 'cpu' or 'cuda[:i]' (see the module docstring).
        label_dim: defaults to the denoiser's.
        model_path: where to write the .onnx file (default: a private temporary directory,
            removed with the backend); with ``reuse_model=True`` an existing file whose metadata
            matches is loaded instead of re-exported.
        net_dtype: the network's dtype in the graph ('float32' or 'float16').
        opset, exporter, check: passed to ``export_onnx``.
        threads: ONNX Runtime intra-op threads (default torch.get_num_threads()).
        tf32: allow TF32 on the CUDA provider.
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
                 net_dtype="float32", opset: int = 17, exporter: str = "auto", check: bool = True,
                 threads: int | None = None, tf32: bool = False):
        start = time.perf_counter()
        denoiser, self.plan = _split_guidance(denoiser, plan)
        self.batch_shape = tuple(int(n) for n in batch_shape)
        self.dtype, self.device = dtype, torch.device(device)
        self.label_dim = int(denoiser.label_dim if label_dim is None else label_dim)
        self.net_dtype = _net_dtype(net_dtype)
        if self.plan.guidance is not None and self.label_dim <= 0:
            raise ValueError("guidance needs a class-conditional denoiser (label_dim > 0)")
        providers = _providers(self.device, tf32)
        self.model_path = self._model_path(model_path)
        self.export_report = None
        if not (reuse_model and os.path.exists(self.model_path) and self._metadata_matches()):
            self.export_report = export_onnx(
                denoiser, self.model_path, sample_shape=self.batch_shape[1:],
                label_dim=self.label_dim, opset=opset, dtype=self.net_dtype,
                batch=self.batch_shape[0], check=check, exporter=exporter)
        self.session = make_session(self.model_path, providers=providers, threads=threads)
        self._call = _BoundSession(self.session, self.device)
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

    @torch.no_grad()
    def _warmup(self) -> None:
        """One evaluation at the run's batch (ORT allocates and, on CUDA, picks kernels)."""
        n = self.batch_shape[0]
        x = torch.zeros(self.batch_shape, dtype=self.dtype, device=self.device)
        self._denoise(x, self._sigma_vector(1.0, n), self._labels(None, n))

    # -- one evaluation -------------------------------------------------------------------------
    def _rows(self, n: int) -> int:
        """Rows per session call: 2N with guidance (conditional + unconditional)."""
        return 2 * n if self.plan.guidance is not None else n

    def _sigma_vector(self, t: float, n: int) -> torch.Tensor:
        return torch.full((self._rows(n),), t, dtype=torch.float32, device=self.device)

    def _labels(self, class_labels, n: int) -> torch.Tensor | None:
        """(N, L) float32 labels, stacked over zeros (unconditional) for guidance; or None."""
        if self.label_dim <= 0:
            if class_labels is not None:
                raise ValueError("this denoiser is unconditional; class_labels must be None")
            return None
        labels = one_hot_labels(class_labels, self.label_dim, batch=n, device=self.device,
                                dtype=torch.float32)
        if self.plan.guidance is not None:
            labels = torch.cat([labels, torch.zeros_like(labels)])
        return labels.contiguous()

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
        """D(x; sigma, labels) in x's dtype (guided: D_u + w (D_c - D_u), one 2N batch)."""
        x_in = x.to(torch.float32)
        if self.plan.guidance is not None:
            x_in = torch.cat([x_in, x_in])
        inputs = (x_in.contiguous(), sigma) + ((labels,) if labels is not None else ())
        out = self._call(*inputs).to(x.dtype)
        if self.plan.guidance is None:
            return out
        cond, uncond = out[: x.shape[0]], out[x.shape[0]:]
        return uncond + self.plan.guidance * (cond - uncond)

    # -- public ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_once(self, x, sigma, class_labels=None) -> torch.Tensor:
        """One denoiser evaluation D(x; sigma) exactly as the loop runs it (for benchmarks)."""
        x = x.to(self.device, self.dtype)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).reshape(-1)
        sigma = sigma.expand(x.shape[0])
        if self.plan.guidance is not None:
            sigma = torch.cat([sigma, sigma])
        return self._denoise(x, sigma.contiguous(), self._labels(class_labels, x.shape[0]))

    @torch.no_grad()
    def run(self, latents: torch.Tensor, churn_noise: torch.Tensor | None = None,
            class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Alg. 2 from x_0 = latents * t_0.

        latents: (N, *sample_shape) unit-variance noise; churn_noise: (K, N, *sample_shape) with
        K = len(plan.churn_steps) (the k-th slice is used at the k-th step with gamma_i > 0), or
        None when K = 0; class_labels: (N, label_dim) float, (N,) int, or None (zeros).
        Returns (N, *sample_shape) in the backend's dtype on its device.
        """
        plan = self.plan
        latents = latents.to(self.device, self.dtype)
        n, k_total = latents.shape[0], len(plan.churn_steps)
        if k_total and (churn_noise is None or churn_noise.shape[0] != k_total):
            raise ValueError(f"the plan needs {k_total} churn draws of shape "
                             f"{tuple(latents.shape)}")
        labels = self._labels(class_labels, n)
        hat = [self._sigma_vector(t, n) for t in plan.t_hats]  # all per-step vectors up front
        nxt = [self._sigma_vector(t, n) for t in plan.sigmas[1:]]
        bad, k = [], 0
        x = latents * plan.sigmas[0]  # Alg. 2 l.1: x_0 ~ N(0, t_0^2 I)
        for i in range(plan.num_steps):  # 0, ..., N-1
            t_hat, t_next = plan.t_hats[i], plan.sigmas[i + 1]
            x_hat = x
            if plan.gammas[i] > 0:  # Alg. 2 l.5-6: x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps
                x_hat = x + plan.churn_std(i) * churn_noise[k].to(self.device, self.dtype)
                k += 1
            denoised = self._denoise(x_hat, hat[i], labels)
            d_cur = (x_hat - denoised) / t_hat  # Alg. 2 l.7
            x = x_hat + (t_next - t_hat) * d_cur  # Alg. 2 l.8 (Euler step)
            bad.append(~torch.isfinite(denoised).all())
            if plan.solver == "heun" and t_next > 0:  # Alg. 2 l.9-11: second-order correction
                denoised = self._denoise(x, nxt[i], labels)
                d_prime = (x - denoised) / t_next
                x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
                bad.append(~torch.isfinite(denoised).all())
        if bad and bool(torch.stack(bad).any()):  # one host sync, at the end
            raise NonFiniteError("ONNX Runtime returned NaN/Inf during sampling")
        return x

    __call__ = run
