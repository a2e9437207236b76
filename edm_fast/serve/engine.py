"""The server's sampling engine: one denoiser, one evaluator of D shared by every plan.

A request names a plan (solver, steps, guidance); plans are host-side float64 arithmetic
(``plan.SamplingPlan``), cheap to build and cached. Every plan runs through the Python executor
(``backends.executor``) over the same evaluator D(x; sigma, labels), which is built once and
warmed at start-up for every batch bucket (and twice the bucket for classifier-free guidance,
which evaluates N conditional and N unconditional rows at once). So no request waits for a
compile, an export or a graph capture, whatever plan it asks for.

Guidance (``guidance.Guidance``): without a guide, a request's weight w means classifier-free
guidance D_u + w (D_c - D_u); with a guide model (``guide=``, ``--guide-ckpt``) it means
autoguidance D_g + w (D - D_g) (Karras et al. 2024, arXiv 2406.02507, Eq. 1), the guide's
evaluator built and warmed like the main one, at the bucket sizes. Either way a guided
evaluation costs two denoiser rows per seed.

Network precision (``net_dtype``, edm_fast.precision): resolved once, as ``Sampler`` resolves
it ('auto' says what it chose); the evaluators run the network (and the guide's) in it while
the sampler state stays in ``dtype``. A precision the device or the evaluator cannot run is
refused at start-up.

Evaluators (``--backend``; 'auto' takes the first that builds, in SERVER_ORDER):
    onnx      ONNX Runtime session of D (exported once, dynamic batch; I/O bound per row count)
    compiled  torch.compile(D) with static shapes; on CUDA each evaluation of a row count is one
              captured CUDA graph (not a whole-loop graph per plan: every plan shares them)
    reference the eager module (exact; also the only choice for an analytic toy denoiser)
Unlike ``Sampler(backend='auto')``, no small-job rule applies: a server amortises any warm-up.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings

import torch

from ..errors import EdmFastError
from ..guidance import Guidance
from ..noise import SeedNoise
from ..precision import short_name
from ..program import EVAL
from ..sampling.backends import auto_candidates, load_backend
from ..sampling.backends.executor import SigmaVectorCache, run_program
from ..sampling.network_precision import network_in_dtype
from ..sampling.sampler import Sampler, plan_for_model

__all__ = ["SERVER_ORDER", "Engine", "ServedPlan", "pow2_sizes"]

log = logging.getLogger("edm_fast.serve")
SERVER_ORDER = {"cuda": ["compiled", "onnx", "reference"], "cpu": ["onnx", "compiled", "reference"]}
EVALUATORS = ("auto", "onnx", "compiled", "reference")


def pow2_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch, and max_batch itself."""
    return sorted({1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch}
                  | {max_batch})


class GraphedEvaluator:
    """``fn(x, sigma, labels)`` replayed as one CUDA graph per (row count, labelled), captured
    on first use (the engine's warm-up); on other devices ``fn`` itself. Not thread-safe: the
    engine runs one batch at a time."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device, self.graphs = fn, device, {}

    def __call__(self, x, sigma, labels=None):
        if self.device.type != "cuda":
            return self.fn(x, sigma, labels)
        key = (tuple(x.shape), labels is not None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, sigma, labels)
        graph, inputs, out = self.graphs[key]
        for static, value in zip(inputs, (x, sigma, labels)):
            if static is not None:
                static.copy_(value)
        graph.replay()
        return out.clone()

    def _capture(self, x, sigma, labels):
        inputs = [t.clone() if t is not None else None for t in (x, sigma, labels)]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # compile and autotune outside the capture
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*inputs)
        return graph, inputs, out


class ServedPlan:
    """A plan, its sigma vectors per batch size, and ``cost``: the denoiser rows one seed costs
    (its evaluations, doubled where guidance applies)."""

    def __init__(self, plan, sigmas: SigmaVectorCache):
        self.plan, self.sigmas = plan, sigmas
        guided = plan.guidance is not None
        self.cost = sum(1 + (guided and op.guided) for op in plan.program.ops if op.kind == EVAL)


class Engine:
    """Load a model once, build and warm its evaluator, run batches of any plan.

    Args:
        model: a model name or checkpoint path (``models.load_denoiser``), or a denoiser module.
        device: 'auto', 'cpu', 'cuda', 'cuda:1', ...
        backend: one of EVALUATORS ('auto': the first of SERVER_ORDER that builds).
        batch_sizes: the row counts (buckets) each warmed at start-up; the compiled
            evaluator pads a batch to its bucket, the others less (``rows_for``).
        dtype: the sampler state's dtype (float32, or float64).
        net_dtype: the network's precision, as ``Sampler(net_dtype=)`` takes it ('fp32',
            'bf16', 'fp16', 'auto'; None: the network as loaded); EdmFastError (one line) for
            a precision the device or the evaluator cannot run.
        guide: autoguidance's guide, a module or a checkpoint path / model name (loaded like
            ``model``): a guided request then runs D_g + w (D - D_g) instead of classifier-free
            guidance. It must make samples of the model's shape from the same labels
            (``Sampler``'s check: ValueError naming what differs).
        options: server-wide SamplingPlan options (schedule, sigma_min, S_churn, ...) used by
            every plan; a request gives only solver, steps and guidance.
    """

    def __init__(self, model="default", *, device="auto", backend: str = "auto",
                 batch_sizes=(1, 2, 4, 8, 16, 32, 64), dtype=torch.float32, net_dtype=None,
                 guide=None, **options):
        if backend not in EVALUATORS:
            raise ValueError(f"the server's backend must be one of {', '.join(EVALUATORS)}, "
                             f"got {backend!r}")
        start = time.perf_counter()
        # the probe loads and checks the model, its shape and labels, the guide against them,
        # and resolves net_dtype (warning what 'auto' chose, refusing what cannot run)
        probe = Sampler(model, batch_size=1, num_steps=1, device=device, backend="reference",
                        dtype=dtype, net_dtype=net_dtype, guide=guide,
                        guidance=None if guide is None else 1.0)
        self.denoiser, self.device, self.dtype = probe.denoiser, probe.device, probe.dtype
        self.guide, self.net_dtype = probe.guide, probe.net_dtype
        self.shape, self.label_dim = tuple(probe.shape), probe.label_dim
        self.class_names = probe.class_names
        self.options = options
        self.batch_sizes = sorted({int(b) for b in batch_sizes})
        if not self.batch_sizes or self.batch_sizes[0] < 1:
            raise ValueError(f"batch sizes must be integers >= 1, got {batch_sizes!r}")
        self.backend_name, (self.evaluate, self.evaluate_guide) = self._build(backend)
        self.eval_seconds, self.guide_seconds = self._warm_up()
        self.warmup_seconds = time.perf_counter() - start
        log.info("backend %s (network %s, %s) warmed for %s rows in %.1f s", self.backend_name,
                 short_name(self.net_dtype), self.guidance_kind or "no guidance",
                 sorted(self.eval_seconds), self.warmup_seconds)

    @property
    def guidance_kind(self) -> str | None:
        """What a request's guidance weight means here: 'autoguidance' (a guide model),
        'classifier-free' (a class-conditional model), or None (no guidance possible)."""
        if self.guide is not None:
            return "autoguidance"
        return "classifier-free" if self.label_dim else None

    # -- evaluators -----------------------------------------------------------------------------
    def _build(self, requested: str):
        """(name, (evaluator of D, evaluator of the guide or None)) of the evaluator asked for,
        or for 'auto' of the first that builds."""
        forced = os.environ.get("EDM_FAST_BACKEND")
        names = [forced or requested] if (forced or requested) != "auto" else self._auto()
        skipped = []
        for name in names:
            try:
                return name, self._evaluators(name)
            except Exception as exc:
                if len(names) == 1 or name == "reference":
                    raise
                skipped.append(f"{name}: {type(exc).__name__}: {exc}")
        raise RuntimeError("no evaluator could be built: " + "; ".join(skipped))

    def _auto(self) -> list[str]:
        from ..precond import Denoiser

        if not isinstance(self.denoiser, Denoiser):  # an analytic toy: nothing to compile
            return ["reference"]
        loadable, skipped = auto_candidates(self.device, None, self.dtype, self.net_dtype,
                                            guide=self.guide is not None)
        names, reasons = {cls.name for cls in loadable}, dict(skipped)
        preferred = SERVER_ORDER.get(self.device.type, ["compiled", "reference"])
        order = [n for n in preferred if n in names or n == "reference"]
        if order[0] != preferred[0]:
            why = [reasons.get(n, f"{n}: not used for a {short_name(self.net_dtype)} network on "
                                  f"{self.device.type}")
                   for n in preferred[:preferred.index(order[0])]]
            warnings.warn("edm-fast serve: using the '" + order[0] + "' evaluator; "
                          + "; ".join(why), RuntimeWarning, stacklevel=4)
        return order

    def _evaluators(self, name: str):
        """(D, D_g or None) as evaluators ``fn(x, sigma, labels)`` of the named kind, the
        network(s) in ``net_dtype``."""
        if name == "reference":
            return (network_in_dtype(self.denoiser, self.net_dtype),
                    None if self.guide is None else network_in_dtype(self.guide, self.net_dtype))
        if name == "onnx":  # the onnx backend's sessions, exported once with a dynamic batch
            if self.net_dtype == torch.bfloat16:
                raise EdmFastError("the server's onnx evaluator runs a fp32 or fp16 network "
                                   "(ONNX Runtime has no bf16 convolutions); for --net-dtype "
                                   "bf16 use --backend compiled or reference")
            cls = load_backend("onnx")
            guided = {} if self.guide is None else {"guide": self.guide, "guidance": 1.0}
            plan = plan_for_model(self.denoiser, num_steps=1, **guided)
            self._onnx = cls(self.denoiser, plan, (self.batch_sizes[-1], *self.shape),
                             dtype=self.dtype, device=self.device, label_dim=self.label_dim,
                             net_dtype=self.net_dtype, guide=self.guide)
            return self._onnx.evaluate, self._onnx.guide
        if name == "compiled":
            load_backend("compiled")
            import torch._dynamo.config as dynamo_config

            for limit in ("recompile_limit", "cache_size_limit"):  # a graph per row count
                if hasattr(dynamo_config, limit):
                    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 64))
                    break
            # as the compiled backend: Inductor's freezing for a bf16/fp16 network on the CPU
            reduced = self.net_dtype in (torch.bfloat16, torch.float16)
            options = {"freezing": True} if reduced and self.device.type == "cpu" else None

            def compiled(module):
                module = network_in_dtype(module, self.net_dtype)
                return GraphedEvaluator(torch.compile(module, dynamic=False, options=options),
                                        self.device)
            return compiled(self.denoiser), None if self.guide is None else compiled(self.guide)
        raise ValueError(f"unknown evaluator {name!r}")

    def _rows(self) -> list[int]:
        """The row counts the main evaluator sees: every bucket, and twice each for
        classifier-free guidance (the guide, if any, sees the buckets only)."""
        twice = self.label_dim and self.guide is None
        return sorted({b * k for b in self.batch_sizes for k in ((1, 2) if twice else (1,))})

    @torch.no_grad()
    def _warm_up(self) -> tuple[dict[int, float], dict[int, float]]:
        """Evaluate every row count once (compile, export, graph capture happen here) and time
        a second evaluation: rows -> seconds, of D and of the guide ({} without one)."""
        seconds = ({}, {})
        for rows in self._rows():
            x = torch.zeros((rows, *self.shape), dtype=self.dtype, device=self.device)
            sigma = torch.ones(rows, dtype=self.dtype, device=self.device)
            labels = (torch.zeros(rows, self.label_dim, dtype=self.dtype, device=self.device)
                      if self.label_dim else None)
            for evaluate, timed in zip((self.evaluate, self.evaluate_guide), seconds):
                if evaluate is None:
                    continue
                evaluate(x, sigma, labels)
                self._sync()
                t0 = time.perf_counter()
                evaluate(x, sigma, labels)
                self._sync()
                timed[rows] = time.perf_counter() - t0
        return seconds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- plans ----------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=256)  # noqa: B019 (bounded; the engine lives as long)
    def plan(self, solver: str, steps: int, guidance: float | None) -> ServedPlan:
        """The plan of (solver, steps, guidance) with the server-wide options; ValueError for a
        combination the planner refuses (an option the solver does not read, ...)."""
        if guidance is not None and self.guidance_kind is None:
            raise ValueError("guidance needs a class-conditional model, or a guide model "
                             "(--guide-ckpt: autoguidance)")
        options = dict(self.options)
        if guidance is None:  # a server-wide interval applies to guided requests only
            options.pop("guidance_interval", None)
        guide = self.guide if guidance is not None else None  # Sampler(guide=)'s sigma range
        plan = plan_for_model(self.denoiser, solver=solver, num_steps=steps, guidance=guidance,
                              guide=guide, **options)
        return ServedPlan(plan, SigmaVectorCache(plan.program, self.dtype, self.device))

    def longest_batch_seconds(self, batch_cost: int, max_evals: int) -> float:
        """An upper estimate of one batch's time: r rows (bucket b) of a batch of at most
        ``batch_cost`` rows x evaluations run at most min(max_evals, batch_cost // r)
        evaluations of b rows (guided: of 2b rows, or of b rows and b guide rows); a single row
        may exceed the cost."""
        worst, lo = 0.0, 1
        for b in self.batch_sizes:
            evals = max_evals if lo == 1 else min(max_evals, batch_cost // lo)
            worst = max(worst, evals * self._guided_eval_seconds(b))
            lo = b + 1
        return worst

    def _guided_eval_seconds(self, b: int) -> float:
        """The warm-up time of one evaluation of bucket b as a guided plan runs it."""
        if self.guide is not None:
            return self.eval_seconds[b] + self.guide_seconds[b]
        return self.eval_seconds[2 * b if self.label_dim else b]

    # -- sampling -------------------------------------------------------------------------------
    def rows_for(self, n: int) -> int:
        """The row count a batch of n seeds runs at. The compiled evaluator has static shapes
        (a graph per row count), so n is padded to its bucket. ONNX Runtime and eager PyTorch
        take any batch: n is rounded up to a multiple of 8 only (above 8), which bounds the
        number of row counts (and ONNX Runtime's bound buffers) without paying for a bucket's
        padding, e.g. 17 seeds run as 24 rows, not 32."""
        if self.backend_name == "compiled":
            return next((b for b in self.batch_sizes if b >= n), n)
        return n if n <= 8 else -(-n // 8) * 8

    @torch.no_grad()
    def sample(self, served: ServedPlan, seeds: list[int],
               labels: list[int | None]) -> torch.Tensor:
        """(N, *shape) float32 CPU rows for ``seeds`` under the plan, padded to ``rows_for(N)``
        rows; per-seed noise (noise.SeedNoise), so a row does not depend on the rest of its
        batch."""
        plan, n = served.plan, len(seeds)
        size = self.rows_for(n)
        stream = SeedNoise(seeds + seeds[:1] * (size - n), self.shape, device=self.device,
                           dtype=self.dtype)
        latents, draws = stream.draw(), stream.draw_many(plan.num_noise)
        onehot = None
        if self.label_dim:
            onehot = torch.zeros(size, self.label_dim, dtype=self.dtype)
            for row, c in enumerate(labels):
                if c is not None:
                    onehot[row, c] = 1
            onehot = onehot.to(self.device)
        guide = self.evaluate_guide if plan.guidance is not None else None
        out = run_program(plan.program, self.evaluate, latents, draws if plan.num_noise else None,
                          onehot, guidance=Guidance(plan.guidance, guide=guide),
                          sigmas=served.sigmas(size))
        return out[:n].float().cpu()
