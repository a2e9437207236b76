"""Fused EDM preconditioning, Eq. (7) of Karras et al. (2022), "Elucidating the Design Space
of Diffusion-Based Generative Models": D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)).

Notation:
    x        (N, ...)  noisy sample at noise level σ (images (N, C, H, W) or toy data (N, D))
    c_in     (N,)      input scaling, one value per sample
    c_skip   (N,)      skip scaling
    c_out    (N,)      output scaling
    F_x      (N, ...)  raw network output F(c_in·x; c_noise), often float16/bfloat16
    D        (N, ...)  denoiser output, x's dtype

Fusion and limits: each op is one pass over memory (read each input once, write the output once)
with arithmetic in float32 (float64 for float64 x), so it is memory-bound; its floor is bytes
moved / DRAM bandwidth. On an H100, batches of 1024×3×64×64 reach 82–92% of the bandwidth of a
device-to-device copy; 64×3×32×32 takes 2–3 µs a call, launch-bound (bench/RESULTS.md). A sample
may hold at most 65535·1024 elements.
"""

import torch

from ._common import HAS_TRITON, compute_dtype, finish, per_sample, register_ops

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import load_block, load_scalar, sample_offsets, store_block

# ----------------------------------------------------------------------------
# Pure-PyTorch references, the same signatures as the kernels.


def precond_in_ref(x: torch.Tensor, c_in: torch.Tensor, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """c_in·x, the network input (Eq. 7). x: (N, ...), c_in: (N,). Returns x's dtype."""
    dtype = compute_dtype(x)
    return finish(per_sample(c_in, x, dtype) * x.to(dtype), x, out)


def precond_out_ref(x: torch.Tensor, F_x: torch.Tensor, c_skip: torch.Tensor,
                    c_out: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """D = c_skip·x + c_out·F_x (Eq. 7). x, F_x: (N, ...), c_skip, c_out: (N,). x's dtype."""
    dtype = compute_dtype(x)
    D = per_sample(c_skip, x, dtype) * x.to(dtype) + per_sample(c_out, x, dtype) * F_x.to(dtype)
    return finish(D, x, out)


# ----------------------------------------------------------------------------
# Kernels.

if HAS_TRITON:

    # .. math::
    #     x_{in} = c_{in} \, x        (EDM Eq. 7, c_in loaded once per sample n)
    @triton.jit
    def _precond_in_kernel(
        x_ptr,  # *Pointer* to x, N samples of M elements each
        c_in_ptr,  # *Pointer* to c_in, (N,)
        c_in_stride,  # element stride of c_in (0 when expanded from one value)
        x_in_ptr,  # *Pointer* to the output c_in·x, x's layout and dtype
        M,  # elements per sample
        USE_FP64: tl.constexpr,  # compute in float64 (x is float64), else in float32
        BLOCK_SIZE: tl.constexpr,  # elements of one sample per program
    ):
        n, offs, mask = sample_offsets(M, BLOCK_SIZE)
        c_in = load_scalar(c_in_ptr, c_in_stride, n, USE_FP64)
        x = load_block(x_ptr, offs, mask, USE_FP64)
        x_in = c_in * x
        store_block(x_in_ptr, offs, mask, x_in)

    # .. math::
    #     D = c_{skip} \, x + c_{out} \, F_x        (EDM Eq. 7)
    @triton.jit
    def _precond_out_kernel(
        x_ptr,  # *Pointer* to x, N samples of M elements each
        F_x_ptr,  # *Pointer* to the network output F_x, x's layout, any float dtype
        c_skip_ptr,  # *Pointer* to c_skip, (N,)
        c_skip_stride,  # element stride of c_skip
        c_out_ptr,  # *Pointer* to c_out, (N,)
        c_out_stride,  # element stride of c_out
        D_ptr,  # *Pointer* to the output D, x's layout and dtype
        M,  # elements per sample
        USE_FP64: tl.constexpr,  # compute in float64 (x is float64), else in float32
        BLOCK_SIZE: tl.constexpr,  # elements of one sample per program
    ):
        n, offs, mask = sample_offsets(M, BLOCK_SIZE)
        c_skip = load_scalar(c_skip_ptr, c_skip_stride, n, USE_FP64)
        c_out = load_scalar(c_out_ptr, c_out_stride, n, USE_FP64)
        x = load_block(x_ptr, offs, mask, USE_FP64)
        F_x = load_block(F_x_ptr, offs, mask, USE_FP64)
        D = c_skip * x + c_out * F_x
        store_block(D_ptr, offs, mask, D)
else:  # no Triton: the ops below still register, and raise a RuntimeError naming the *_ref
    _precond_in_kernel = _precond_out_kernel = None

# ----------------------------------------------------------------------------
# Registered ops, torch.ops.edm_fast_triton.<op> and <op>_out; they validate, allocate, launch.

_precond_in_op, _precond_in_out_op = register_ops(
    "precond_in", _precond_in_kernel, tensors=("x",), scalars=("c_in",), outs=("x_in",))
_precond_out_op, _precond_out_out_op = register_ops(
    "precond_out", _precond_out_kernel, tensors=("x", "F_x"), scalars=("c_skip", "c_out"),
    outs=("D",))


# ----------------------------------------------------------------------------
# Public functions.


def precond_in(x: torch.Tensor, c_in: torch.Tensor, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """c_in·x, the network input of EDM Eq. (7), in one fused pass.

    x: (N, ...) float16/bfloat16/float32/float64, contiguous (or 4-D channels_last).
    c_in: (N,) any float dtype. out: optional buffer like x (for CUDA graphs); may be x itself.
    Returns x's dtype, computed in float32 (float64 for float64 x).
    """
    if out is None:
        return _precond_in_op(x, c_in)
    _precond_in_out_op(x, c_in, out)
    return out


def precond_out(x: torch.Tensor, F_x: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor,
                *, out: torch.Tensor | None = None) -> torch.Tensor:
    """D = c_skip·x + c_out·F_x, the denoiser output of EDM Eq. (7), in one fused pass.

    x: (N, ...); F_x: x's shape and layout, any supported float dtype (e.g. the float16 network
    output); c_skip, c_out: (N,). out: optional buffer like x. Returns x's dtype.
    """
    if out is None:
        return _precond_out_op(x, F_x, c_skip, c_out)
    _precond_out_out_op(x, F_x, c_skip, c_out, out)
    return out
