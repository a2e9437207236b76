"""The compiled backend: torch.compile'd denoiser, fused Triton step kernels, one CUDA graph.

Per step i (EDM Alg. 2), with every per-step scalar precomputed as a static (N,) tensor:
    churn        x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps       (l.5-6; only if gamma_i > 0)
    Euler        D = denoise(x_hat, t_hat); x_next, d = Euler(x_hat, D, t_hat, t_next)   (l.7-8)
    Heun         D' = denoise(x_next, t_next); x_next = Heun(x_hat, d, x_next, D')    (l.9-11)
Two ways to run the arithmetic around the network:
    'triton'  (CUDA, or the Triton interpreter on request): for an EDM-style ``Denoiser`` without
              guidance the preconditioning is fused into the step kernels of edm_fast.kernels:
              precond_in -> F -> precond_out_euler / precond_out_heun (3 launches + F per Heun
              step); other denoisers use the compiled D with euler_step / heun_correct / churn.
    'torch'   plain tensor ops (Inductor fuses them when ``compile_steps``).
The network (or the whole denoiser) goes through ``torch.compile`` with static shapes; sigma is
always a tensor, so the 2N-1 evaluations share one compiled graph (no recompilation per step).
On CUDA the entire N-step loop is then captured as one CUDA graph with static input/output
buffers per (batch, shape, dtype), and each call is a copy-in, one replay and a copy-out.
"""

from __future__ import annotations

import shutil
import time

import torch

from ..guidance import GuidedDenoiser
from ..precond import Denoiser
from ..samplers import check_finite_samples
from .plan import SamplingPlan

__all__ = ["CompiledBackend"]


def _vector(value: float, n: int, dtype, device) -> torch.Tensor:
    return torch.full((n,), float(value), dtype=dtype, device=device)


# Every compiled Sampler adds a static-shape graph of the same forward code (one per model and
# batch shape); past TorchDynamo's recompile limit (8 by default) the next one would silently run
# eagerly. A server or benchmark that builds more Samplers than that in one process needs more.
RECOMPILE_LIMIT = 64


def _allow_many_compiled_samplers() -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
            break


class CompiledBackend:
    """See the module docstring. Options: compile (torch.compile the net), cuda_graph (default
    on CUDA), step_impl ('auto' | 'triton' | 'torch'), compile_mode (torch.compile mode)."""

    name = "compiled"

    @staticmethod
    def unavailable_reason() -> str | None:
        if not hasattr(torch, "compile"):
            return "torch.compile is not available in this torch"
        return None

    def __init__(self, denoiser, plan: SamplingPlan, batch_shape, *, dtype, device, label_dim,
                 compile: bool = True, cuda_graph: bool | None = None, step_impl: str = "auto",
                 compile_mode: str | None = None, compile_steps: bool = False):
        start = time.perf_counter()
        self.plan, self.dtype, self.device = plan, dtype, torch.device(device)
        self.batch_shape = tuple(batch_shape)
        self.n = self.batch_shape[0]
        self.label_dim = label_dim
        if compile and self.device.type == "cpu" and shutil.which("c++") is None \
                and shutil.which("g++") is None:
            raise RuntimeError("torch.compile on the CPU needs a C++ compiler (c++/g++)")
        use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if use_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA device")
        if use_graph and compile and compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_mode={compile_mode!r} captures CUDA graphs of its own, "
                             "inside this backend's graph of the whole loop; use None or "
                             "'max-autotune-no-cudagraphs', or cuda_graph=False")
        if compile:
            _allow_many_compiled_samplers()
        self.step_impl = self._pick_step_impl(step_impl)
        guided = plan.guidance is not None
        self.fused_precond = (self.step_impl == "triton" and isinstance(denoiser, Denoiser)
                              and not guided)
        if self.fused_precond:
            self.precond = denoiser.precond
            self.net_dtype = denoiser._model_dtype(torch.empty((), dtype=dtype))
            net = denoiser.model
            self.net = torch.compile(net, dynamic=False, mode=compile_mode) if compile else net
        den = GuidedDenoiser(denoiser, plan.guidance) if guided else denoiser
        self.denoise = torch.compile(den, dynamic=False, mode=compile_mode) if compile else den
        self.kernels = None
        if self.step_impl == "triton":
            from .. import kernels

            self.kernels = kernels
        self._math = {"euler": _euler_torch, "heun": _heun_torch, "churn": _churn_torch}
        if compile_steps and self.step_impl == "torch":
            self._math = {k: torch.compile(f, dynamic=False) for k, f in self._math.items()}
        self._build_constants()
        self.graph = None
        self._static_labels = None
        self._eval_graphs: dict = {}
        if use_graph:
            self._capture()
        else:
            self._warmup()
        self.warmup_seconds = time.perf_counter() - start

    # -- set-up ---------------------------------------------------------------------------------
    def _pick_step_impl(self, requested: str) -> str:
        if requested not in ("auto", "triton", "torch"):
            raise ValueError(f"step_impl must be auto, triton or torch, got {requested!r}")
        from ..kernels import triton_available

        ok = triton_available(self.device)
        if requested == "triton" and not ok:
            raise RuntimeError("step_impl='triton' needs Triton on a CUDA device (or "
                               "TRITON_INTERPRET=1 on the CPU); EDM_FAST_DISABLE_TRITON may be set")
        if requested == "auto":
            return "triton" if ok and self.device.type == "cuda" else "torch"
        return requested

    def _build_constants(self) -> None:
        """Every per-step scalar as a static (N,) tensor on the device (EDM Alg. 2: gamma_i,
        l.5)."""
        plan, n, dt, dev = self.plan, self.n, self.dtype, self.device
        self.t_hat = [_vector(v, n, dt, dev) for v in plan.t_hats]
        self.t_next = [_vector(v, n, dt, dev) for v in plan.sigmas[1:]]
        self.t_cur = [_vector(v, n, dt, dev) for v in plan.sigmas[:-1]]
        self.coef_hat, self.coef_next = [], []
        if self.fused_precond:
            for vecs, out in ((self.t_hat, self.coef_hat), (self.t_next, self.coef_next)):
                for t in vecs:
                    safe = torch.where(t > 0, t, torch.ones_like(t))  # t_N = 0 is never evaluated
                    c_skip, c_out, c_in, c_noise = self.precond.coefficients(safe)
                    out.append((c_skip, c_out, c_in, c_noise.to(_noise_dtype(self.net_dtype))))

    def _labels_buffer(self, labels):
        if self.label_dim == 0:
            return None
        if labels is None:
            labels = torch.zeros(self.n, self.label_dim)
        return labels.to(self.device, self.dtype if not self.fused_precond else self.net_dtype)

    # -- one step -------------------------------------------------------------------------------
    def _evaluate(self, x, i: int, which: str, labels):
        """F-based (fused precond) or D-based evaluation at t_hat_i / t_{i+1}."""
        t = self.t_hat[i] if which == "hat" else self.t_next[i]
        if not self.fused_precond:
            return self.denoise(x, t, labels)
        c_skip, c_out, c_in, c_noise = (self.coef_hat if which == "hat" else self.coef_next)[i]
        x_in = self.kernels.precond_in(x, c_in).to(self.net_dtype)  # Eq. 7: c_in x
        return self.net(x_in, c_noise, labels, None), c_skip, c_out

    def _loop(self, latents, churn, labels):
        plan, K = self.plan, self.kernels
        x = latents * plan.sigmas[0]  # Alg. 2 l.2
        k = 0
        for i in range(plan.num_steps):
            t_hat, t_next = self.t_hat[i], self.t_next[i]
            if plan.gammas[i] > 0:  # Alg. 2 l.5-6
                eps = churn[k]
                k += 1
                if K is not None:
                    x = K.churn(x, eps, self.t_cur[i], t_hat, plan.S_noise)
                else:
                    x = self._math["churn"](x, eps, self.t_cur[i], t_hat, plan.S_noise)
            x_hat = x
            heun = plan.solver == "heun" and plan.sigmas[i + 1] > 0
            if self.fused_precond:
                F_x, c_skip, c_out = self._evaluate(x_hat, i, "hat", labels)
                x, d_cur = K.precond_out_euler(x_hat, F_x, c_skip, c_out, t_hat, t_next)
                if heun:
                    F_n, c_skip_n, c_out_n = self._evaluate(x, i, "next", labels)
                    x = K.precond_out_heun(x_hat, d_cur, x, F_n, c_skip_n, c_out_n, t_hat, t_next)
                continue
            denoised = self._evaluate(x_hat, i, "hat", labels).to(self.dtype)
            if K is not None:
                x, d_cur = K.euler_step(x_hat, denoised, t_hat, t_next)
            else:
                x, d_cur = self._math["euler"](x_hat, denoised, t_hat, t_next)
            if heun:
                denoised = self._evaluate(x, i, "next", labels).to(self.dtype)
                if K is not None:
                    x = K.heun_correct(x_hat, d_cur, x, denoised, t_hat, t_next)
                else:
                    x = self._math["heun"](x_hat, d_cur, x, denoised, t_hat, t_next)
        return x

    # -- warm-up and CUDA graph -------------------------------------------------------------------
    def _example_inputs(self):
        latents = torch.randn(self.batch_shape, dtype=self.dtype, device=self.device)
        churn = torch.randn((len(self.plan.churn_steps), *self.batch_shape), dtype=self.dtype,
                            device=self.device)
        return latents, churn, self._labels_buffer(None)

    @torch.no_grad()
    def _warmup(self) -> None:
        """Trigger compilation now, so that it counts as warm-up and not as the first call."""
        self._loop(*self._example_inputs())

    def _graph_of(self, fn, *args):
        """(graph, output) of ``fn(*args)`` captured on this backend's device: two warm-up runs
        on a side stream first (compilation, autotuning and lazy initialisation stay outside the
        capture). ``thread_local`` capture lets other threads (a server's) use CUDA meanwhile."""
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn(*args)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = fn(*args)
        return graph, out

    @torch.no_grad()
    def _capture(self) -> None:
        self._static_latents, self._static_churn, self._static_labels = self._example_inputs()
        self.graph, self._static_out = self._graph_of(
            self._loop, self._static_latents, self._static_churn, self._static_labels)

    # -- public ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluation(self, x, sigma, class_labels=None):
        """A zero-argument callable that runs one denoiser evaluation D(x; sigma) exactly as the
        loop runs it, with its inputs prepared beforehand (for benchmarks: t_F). In CUDA-graph
        mode it replays a graph of its own, so it is timed without the Python and launch costs
        the sampling graph does not pay either."""
        x = x.to(self.device, self.dtype)
        sigma = torch.as_tensor(sigma, dtype=self.dtype, device=self.device)
        sigma = sigma.expand(x.shape[0]).contiguous() if sigma.ndim == 0 else sigma
        labels = self._labels_buffer(class_labels)
        if labels is not None and labels.shape[0] == 1:  # one label row for the whole batch
            labels = labels.expand(x.shape[0], -1)
        if self.graph is None:
            return lambda: self._evaluate_direct(x, sigma, labels)
        key = (tuple(x.shape), labels is not None)  # one graph per input shape
        if key not in self._eval_graphs:
            inputs = [x.clone(), sigma.clone(), None if labels is None else labels.clone()]
            graph, out = self._graph_of(self._evaluate_direct, *inputs)
            self._eval_graphs[key] = (graph, inputs, out)
        graph, inputs, out = self._eval_graphs[key]
        for static, value in zip(inputs, (x, sigma, labels)):
            if static is not None:
                static.copy_(value)

        def replay():
            graph.replay()
            return out
        return replay

    def evaluate_once(self, x, sigma, class_labels=None) -> torch.Tensor:
        """One denoiser evaluation D(x; sigma) as the loop runs it."""
        return self.evaluation(x, sigma, class_labels)().clone()

    def _evaluate_direct(self, x, sigma, labels):
        if not self.fused_precond:
            return self.denoise(x, sigma, labels)
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma.to(self.dtype))
        x_in = self.kernels.precond_in(x, c_in).to(self.net_dtype)
        F_x = self.net(x_in, c_noise.to(_noise_dtype(self.net_dtype)), labels, None)
        return self.kernels.precond_out(x, F_x, c_skip, c_out)

    @torch.no_grad()
    def run(self, latents, churn_noise=None, class_labels=None) -> torch.Tensor:
        if tuple(latents.shape) != self.batch_shape:
            raise ValueError(f"this backend was built for batch shape {self.batch_shape}, got "
                             f"{tuple(latents.shape)}")
        k = len(self.plan.churn_steps)
        if k and (churn_noise is None or churn_noise.shape[0] != k):
            raise ValueError(f"the plan needs {k} churn draws")
        if self.graph is None:
            churn = churn_noise.to(self.device, self.dtype) if k else None
            out = self._loop(latents.to(self.device, self.dtype), churn,
                             self._labels_buffer(class_labels))
        else:
            with torch.cuda.device(self.device):
                self._static_latents.copy_(latents)
                if k:
                    self._static_churn.copy_(churn_noise)
                if self._static_labels is not None:
                    self._static_labels.copy_(class_labels if class_labels is not None else 0)
                self.graph.replay()
                out = self._static_out.clone()
        return check_finite_samples(out)  # the one host sync, after the loop


def _noise_dtype(net_dtype):
    return torch.float32 if net_dtype in (torch.float16, torch.bfloat16) else net_dtype


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _euler_torch(x_hat, denoised, t_hat, t_next):
    """Alg. 2 l.7-8: d = (x_hat - D)/t_hat, x_next = x_hat + (t_next - t_hat) d."""
    d_cur = (x_hat - denoised) / _bcast(t_hat, x_hat)
    return x_hat + _bcast(t_next - t_hat, x_hat) * d_cur, d_cur


def _heun_torch(x_hat, d_cur, x_next, denoised, t_hat, t_next):
    """Alg. 2 l.10-11: d' = (x_next - D')/t_next, x_next = x_hat + h (d/2 + d'/2)."""
    d_prime = (x_next - denoised) / _bcast(t_next, x_hat)
    return x_hat + _bcast(t_next - t_hat, x_hat) * (0.5 * d_cur + 0.5 * d_prime)


def _churn_torch(x, eps, t_cur, t_hat, S_noise):
    """Alg. 2 l.6: x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps."""
    std = ((t_hat - t_cur) * (t_hat + t_cur)).clamp_min(0).sqrt() * S_noise
    return x + _bcast(std, x) * eps
