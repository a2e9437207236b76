"""The compiled backend: the Python executor over a torch.compile'd denoiser, captured as one
CUDA graph on CUDA.

The evaluator is the whole denoiser D (preconditioning included: Inductor fuses it around the
network) through ``torch.compile`` with static shapes; sigma is always a tensor, so every
evaluation of a run shares one compiled graph per batch size (N, and 2N for guidance; an
autoguidance guide is compiled the same way, a graph of its own at N). The step
arithmetic (the program's LIN ops) is one fused Triton kernel per op on CUDA (``step_impl``
'triton', kernels.lincomb) or plain tensor ops ('torch'). On CUDA the executor's whole loop (the
guide's evaluations included) is then captured as one CUDA graph with static input/output
buffers per (batch, shape, dtype): each call is a copy-in, one replay, a copy-out and one host
sync for the NaN/Inf flag.
"""

from __future__ import annotations

import shutil
import time

import torch

from ...guidance import Guidance
from ...plan import SamplingPlan
from ..network_precision import network_in_dtype
from ..reference import NonFiniteError
from .executor import SigmaVectors, execute, lincomb_torch, unwrap_guided

__all__ = ["CompiledBackend"]

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
    """See the module docstring. Options: compile (torch.compile the denoiser), cuda_graph
    (default on CUDA), step_impl ('auto' | 'triton' | 'torch'), compile_mode, net_dtype (the
    network's precision: a copy of the network in bf16/fp16 is compiled), freezing (Inductor
    folds the weights as constants, so that oneDNN packs them once for its AMX/AVX512 kernels;
    default: on for a bf16/fp16 network on the CPU), guide (autoguidance's guide denoiser,
    compiled with the same options and net_dtype)."""

    name = "compiled"

    @staticmethod
    def unavailable_reason() -> str | None:
        if not hasattr(torch, "compile"):
            return "torch.compile is not available in this torch"
        return None

    def __init__(self, denoiser, plan: SamplingPlan, batch_shape, *, dtype, device, label_dim,
                 compile: bool = True, cuda_graph: bool | None = None, step_impl: str = "auto",
                 compile_mode: str | None = None, net_dtype=None, freezing: bool | None = None,
                 guide=None):
        start = time.perf_counter()
        denoiser, self.plan = unwrap_guided(denoiser, plan)
        denoiser = network_in_dtype(denoiser, net_dtype)
        guide = None if guide is None else network_in_dtype(guide, net_dtype)
        self.dtype, self.device = dtype, torch.device(device)
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
        self.lincomb = lincomb_torch
        if self.step_impl == "triton":
            from ...kernels import MAX_SOURCES, lincomb

            def fused(srcs, coefs):  # one launch; a longer sum (no planner writes one) in torch
                return (lincomb if len(srcs) <= MAX_SOURCES else lincomb_torch)(srcs, coefs)

            self.lincomb = fused
        if freezing is None:
            freezing = self.device.type == "cpu" and net_dtype in (torch.bfloat16, torch.float16)
        options = {"freezing": True} if freezing and compile else None
        if options and compile_mode is not None:
            raise ValueError("freezing=True and compile_mode both configure Inductor; pass one")
        def compiled(module):
            return torch.compile(module, dynamic=False, mode=compile_mode,
                                 options=options) if compile else module

        self.denoise = compiled(denoiser)
        self.guide = None if guide is None else compiled(guide)
        self.guidance = Guidance(self.plan.guidance, guide=self.guide)
        self.sigmas = SigmaVectors(self.plan.program, self.n, dtype, self.device)
        self.graph = None
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
        from ...kernels import triton_available

        ok = triton_available(self.device)
        if requested == "triton" and not ok:
            raise RuntimeError("step_impl='triton' needs Triton on a CUDA device (or "
                               "TRITON_INTERPRET=1 on the CPU); EDM_FAST_DISABLE_TRITON may be set")
        if requested == "auto":
            return "triton" if ok and self.device.type == "cuda" else "torch"
        return requested

    def _labels_buffer(self, labels):
        if self.label_dim == 0:
            return None
        if labels is None:
            labels = torch.zeros(self.n, self.label_dim)
        return labels.to(self.device, self.dtype)

    def _loop(self, latents, noise, labels):
        return execute(self.plan.program, self.denoise, latents, noise, labels,
                       guidance=self.guidance, sigmas=self.sigmas, lincomb=self.lincomb)

    # -- warm-up and CUDA graph -------------------------------------------------------------------
    def _example_inputs(self):
        latents = torch.randn(self.batch_shape, dtype=self.dtype, device=self.device)
        noise = torch.randn((self.plan.num_noise, *self.batch_shape), dtype=self.dtype,
                            device=self.device)
        return latents, noise, self._labels_buffer(None)

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
        self._static_latents, self._static_noise, self._static_labels = self._example_inputs()
        self.graph, self._static_out = self._graph_of(
            self._loop, self._static_latents, self._static_noise, self._static_labels)

    # -- public ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluation(self, x, sigma, class_labels=None):
        """A zero-argument callable that runs one denoiser evaluation D(x; sigma) exactly as the
        loop runs it (guided when the plan has guidance), with its inputs prepared beforehand
        (for benchmarks: t_F). In CUDA-graph mode it replays a graph of its own, so it is timed
        without the Python and launch costs the sampling graph does not pay either."""
        x = x.to(self.device, self.dtype)
        sigma = torch.as_tensor(sigma, dtype=self.dtype, device=self.device)
        sigma = sigma.expand(x.shape[0]).contiguous() if sigma.ndim == 0 else sigma
        labels = self._labels_buffer(class_labels)
        if labels is not None and labels.shape[0] == 1:  # one label row for the whole batch
            labels = labels.expand(x.shape[0], -1)

        def direct(x, sigma, labels):
            return self.guidance(self.denoise, x, sigma, labels)

        if self.graph is None:
            return lambda: direct(x, sigma, labels)
        key = (tuple(x.shape), labels is not None)  # one graph per input shape
        if key not in self._eval_graphs:
            inputs = [x.clone(), sigma.clone(), None if labels is None else labels.clone()]
            graph, out = self._graph_of(direct, *inputs)
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

    @torch.no_grad()
    def run(self, latents, noise=None, class_labels=None) -> torch.Tensor:
        """``plan.program`` from ``latents`` (N, ...) with its injected draws ``noise``
        (K, N, ...), K = plan.num_noise, and (N, label_dim) float labels (or None)."""
        if tuple(latents.shape) != self.batch_shape:
            raise ValueError(f"this backend was built for batch shape {self.batch_shape}, got "
                             f"{tuple(latents.shape)}")
        k = self.plan.num_noise
        if k and (noise is None or noise.shape[0] != k):
            raise ValueError(f"the plan reads {k} noise draws")
        if self.graph is None:
            noise = noise.to(self.device, self.dtype) if k else None
            out, nonfinite = self._loop(latents.to(self.device, self.dtype), noise,
                                        self._labels_buffer(class_labels))
        else:
            with torch.cuda.device(self.device):
                self._static_latents.copy_(latents)
                if k:
                    self._static_noise.copy_(noise)
                if self._static_labels is not None:
                    self._static_labels.copy_(class_labels if class_labels is not None else 0)
                self.graph.replay()
                out, nonfinite = (t.clone() for t in self._static_out)
        if bool(nonfinite):  # the one host sync, after the loop
            raise NonFiniteError("the sampled images contain NaN/Inf: the denoiser returned "
                                 "non-finite values; check the checkpoint and inputs")
        return out
