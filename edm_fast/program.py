"""A sampling run as a small linear program over a few buffers: what every executor runs.

Every solver of edm-fast is, per step, a few denoiser evaluations whose inputs and whose update
are linear combinations of a handful of buffers: the state, earlier outputs D_j, injected noise.
A ``Program`` is that, written out once on the host in float64 (``solvers.py`` writes them):

    LIN   r_dst = sum_j c_j * src_j                  (the step arithmetic: one fused pass)
    EVAL  r_dst = D(src; sigma, labels)              (one denoiser evaluation, maybe guided)

A source is a register (index >= 0) or an input: ``LATENTS`` (-1) is the unit-variance initial
noise, ``noise_source(k)`` (-2 - k) the k-th injected draw, shaped like the state. Registers hold
tensors of the batch's shape; the program's result is the source ``output``. An executor needs
nothing else: no solver name, no formula. A LIN's destination may be one of its sources (an
executor must read all sources before writing); an EVAL's destination is never its source.

``ProgramBuilder`` lets a planner write solver mathematics as algebra on ``Expr`` (linear
combinations of values, combined and simplified in float64) and allocates the registers at the
end, reusing a register once its value is dead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["LIN", "EVAL", "LATENTS", "noise_source", "Op", "Program", "Expr", "ProgramBuilder"]

LIN, EVAL = 0, 1
LATENTS = -1


def noise_source(k: int) -> int:
    """The source index of the k-th injected noise draw (k = 0, 1, ...)."""
    return -2 - k


@dataclass(frozen=True)
class Op:
    """One instruction. LIN: ``coefs`` has one float per source. EVAL: one source, ``sigma`` the
    noise level, ``guided`` whether the run's guidance (if any) applies at this evaluation."""

    kind: int
    dst: int
    srcs: tuple[int, ...]
    coefs: tuple[float, ...] = ()
    sigma: float = 0.0
    guided: bool = True


@dataclass(frozen=True)
class Program:
    """The ops, the register count, where the result is, and how many noise draws it reads."""

    ops: tuple[Op, ...]
    num_registers: int
    output: int
    num_noise: int

    @property
    def num_evals(self) -> int:
        """Denoiser evaluations per sample (NFE; guidance runs some at twice the batch)."""
        return sum(op.kind == EVAL for op in self.ops)

    @property
    def eval_sigmas(self) -> list[float]:
        return [op.sigma for op in self.ops if op.kind == EVAL]

    def arrays(self) -> dict[str, list]:
        """The program as flat arrays (what the C++ executor takes): per op its kind, dst, sigma,
        guided flag and the range [term_start[i], term_start[i+1]) of (srcs, coefs)."""
        kinds, dsts, sigmas, guided, starts, srcs, coefs = [], [], [], [], [0], [], []
        for op in self.ops:
            kinds.append(op.kind)
            dsts.append(op.dst)
            sigmas.append(op.sigma)
            guided.append(int(op.guided))
            srcs.extend(op.srcs)
            coefs.extend(op.coefs if op.kind == LIN else (1.0,) * len(op.srcs))
            starts.append(len(srcs))
        return {"kinds": kinds, "dsts": dsts, "sigmas": sigmas, "guided": guided,
                "term_start": starts, "srcs": srcs, "coefs": coefs,
                "num_registers": self.num_registers, "output": self.output,
                "num_noise": self.num_noise}

    def validate(self) -> "Program":
        """Check that every source is defined before it is read and every number is finite."""
        defined = set()
        for i, op in enumerate(self.ops):
            for s in op.srcs:
                if s >= 0 and s not in defined:
                    raise ValueError(f"op {i} reads register {s} before it is written")
                if s < LATENTS and -2 - s >= self.num_noise:
                    raise ValueError(f"op {i} reads noise draw {-2 - s} of {self.num_noise}")
            if not all(math.isfinite(c) for c in op.coefs) or not math.isfinite(op.sigma):
                raise ValueError(f"op {i} has a non-finite coefficient or sigma")
            if op.kind == EVAL and (len(op.srcs) != 1 or op.srcs[0] == op.dst or op.sigma <= 0):
                raise ValueError(f"op {i}: an evaluation reads one other source at sigma > 0")
            if op.kind == LIN and len(op.coefs) != len(op.srcs):
                raise ValueError(f"op {i}: a LIN needs one coefficient per source")
            if not 0 <= op.dst < self.num_registers:
                raise ValueError(f"op {i} writes register {op.dst} of {self.num_registers}")
            defined.add(op.dst)
        if self.output >= 0 and self.output not in defined:
            raise ValueError("the output register is never written")
        return self


@dataclass(frozen=True)
class Expr:
    """A linear combination sum_v c_v * value_v of builder values and inputs (float64)."""

    terms: tuple[tuple[int, float], ...]

    @staticmethod
    def of(source: int) -> "Expr":
        return Expr(((source, 1.0),))

    def _combine(self, other: "Expr", scale: float) -> "Expr":
        out: dict[int, float] = dict(self.terms)
        for v, c in other.terms:
            out[v] = out.get(v, 0.0) + scale * c
        return Expr(tuple(out.items()))

    def __add__(self, other: "Expr") -> "Expr":
        return self._combine(other, 1.0)

    def __sub__(self, other: "Expr") -> "Expr":
        return self._combine(other, -1.0)

    def __mul__(self, scale: float) -> "Expr":
        return Expr(tuple((v, float(scale) * c) for v, c in self.terms))

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> "Expr":
        return self * (1.0 / float(scale))

    def __neg__(self) -> "Expr":
        return self * -1.0

    def single(self) -> int | None:
        """The value if this is exactly 1 * value, else None."""
        if len(self.terms) == 1 and self.terms[0][1] == 1.0:
            return self.terms[0][0]
        return None


@dataclass
class ProgramBuilder:
    """Write a program as SSA values (each LIN/EVAL defines a new value), then ``finish``."""

    _ops: list = field(default_factory=list)  # (kind, value, srcs, coefs, sigma, guided)
    _num_values: int = 0
    num_noise: int = 0

    def latents(self) -> Expr:
        return Expr.of(LATENTS)

    def noise(self) -> Expr:
        """The next injected unit-variance draw (drawn in this order per seed)."""
        source = noise_source(self.num_noise)
        self.num_noise += 1
        return Expr.of(source)

    def _new(self) -> int:
        self._num_values += 1
        return self._num_values - 1

    def value(self, expr: Expr) -> Expr:
        """``expr`` held in one buffer: a LIN unless it already is one value (or input).
        Terms with a zero coefficient are dropped (the executors' NaN checks watch every D)."""
        if expr.single() is not None:
            return expr
        terms = [(v, c) for v, c in expr.terms if c != 0.0]
        if not terms:
            raise ValueError("a linear combination with no nonzero term")
        value = self._new()
        self._ops.append((LIN, value, tuple(v for v, _ in terms), tuple(c for _, c in terms),
                          0.0, True))
        return Expr.of(value)

    def eval(self, expr: Expr, sigma: float, guided: bool = True) -> Expr:
        """D(expr; sigma) as a new value."""
        if not sigma > 0:
            raise ValueError(f"an evaluation needs sigma > 0, got {sigma}")
        src = self.value(expr).single()
        value = self._new()
        self._ops.append((EVAL, value, (src,), (), float(sigma), bool(guided)))
        return Expr.of(value)

    def finish(self, result: Expr) -> Program:
        """Allocate registers by liveness (a LIN may write over a source it last reads) and
        return the program computing ``result``."""
        out = self.value(result).single()
        last_use: dict[int, int] = {}
        for i, (_, _, srcs, *_rest) in enumerate(self._ops):
            for s in srcs:
                last_use[s] = i
        if out >= 0:
            last_use[out] = len(self._ops)
        register: dict[int, int] = {}
        free: list[int] = []
        count = 0

        def release(srcs, i):
            for s in set(srcs):
                if s >= 0 and last_use.get(s) == i:
                    free.append(register[s])
                    free.sort(reverse=True)

        def allocate(value):
            nonlocal count
            if free:
                register[value] = free.pop()
            else:
                register[value] = count
                count += 1

        ops = []
        for i, (kind, value, srcs, coefs, sigma, guided) in enumerate(self._ops):
            if kind == LIN:
                release(srcs, i)
            allocate(value)
            if kind == EVAL:
                release(srcs, i)
            if last_use.get(value) is None:  # never read: its register is free again
                free.append(register[value])
                free.sort(reverse=True)
            ops.append(Op(kind, register[value], tuple(register.get(s, s) for s in srcs),
                          coefs, sigma, guided))
        output = register.get(out, out)
        return Program(tuple(ops), max(count, 1), output, self.num_noise).validate()
