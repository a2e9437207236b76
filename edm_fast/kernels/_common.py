"""Plumbing shared by the fused EDM kernels in precond.py and linear.py.

Holds the optional Triton import, the availability predicate and its kill-switch, the checks a
launcher runs before it touches memory, the launch grid, the helpers the `*_ref` twins share,
and the `@triton.jit` helpers every kernel uses.

Memory model of every kernel: x is (N, ...) and is read as N rows of M = x.numel() // N
elements, one row per sample. This holds for contiguous tensors and for 4-D channels_last
tensors (each sample is still one contiguous run of memory), as long as every element tensor
of a call has x's layout. Program (n, b) of the grid (N, cdiv(M, BLOCK_SIZE)) handles elements
[b·BLOCK_SIZE, (b+1)·BLOCK_SIZE) of sample n and loads that sample's scalars once. Kernels
without per-sample scalars (lincomb) use a flat 1-D grid instead, `launch_flat`.
"""

import os
from contextlib import nullcontext

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS, Windows, CPU-only installs: the *_ref twins still work
    triton = None
    tl = None

HAS_TRITON = triton is not None
NAMESPACE = "edm_fast_triton"  # torch.ops.edm_fast_triton.*; edm_fast belongs to the C++ extension
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_BLOCK_SIZE = 1024  # elements per program: 8 per thread with 4 warps
MAX_BLOCKS_PER_SAMPLE = 65535  # CUDA's limit on grid dimension 1

# triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. when this package is imported:
# kernels defined without it cannot run on CPU tensors even if the variable is set later.
_INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------
# Availability: one predicate and a kill-switch (EDM_FAST_DISABLE_TRITON=1).


def _unavailable_reason(device) -> str | None:
    """Why the kernels cannot run on `device`, or None when they can."""
    if os.environ.get("EDM_FAST_DISABLE_TRITON", "0") == "1":
        return "the Triton kernels are disabled by EDM_FAST_DISABLE_TRITON=1"
    if not HAS_TRITON:
        return "Triton is not installed (pip install triton; Linux only)"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type != "cpu":
        return f"Triton kernels run on CUDA tensors (CPU ones under an interpreter), not {device}"
    if os.environ.get("TRITON_INTERPRET") == "1" and _INTERPRETED_AT_IMPORT:
        return None
    return ("Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (slow; meant for tests)")


def triton_available(device: torch.device | str | torch.Tensor | None = None) -> bool:
    """True when the fused kernels can run on `device` (a device, its name, or a tensor on it).

    `device=None` means CUDA when torch sees a GPU, else the CPU. False when
    EDM_FAST_DISABLE_TRITON=1, when Triton is not installed, and for CPU tensors unless Triton's
    interpreter is on (TRITON_INTERPRET=1, set before triton was imported).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, torch.Tensor):
        device = device.device
    return _unavailable_reason(torch.device(device)) is None


def require_triton(op: str, device: torch.device) -> None:
    """Raise RuntimeError, naming the fallback, when `op`'s kernel cannot run on `device`."""
    reason = _unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{op}: {reason}. The pure-PyTorch {op}_ref computes the same result.")


# ----------------------------------------------------------------------------
# Checks run by every launcher (and by the fake implementations used while tracing).


def is_sample_major(x: torch.Tensor) -> bool:
    """Each sample is one contiguous run of memory: contiguous, or channels_last when 4-D."""
    if x.is_contiguous():
        return True
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same element order in memory (strides of size-1 dims do not matter)."""
    if a.stride() == b.stride():
        return True
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def check_float_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float16, bfloat16, "
                        "float32, float64")


def check_inputs(op: str, tensors: dict, scalars: dict) -> None:
    """Validate one call: the element tensors (the first is x) and the per-sample scalars (N,).

    Raises TypeError for a non-tensor or unsupported dtype and ValueError for a wrong shape,
    device or memory layout, each naming the argument and what to do about it.
    """
    (x_name, x), *others = tensors.items()
    check_float_tensor(op, x_name, x)
    if x.dim() < 1:
        raise ValueError(f"{op}: {x_name} must have a batch dimension, shape (N, ...); got a 0-d "
                         "tensor")
    if not is_sample_major(x):
        raise ValueError(f"{op}: {x_name} is not contiguous (strides {tuple(x.stride())}); call "
                         ".contiguous() on it (4-D channels_last is also accepted)")
    for name, t in others:
        check_float_tensor(op, name, t)
        check_device(op, name, t, x_name, x)
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {x_name} has shape "
                             f"{tuple(x.shape)}; they must match")
        if not same_layout(t, x):
            raise ValueError(f"{op}: {name} (strides {tuple(t.stride())}) must have the memory "
                             f"layout of {x_name} (strides {tuple(x.stride())}); call "
                             ".contiguous() on both")
    n = x.shape[0]
    for name, s in scalars.items():
        check_float_tensor(op, name, s)
        check_device(op, name, s, x_name, x)
        if s.shape != (n,):
            raise ValueError(f"{op}: {name} must have shape (N,) = ({n},), one value per sample; "
                             f"got {tuple(s.shape)}. For one shared value t use "
                             f"torch.full(({n},), t) or t.expand({n})")
    m = x.numel() // n if n > 0 else 0
    if m >= 2**31 or triton_cdiv(m, MAX_BLOCK_SIZE) > MAX_BLOCKS_PER_SAMPLE:
        raise ValueError(f"{op}: {m} elements per sample is more than one launch handles "
                         f"(at most {MAX_BLOCKS_PER_SAMPLE * MAX_BLOCK_SIZE}); split the sample")


def check_outs(op: str, x_name: str, x: torch.Tensor, outs: dict) -> None:
    """Validate caller-provided output buffers: x's shape, dtype, device and memory layout."""
    for name, t in outs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; outputs have {x_name}'s dtype, "
                            f"{x.dtype}")
        check_device(op, name, t, x_name, x)
        if t.shape != x.shape or not same_layout(t, x):
            raise ValueError(f"{op}: {name} must have {x_name}'s shape {tuple(x.shape)} and "
                             f"strides {tuple(x.stride())}; got {tuple(t.shape)} and "
                             f"{tuple(t.stride())} (allocate it with torch.empty_like)")


def check_device(op, name, t, x_name, x) -> None:
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {x_name} is on {x.device}; move it "
                         f"with .to({x_name}.device)")


def triton_cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints (triton.cdiv, usable without Triton)."""
    return -(-a // b)


# ----------------------------------------------------------------------------
# Launch: grid (N, cdiv(M, BLOCK_SIZE)). Every per-sample kernel takes, in order: the element
# tensors, a (pointer, stride) pair per per-sample scalar, the float arguments, the outputs,
# then M, USE_FP64 and BLOCK_SIZE. Flat kernels (launch_flat): their arguments, numel, their
# constexprs, USE_FP64 and BLOCK_SIZE.


def block_size(m: int) -> int:
    """Elements per program for M elements per sample: a power of two in [16, MAX_BLOCK_SIZE]."""
    return min(MAX_BLOCK_SIZE, max(16, 1 << (max(m, 1) - 1).bit_length()))


def launch(kernel, x: torch.Tensor, *args) -> None:
    """Run `kernel[grid](*args, M, USE_FP64=..., BLOCK_SIZE=...)` over x's N samples."""
    if x.numel() == 0:
        return
    n = x.shape[0]
    m = x.numel() // n
    block = block_size(m)
    grid = (n, triton_cdiv(m, block))
    # Triton launches on the current CUDA device; make it x's.
    on_other_gpu = x.device.type == "cuda" and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if on_other_gpu else nullcontext():
        kernel[grid](*args, m, USE_FP64=x.dtype == torch.float64, BLOCK_SIZE=block,
                     num_warps=max(1, min(4, block // 256)))


def launch_flat(kernel, out: torch.Tensor, *args, **constexprs) -> None:
    """Run `kernel[grid](*args, numel, **constexprs, USE_FP64=..., BLOCK_SIZE=...)` on a 1-D
    grid of cdiv(numel, BLOCK_SIZE) programs over `out`'s numel elements (any shape)."""
    numel = out.numel()
    if numel == 0:
        return
    block = block_size(numel)
    grid = (triton_cdiv(numel, block),)
    on_other_gpu = out.device.type == "cuda" and out.device.index != torch.cuda.current_device()
    with torch.cuda.device(out.device) if on_other_gpu else nullcontext():
        kernel[grid](*args, numel, **constexprs, USE_FP64=out.dtype == torch.float64,
                     BLOCK_SIZE=block, num_warps=max(1, min(4, block // 256)))


# ----------------------------------------------------------------------------
# torch.library registration: for each kernel, torch.ops.edm_fast_triton.<op> (returns new
# tensors) and <op>_out (writes into the caller's buffers, e.g. the static buffers of a CUDA
# graph; a buffer may be one of the inputs, since each element is read before it is written).


def register_ops(name: str, kernel, tensors: tuple, scalars: tuple, outs: tuple,
                 floats: tuple = ()):
    """Register the two custom ops of one kernel and return them as (functional, out).

    tensors: names of the element tensors, x first; scalars: names of the per-sample (N,)
    tensors; floats: names of Python float arguments (an unannotated kernel parameter receives
    a Python float as fp32: annotate it `tl.float64` to keep every bit); outs: names of the
    outputs (the out op takes buffers named <out>_out after the inputs). The ops validate their inputs (also in
    the fake implementations that torch.compile traces with), allocate like x unless given
    buffers, and launch `kernel` once. If this package was imported before under its other
    name (edm_fast.kernels / kernels), the ops registered then are returned.
    """
    namespace = getattr(torch.ops, NAMESPACE)
    if hasattr(namespace, name):
        return getattr(namespace, name).default, getattr(namespace, f"{name}_out").default
    n_in, n_tensors, n_out = len(tensors) + len(scalars) + len(floats), len(tensors), len(outs)
    buffers = tuple(f"{o}_out" for o in outs)

    def check(inputs, out=None):
        scalar_inputs = inputs[n_tensors:n_tensors + len(scalars)]
        check_inputs(name, dict(zip(tensors, inputs[:n_tensors])),
                     dict(zip(scalars, scalar_inputs)))
        if out is not None:
            check_outs(name, tensors[0], inputs[0], dict(zip(buffers, out)))

    def run(inputs, out=None):
        x = inputs[0]
        require_triton(name, x.device)
        check(inputs, out)
        if out is None:
            out = tuple(torch.empty_like(x) for _ in outs)
        scalar_inputs = inputs[n_tensors:n_tensors + len(scalars)]
        per_sample_args = [a for s in scalar_inputs for a in (s, s.stride(0))]
        float_inputs = inputs[n_tensors + len(scalars):]
        launch(kernel, x, *inputs[:n_tensors], *per_sample_args, *float_inputs, *out)
        return out

    def functional_impl(*inputs):
        out = run(inputs)
        return out[0] if n_out == 1 else out

    def functional_fake(*inputs):
        check(inputs)
        out = tuple(torch.empty_like(inputs[0]) for _ in outs)
        return out[0] if n_out == 1 else out

    def out_impl(*inputs_and_buffers):
        run(inputs_and_buffers[:n_in], inputs_and_buffers[n_in:])

    def out_fake(*inputs_and_buffers):
        check(inputs_and_buffers[:n_in], inputs_and_buffers[n_in:])

    args = ", ".join([f"Tensor {t}" for t in tensors + scalars] + [f"float {f}" for f in floats])
    returns = "Tensor" if n_out == 1 else "(" + ", ".join(["Tensor"] * n_out) + ")"
    buffer_args = ", ".join(f"Tensor({chr(ord('a') + i)}!) {b}" for i, b in enumerate(buffers))
    functional = torch.library.custom_op(f"{NAMESPACE}::{name}", functional_impl, mutates_args=(),
                                         schema=f"({args}) -> {returns}")
    functional.register_fake(functional_fake)
    out_variant = torch.library.custom_op(f"{NAMESPACE}::{name}_out", out_impl,
                                          mutates_args=buffers,
                                          schema=f"({args}, {buffer_args}) -> ()")
    out_variant.register_fake(out_fake)
    return functional, out_variant


# ----------------------------------------------------------------------------
# Helpers shared by the *_ref twins: the precision policy, written once.


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 x, else float32 (fp16/bf16 inputs are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def per_sample(s: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-sample scalar (N,) as a (N, 1, ..., 1) tensor that broadcasts against x."""
    if s.shape != x.shape[:1]:
        raise ValueError(f"per-sample scalar must have shape (N,) = ({x.shape[0]},), got "
                         f"{tuple(s.shape)}")
    return s.to(dtype).reshape(-1, *([1] * (x.dim() - 1)))


def finish(value: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Round `value` to x's dtype, into `out` when given."""
    if out is None:
        return value.to(x.dtype)
    return out.copy_(value)


# ----------------------------------------------------------------------------
# @triton.jit helpers used by every kernel.

if HAS_TRITON:

    @triton.jit
    def sample_offsets(
        M,  # elements per sample
        BLOCK_SIZE: tl.constexpr,  # elements per program
    ):
        """Sample index n, flat int64 offsets n·M + col and the mask col < M of this program."""
        n = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        return n, n.to(tl.int64) * M + cols, cols < M

    @triton.jit
    def to_compute(v, USE_FP64: tl.constexpr):
        """Upcast to the compute precision: float64 when USE_FP64, else float32."""
        if USE_FP64:
            r = v.to(tl.float64)
        else:
            r = v.to(tl.float32)
        return r

    @triton.jit
    def load_scalar(
        ptr,  # *Pointer* to a per-sample scalar, (N,)
        stride,  # its element stride (0 when expanded from one value)
        n,  # sample index
        USE_FP64: tl.constexpr,  # compute precision flag, as in to_compute
    ):
        return to_compute(tl.load(ptr + n * stride), USE_FP64)

    @triton.jit
    def load_block(ptr, offs, mask, USE_FP64: tl.constexpr):
        """This program's block of an element tensor, upcast to the compute precision."""
        return to_compute(tl.load(ptr + offs, mask=mask), USE_FP64)

    @triton.jit
    def store_block(ptr, offs, mask, v):
        """Round `v` to the output's dtype and store this program's block of it."""
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def float_arg(v, USE_FP64: tl.constexpr):
        """A float kernel argument as a compute-precision scalar, rounded to nearest.

        Annotate the parameter `tl.float64`: unannotated, Triton passes a Python float as fp32
        (and the interpreter as a Python float, which `.to` would not accept)."""
        if USE_FP64:
            r = tl.full((), v, tl.float64)
        else:
            r = tl.full((), v, tl.float32)
        return r
