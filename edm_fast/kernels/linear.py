"""Fused N-ary linear combination, the LIN op of the sampler program (edm_fast/program.py):
out = Σ_j c_j · src_j, the whole step arithmetic of every solver in one pass over memory.

Notation:
    srcs     [src_0, …, src_{N-1}], 1 ≤ N ≤ MAX_SOURCES tensors of one shape, dtype, device
             and memory layout (contiguous, or all 4-D channels_last); any shape, 0-d included
    coefs    N finite Python floats c_j (float64 on the host, computed by the program builder)
    out      the result, the sources' shape, dtype and layout; may be one of the sources

Fusion and limits: one launch reads each source once and writes out once, accumulating in
float32 (float64 for float64 sources), so it is memory-bound, like precond.py's ops. The
tensors are read as one flat run of numel elements (no batch dimension needed); program b of
the 1-D grid handles elements [b·BLOCK_SIZE, (b+1)·BLOCK_SIZE) with int64 offsets. The kernel
is specialised per source count (constexpr N: one compilation per N and dtype, on first use);
the coefficients are float64 scalar kernel arguments, so a CUDA graph records them and no
host-to-device copy happens per call (a captured call replays with the coefficients it was
captured with). Every element reads all its sources before it writes out, and each element is
handled by one program, so out may alias any source.
"""

import math
import numbers

import torch

from ._common import (
    HAS_TRITON,
    NAMESPACE,
    check_device,
    check_float_tensor,
    is_sample_major,
    same_layout,
    check_outs,
    compute_dtype,
    finish,
    launch_flat,
    require_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import float_arg, load_block, store_block

MAX_SOURCES = 8  # pointer slots of the kernel; a longer sum takes several calls

# ----------------------------------------------------------------------------
# Validation, shared by the kernel, its fake implementation and the *_ref twin.


def check_lincomb(op: str, srcs, coefs, out=None) -> None:
    """Raise TypeError/ValueError, naming the argument, unless lincomb(srcs, coefs, out) is valid.

    srcs: a list or tuple of 1..MAX_SOURCES float tensors of srcs[0]'s shape, dtype, device and
    layout (contiguous or 4-D channels_last); coefs: as many finite real numbers; out: None or
    a tensor like srcs[0].
    """
    if isinstance(srcs, torch.Tensor) or not isinstance(srcs, (list, tuple)):
        raise TypeError(f"{op}: srcs must be a list of tensors, got {type(srcs).__name__}")
    if isinstance(coefs, torch.Tensor) or not isinstance(coefs, (list, tuple)):
        raise TypeError(f"{op}: coefs must be a list of floats, got {type(coefs).__name__} (a "
                        "tensor of coefficients would need a device-to-host copy per call)")
    if not 1 <= len(srcs) <= MAX_SOURCES:
        raise ValueError(f"{op}: got {len(srcs)} sources; 1 to {MAX_SOURCES} are supported "
                         f"(split a longer sum into several calls)")
    if len(coefs) != len(srcs):
        raise ValueError(f"{op}: got {len(coefs)} coefficients for {len(srcs)} sources; give one "
                         "per source")
    for j, c in enumerate(coefs):
        if isinstance(c, (bool, torch.Tensor)) or not isinstance(c, numbers.Real):
            raise TypeError(f"{op}: coefs[{j}] must be a Python float, got {type(c).__name__}")
        if not math.isfinite(c):
            raise ValueError(f"{op}: coefs[{j}] is {c}; coefficients must be finite")
    x = srcs[0]
    check_float_tensor(op, "srcs[0]", x)
    if not is_sample_major(x):
        raise ValueError(f"{op}: srcs[0] is not contiguous (strides {tuple(x.stride())}); call "
                         ".contiguous() on it (4-D channels_last is also accepted)")
    for j, t in enumerate(srcs[1:], start=1):
        name = f"srcs[{j}]"
        check_float_tensor(op, name, t)
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but srcs[0] has {x.dtype}; all "
                            "sources must have one dtype")
        check_device(op, name, t, "srcs[0]", x)
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but srcs[0] has shape "
                             f"{tuple(x.shape)}; they must match")
        if not same_layout(t, x):
            raise ValueError(f"{op}: {name} (strides {tuple(t.stride())}) must have the memory "
                             f"layout of srcs[0] (strides {tuple(x.stride())}); call "
                             ".contiguous() on both")
    if out is not None:
        check_outs(op, "srcs[0]", x, {"out": out})


# ----------------------------------------------------------------------------
# Pure-PyTorch reference, the same signature as the kernel.


def lincomb_ref(srcs: list[torch.Tensor], coefs, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = Σ_j coefs[j]·srcs[j], accumulated left to right in float32 (float64 for float64).

    The same arguments, checks and precision policy as lincomb; out may alias a source (the
    sum is complete before out is written). Returns out, or a new tensor like srcs[0].
    """
    check_lincomb("lincomb_ref", srcs, coefs, out)
    x = srcs[0]
    dtype = compute_dtype(x)
    acc = x.to(dtype) * float(coefs[0])  # a new tensor: the sources are never written
    for s, c in zip(srcs[1:], coefs[1:]):
        acc.add_(s.to(dtype), alpha=float(c))
    return finish(acc, x, out)


# ----------------------------------------------------------------------------
# Kernel.

if HAS_TRITON:

    @triton.jit
    def _term(ptr, c, offs, mask, USE_FP64: tl.constexpr):
        """c·src on this program's block, c (a float64 argument) rounded to the compute dtype."""
        return float_arg(c, USE_FP64) * load_block(ptr, offs, mask, USE_FP64)

    # .. math::
    #     out = \sum_{j < N} c_j \, src_j        (one LIN op of the sampler program)
    # The coefficients are annotated fp64: unannotated Python floats become fp32 arguments.
    @triton.jit
    def _lincomb_kernel(
        s0, s1, s2, s3, s4, s5, s6, s7,  # *Pointers* to the sources; slots ≥ N repeat s0, unread
        c0: tl.float64, c1: tl.float64, c2: tl.float64, c3: tl.float64,  # coefficients; slots
        c4: tl.float64, c5: tl.float64, c6: tl.float64, c7: tl.float64,  # ≥ N are 0, unread
        out_ptr,  # *Pointer* to the output, the sources' dtype and layout (may be a source)
        numel,  # elements of each tensor
        N: tl.constexpr,  # number of sources, 1..8
        USE_FP64: tl.constexpr,  # compute in float64 (float64 sources), else in float32
        BLOCK_SIZE: tl.constexpr,  # elements per program
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        acc = _term(s0, c0, offs, mask, USE_FP64)
        if N > 1:
            acc += _term(s1, c1, offs, mask, USE_FP64)
        if N > 2:
            acc += _term(s2, c2, offs, mask, USE_FP64)
        if N > 3:
            acc += _term(s3, c3, offs, mask, USE_FP64)
        if N > 4:
            acc += _term(s4, c4, offs, mask, USE_FP64)
        if N > 5:
            acc += _term(s5, c5, offs, mask, USE_FP64)
        if N > 6:
            acc += _term(s6, c6, offs, mask, USE_FP64)
        if N > 7:
            acc += _term(s7, c7, offs, mask, USE_FP64)
        store_block(out_ptr, offs, mask, acc)  # after every load of this block: out may alias
else:  # no Triton: the ops below still register, and raise a RuntimeError naming lincomb_ref
    _lincomb_kernel = None


def _launch(srcs, coefs, out: torch.Tensor) -> None:
    n = len(srcs)
    ptrs = list(srcs) + [srcs[0]] * (MAX_SOURCES - n)
    cs = [float(c) for c in coefs] + [0.0] * (MAX_SOURCES - n)
    launch_flat(_lincomb_kernel, out, *ptrs, *cs, out, N=n)


# ----------------------------------------------------------------------------
# Registered ops, torch.ops.edm_fast_triton.lincomb and lincomb_out (the out op writes into a
# caller's buffer, e.g. a static buffer of a CUDA graph, which may be one of the sources).


def _register():
    namespace = getattr(torch.ops, NAMESPACE)
    if hasattr(namespace, "lincomb"):  # this package imported before under its other name
        return namespace.lincomb.default, namespace.lincomb_out.default

    def functional_impl(srcs: list[torch.Tensor], coefs: list[float]) -> torch.Tensor:
        require_triton("lincomb", srcs[0].device if srcs else torch.device("cpu"))
        check_lincomb("lincomb", srcs, coefs)
        out = torch.empty_like(srcs[0])
        _launch(srcs, coefs, out)
        return out

    def functional_fake(srcs, coefs):
        check_lincomb("lincomb", srcs, coefs)
        return torch.empty_like(srcs[0])

    def out_impl(srcs: list[torch.Tensor], coefs: list[float], out: torch.Tensor) -> None:
        require_triton("lincomb", out.device)
        check_lincomb("lincomb", srcs, coefs, out)
        _launch(srcs, coefs, out)

    def out_fake(srcs, coefs, out):
        check_lincomb("lincomb", srcs, coefs, out)

    functional = torch.library.custom_op(f"{NAMESPACE}::lincomb", functional_impl,
                                         mutates_args=(),
                                         schema="(Tensor[] srcs, float[] coefs) -> Tensor")
    functional.register_fake(functional_fake)
    out_variant = torch.library.custom_op(
        f"{NAMESPACE}::lincomb_out", out_impl, mutates_args=("out",),
        schema="(Tensor[] srcs, float[] coefs, Tensor(a!) out) -> ()")
    out_variant.register_fake(out_fake)
    return functional, out_variant


_lincomb_op, _lincomb_out_op = _register()


# ----------------------------------------------------------------------------
# Public function.


def lincomb(srcs: list[torch.Tensor], coefs, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = Σ_j coefs[j]·srcs[j] in one fused pass (the sampler program's LIN op).

    srcs: 1..8 tensors of one shape, dtype (float16/bfloat16/float32/float64), device and
    layout (contiguous, or all 4-D channels_last). coefs: one finite Python float per source
    (float64; rounded to float32 for non-float64 sources, as torch rounds a scalar factor).
    out: optional buffer like srcs[0] (for CUDA graphs); it may be one of the sources: each
    element reads all its sources before out is written. Returns out, or a new tensor, in the
    sources' dtype, accumulated in float32 (float64 for float64 sources) and rounded once.
    Raises TypeError/ValueError naming the bad argument, RuntimeError (naming lincomb_ref) when
    the kernel cannot run on the sources' device.
    """
    # Validate before the op: a list that is not all tensors would fail the schema with a
    # less helpful message.
    check_lincomb("lincomb", srcs, coefs, out)
    coefs = [float(c) for c in coefs]
    if out is None:
        return _lincomb_op(list(srcs), coefs)
    _lincomb_out_op(list(srcs), coefs, out)
    return out
