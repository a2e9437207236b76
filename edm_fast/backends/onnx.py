"""The 'onnx' backend: EDM Algorithm 2 in torch around an ONNX Runtime session of D.

At construction the denoiser D(x; sigma, labels) is exported once with ``export_onnx`` (dynamic
batch, checked against PyTorch) and loaded into an ``onnxruntime.InferenceSession``; export,
check, session creation and one warm-up evaluation are reported as ``warmup_seconds``. ``run``
then executes a ``SamplingPlan`` (host scalars t_i, t_hat_i, gamma_i), step i:

    churn   x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps_k          (l.5-6; only if gamma_i > 0)
    Euler   d = (x_hat - D(x_hat; t_hat)) / t_hat,  x' = x_hat + (t_next - t_hat) d      (l.7-8)
    Heun    d' = (x' - D(x'; t_next)) / t_next,  x' = x_hat + (t_next - t_hat)(d/2 + d'/2) (l.9-11)

with the step math in torch (the backend's dtype) on the session's device and one session call
per evaluation. The session's inputs and outputs are float32 buffers bound once per batch size
(``_Slots``); the step math is rearranged into three or four tensor ops per step (see ``run``)
and NaN/Inf are checked once, at the end, because at small batches every op's dispatch costs
more than its arithmetic. Classifier-free guidance evaluates the conditional and unconditional
rows as one batch of 2N, D_w = D_u + w (D_c - D_u), like ``guidance.GuidedDenoiser``.

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

from ..guidance import one_hot_labels
from ..onnx_export import OUTPUT_NAME, _net_dtype, export_onnx, make_session, read_onnx_metadata
from ..samplers import check_finite_samples
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


class _Evaluation:
    """One evaluation slot at a fixed row count: float32 input, sigma, label and output buffers
    bound once to an ``IOBinding`` (no per-call binding, no host round trip).

    Each call copies x into the input buffer (twice for guidance: conditional rows, then the
    unconditional ones), sets sigma and runs the session; ONNX Runtime writes D into the output
    buffer in place. The result aliases that buffer and is valid until this slot's next call.
    """

    def __init__(self, session, device: torch.device, rows: int, sample_shape,
                 labels: torch.Tensor | None, guidance: float | None):
        import numpy as np

        float32 = np.float32
        self.session, self.device, self.guidance = session, device, guidance
        self.x = torch.zeros((rows, *sample_shape), dtype=torch.float32, device=device)
        self.sigma = torch.ones((rows,), dtype=torch.float32, device=device)
        self.out = torch.empty_like(self.x)
        where = "cuda" if device.type == "cuda" else "cpu"
        index = ((device.index if device.index is not None else torch.cuda.current_device())
                 if device.type == "cuda" else 0)
        inputs = {"x": self.x, "sigma": self.sigma, "class_labels": labels}
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

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """D(x; sigma) in float32 (guided: D_u + w (D_c - D_u)); sigma: a float, or a vector
        with one entry per input row."""
        n = x.shape[0]
        self.x[:n].copy_(x)
        if self.guidance is not None:
            self.x[n:].copy_(x)
        if isinstance(sigma, torch.Tensor):
            self.sigma.copy_(sigma)
        else:
            self.sigma.fill_(sigma)
        if self.device.type == "cuda":  # ORT runs on its own stream: torch's writes must be done
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(self.binding)  # returns once the outputs are written
        if self.guidance is None:
            return self.out
        return torch.lerp(self.out[n:], self.out[:n], self.guidance)  # D_u + w (D_c - D_u)


class _Slots:
    """The buffers of one batch size: a shared label buffer and two evaluation slots (D at
    t_hat and D at t_next, so that the first result survives the Heun correction's call)."""

    def __init__(self, session, device, n: int, sample_shape, label_dim: int,
                 guidance: float | None):
        rows = 2 * n if guidance is not None else n
        self.labels = (torch.zeros((rows, label_dim), dtype=torch.float32, device=device)
                       if label_dim > 0 else None)
        self.hat = _Evaluation(session, device, rows, sample_shape, self.labels, guidance)
        self.next = _Evaluation(session, device, rows, sample_shape, self.labels, guidance)

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """(N, L) float32 conditional labels; the unconditional rows of guidance stay zero."""
        if self.labels is not None:
            self.labels[: labels.shape[0]].copy_(labels)


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
        self._slots: dict[int, _Slots] = {}
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
        self._slots_for(n).hat(torch.zeros(self.batch_shape, device=self.device), 1.0)

    # -- buffers --------------------------------------------------------------------------------
    def _slots_for(self, n: int) -> _Slots:
        """The bound buffers for batch size n, made on first use (calls are serialised by the
        Sampler's lock, so one set per size is enough)."""
        slots = self._slots.get(n)
        if slots is None:
            slots = self._slots[n] = _Slots(self.session, self.device, n, self.batch_shape[1:],
                                            self.label_dim, self.plan.guidance)
        return slots

    def _labels(self, class_labels, n: int) -> torch.Tensor | None:
        """(N, L) float32 one-hot or given labels on the device; None when unconditional."""
        if self.label_dim <= 0:
            if class_labels is not None:
                raise ValueError("this denoiser is unconditional; class_labels must be None")
            return None
        return one_hot_labels(class_labels, self.label_dim, batch=n, device=self.device,
                              dtype=torch.float32)

    # -- public ---------------------------------------------------------------------------------
    def evaluation(self, x, sigma, class_labels=None):
        """A zero-argument callable that runs one denoiser evaluation D(x; sigma) exactly as
        the loop runs it, with its inputs prepared beforehand (for benchmarks: t_F). Its result
        aliases a buffer: valid until the backend's next evaluation."""
        x = x.to(self.device, self.dtype)
        n = x.shape[0]
        slots = self._slots_for(n)
        slots.set_labels(self._labels(class_labels, n))
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.to(self.device, torch.float32).reshape(-1).expand(n)
            if self.plan.guidance is not None:
                sigma = torch.cat([sigma, sigma])
        else:
            sigma = float(sigma)

        @torch.no_grad()
        def evaluate():
            return slots.hat(x, sigma).to(self.dtype)
        return evaluate

    def evaluate_once(self, x, sigma, class_labels=None) -> torch.Tensor:
        """One denoiser evaluation D(x; sigma) as the loop runs it."""
        return self.evaluation(x, sigma, class_labels)().clone()

    @torch.no_grad()
    def run(self, latents: torch.Tensor, churn_noise: torch.Tensor | None = None,
            class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Alg. 2 from x_0 = latents * t_0.

        latents: (N, *sample_shape) unit-variance noise; churn_noise: (K, N, *sample_shape) with
        K = len(plan.churn_steps) (the k-th slice is used at the k-th step with gamma_i > 0), or
        None when K = 0; class_labels: (N, label_dim) float, (N,) int, or None (zeros).
        Returns (N, *sample_shape) in the backend's dtype on its device.
        """
        plan, dtype = self.plan, self.dtype
        latents = latents.to(self.device, dtype)
        n, k_total = latents.shape[0], len(plan.churn_steps)
        if k_total and (churn_noise is None or churn_noise.shape[0] != k_total):
            raise ValueError(f"the plan needs {k_total} churn draws of shape "
                             f"{tuple(latents.shape)}")
        slots = self._slots_for(n)
        slots.set_labels(self._labels(class_labels, n))
        k = 0
        x = latents * plan.sigmas[0]  # Alg. 2 l.2: x_0 ~ N(0, t_0^2 I)
        for i in range(plan.num_steps):  # 0, ..., N-1
            t_hat, t_next = plan.t_hats[i], plan.sigmas[i + 1]
            x_hat = x
            if plan.gammas[i] > 0:  # Alg. 2 l.5-6: x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps
                x_hat = x + plan.churn_std(i) * churn_noise[k].to(self.device, dtype)
                k += 1
            # The step math is written with as few tensor ops as possible, since at small
            # batches each op's dispatch costs more than its arithmetic. With r = t_next/t_hat,
            # Alg. 2 l.7-8, x' = x_hat + (t_next - t_hat)(x_hat - D_1)/t_hat, is the lerp
            # D_1 + r (x_hat - D_1).
            r = t_next / t_hat
            d_1 = slots.hat(x_hat, t_hat).to(dtype)
            x_prime = torch.lerp(d_1, x_hat, r)
            if plan.solver == "heun" and t_next > 0:  # Alg. 2 l.9-11: second-order correction
                d_2 = slots.next(x_prime, t_next).to(dtype)
                # x_hat + h (d_i + d'_i)/2 with h = t_next - t_hat, d'_i = (x' - D_2)/t_next and
                # h d_i = x' - x_hat is (x_hat + x')/2 + h/(2 t_next) (x' - D_2). The difference
                # x' - D_2 is formed first, as in the reference, before its large factor.
                c = (t_next - t_hat) / (2.0 * t_next)
                x = torch.lerp(x_hat, x_prime, 0.5).add_(x_prime - d_2, alpha=c)
            else:
                x = x_prime
        # NaN/Inf in any D (or in the latents) reaches x: every update above is a sum of
        # products that contain x_hat and each D, and IEEE arithmetic never turns a non-finite
        # operand of a sum or product into a finite result (the zero weight of the last step,
        # r = 0, is still a product: 0 * Inf = NaN). So one check (one host sync) at the end.
        return check_finite_samples(x, "ONNX Runtime returned NaN/Inf during sampling")

    __call__ = run
