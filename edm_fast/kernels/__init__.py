"""Fused Triton kernels for the EDM sampler (Karras et al. 2022).

Each op is one launch over the whole batch and has a pure-PyTorch `<op>_ref` twin with the
same signature and precision policy (float32 arithmetic, float64 for float64 inputs):

    precond_in(x, c_in)                            c_in·x                                Eq. 7
    precond_out(x, F_x, c_skip, c_out)             D = c_skip·x + c_out·F_x              Eq. 7
    lincomb(srcs, coefs, out=None)                 Σ_j coefs[j]·srcs[j], 1–8 sources   LIN op

lincomb is the LIN op of the sampler program (edm_fast/program.py): every solver's step
arithmetic is a sequence of such sums with host-computed float coefficients. Element tensors
are (N, ...) (any shape for lincomb), per-sample scalars (N,); every op takes an `out=` buffer
(which may be one of its inputs) and is registered as torch.ops.edm_fast_triton.<op> and
<op>_out, so torch.compile can trace it. `triton_available(device)` says whether the kernels can
run on a device (False without Triton, with EDM_FAST_DISABLE_TRITON=1, and on CPU unless
TRITON_INTERPRET=1); the `_ref` functions always work.
"""

from ._common import HAS_TRITON, triton_available
from .linear import MAX_SOURCES, lincomb, lincomb_ref
from .precond import precond_in, precond_in_ref, precond_out, precond_out_ref

# name -> (fused kernel, pure-PyTorch reference), for tests, benchmarks and backends.
OPS = {
    "precond_in": (precond_in, precond_in_ref),
    "precond_out": (precond_out, precond_out_ref),
    "lincomb": (lincomb, lincomb_ref),
}

# The per-sample ops' arguments in signature order: (element tensors (N, ...), per-sample (N,)
# scalars, plain floats). lincomb takes (srcs, coefs) instead.
OP_ARGS = {
    "precond_in": (("x",), ("c_in",), ()),
    "precond_out": (("x", "F_x"), ("c_skip", "c_out"), ()),
}

__all__ = ["HAS_TRITON", "MAX_SOURCES", "OPS", "OP_ARGS", "triton_available",
           *(n for pair in OPS.values() for n in (pair[0].__name__, pair[1].__name__))]
