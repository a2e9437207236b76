"""The Python executor: runs any ``Program`` (program.py) over an evaluator of D.

The reference, compiled and onnx backends all sample through ``execute``; they differ only in
their evaluator (eager module, torch.compile'd module, ONNX Runtime session) and in how the
step arithmetic is done (``lincomb``: plain tensor ops, or the fused Triton kernel). The
executor knows no solver: it walks the ops, holds the registers and calls the evaluator.
"""

from __future__ import annotations

import dataclasses

import torch

from ...guidance import Guidance, GuidedDenoiser
from ...program import EVAL, LATENTS, Program
from ..reference import NonFiniteError

__all__ = ["execute", "run_program", "lincomb_torch", "SigmaVectors", "SigmaVectorCache",
           "unwrap_guided"]


def lincomb_torch(srcs: list[torch.Tensor], coefs: tuple[float, ...]) -> torch.Tensor:
    """sum_j coefs[j] * srcs[j] in the sources' dtype (a new tensor: it may replace a source)."""
    out = srcs[0] * coefs[0]
    for s, c in zip(srcs[1:], coefs[1:]):
        out.add_(s, alpha=c)
    return out


class SigmaVectors:
    """The (N,) sigma vector of every evaluation of a program, made once per batch size before
    any loop runs (so a captured CUDA graph reads static buffers)."""

    def __init__(self, program: Program, n: int, dtype, device):
        values = sorted(set(program.eval_sigmas))
        table = torch.tensor(values, dtype=torch.float64).to(dtype).to(device)
        self.by_value = {v: table[i].expand(n).contiguous() for i, v in enumerate(values)}

    def __getitem__(self, sigma: float) -> torch.Tensor:
        return self.by_value[sigma]


class SigmaVectorCache:
    """``SigmaVectors`` of one program per batch size, made on a backend's first call of that
    size and reused by the next ones."""

    def __init__(self, program: Program, dtype, device):
        self.program, self.dtype, self.device = program, dtype, device
        self._by_batch: dict[int, SigmaVectors] = {}

    def __call__(self, n: int) -> SigmaVectors:
        if n not in self._by_batch:
            self._by_batch[n] = SigmaVectors(self.program, n, self.dtype, self.device)
        return self._by_batch[n]


def execute(program: Program, evaluate, latents: torch.Tensor, noise: torch.Tensor | None,
            labels: torch.Tensor | None, *, guidance: Guidance | None = None,
            sigmas: SigmaVectors | None = None, lincomb=lincomb_torch):
    """Run ``program`` from ``latents`` (N, ...) with injected draws ``noise`` (K, N, ...).

    ``evaluate(x, sigma (N,), labels) -> D`` is the evaluator; ``guidance`` wraps it where the
    plan says so. Returns (x, nonfinite): the result in latents' dtype and a 0-d bool tensor on
    the device, True when any D held NaN/Inf (no host sync here: callers check once)."""
    guidance = guidance or Guidance(None)
    n = latents.shape[0]
    if sigmas is None:
        sigmas = SigmaVectors(program, n, latents.dtype, latents.device)
    regs: list[torch.Tensor | None] = [None] * program.num_registers
    bad = []

    def source(s: int) -> torch.Tensor:
        if s >= 0:
            return regs[s]
        return latents if s == LATENTS else noise[-2 - s]

    for op in program.ops:
        if op.kind == EVAL:
            x = source(op.srcs[0])
            denoised = guidance(evaluate, x, sigmas[op.sigma], labels, op.guided)
            denoised = denoised.to(x.dtype)
            bad.append(torch.isfinite(denoised).all())
            regs[op.dst] = denoised
        else:
            regs[op.dst] = lincomb([source(s) for s in op.srcs], op.coefs)
    nonfinite = ~torch.stack(bad).all() if bad else torch.zeros((), dtype=torch.bool)
    return source(program.output), nonfinite


def run_program(program: Program, evaluate, latents, noise, labels, **options) -> torch.Tensor:
    """``execute`` plus its one host sync: NonFiniteError when a D held NaN/Inf."""
    if program.num_noise and (noise is None or noise.shape[0] < program.num_noise):
        raise ValueError(f"the plan reads {program.num_noise} noise draws, got "
                         f"{0 if noise is None else noise.shape[0]}")
    x, nonfinite = execute(program, evaluate, latents, noise, labels, **options)
    if bool(nonfinite):
        raise NonFiniteError("the denoiser returned NaN/Inf during sampling; check the "
                             "checkpoint and inputs")
    return x


def unwrap_guided(denoiser, plan):
    """(inner denoiser, plan): a ``GuidedDenoiser`` passed as the model is taken apart, its
    weight moved into the plan (guidance is applied once, by the executor's ``Guidance``)."""
    if not isinstance(denoiser, GuidedDenoiser):
        return denoiser, plan
    inner = denoiser.denoiser
    if plan.guidance is None:
        plan = dataclasses.replace(plan, guidance=float(denoiser.guidance))
    return inner, plan
