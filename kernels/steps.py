"""Fused step updates of the EDM sampler, Algorithm 2 of Karras et al. (2022), "Elucidating the
Design Space of Diffusion-Based Generative Models", and their fusion with Eq. (7).

Notation (Alg. 2):
    x, t_cur       (N, ...), (N,)  sample x_i at noise level t_i
    eps            (N, ...)        standard normal noise ε (scaled by S_noise here)
    x_hat, t_hat   (N, ...), (N,)  x̂_i at the raised level t̂_i = t_i + γ_i t_i (lines 5–6)
    denoised       (N, ...)        D(x̂_i; t̂_i)
    d_cur          (N, ...)        d_i = (x̂_i − D(x̂_i; t̂_i)) / t̂_i (line 7)
    t_next         (N,)            t_{i+1} (0 at the last step)
    x_next         (N, ...)        Euler prediction x_{i+1} (line 8)
    denoised_next  (N, ...)        D(x_{i+1}; t_{i+1})
    d_prime        (N, ...)        d'_i = (x_{i+1} − D(x_{i+1}; t_{i+1})) / t_{i+1} (line 10)
    F_x, F_next    (N, ...)        raw network outputs; c_skip, c_out (N,) as in Eq. (7)

Fusion and limits: each op is one elementwise pass (inputs read once, outputs written once),
arithmetic in float32 (float64 for float64 x), so memory-bound. The fused precond_out_euler and
precond_out_heun fold the denoiser output D = c_skip·x + c_out·F into the step, which saves
writing D and reading it back. On an H100, batches of 1024×3×64×64 reach 85–95% of the
bandwidth of a device-to-device copy, 2–14× faster than the eager references (bench/RESULTS.md).
Divisions are by t_hat > 0 and, in the Heun correction, by t_next, which must not be 0 (skip
the correction at the last step, as Alg. 2 line 9 does).
"""

import torch

from ._common import HAS_TRITON, compute_dtype, finish, per_sample, register_ops

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import (div, float_arg, load_block, load_scalar, sample_offsets, sqrt,
                          store_block)

Tensor = torch.Tensor


def _pair(op: str, out) -> tuple[Tensor, Tensor]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"{op}: out must be a pair (x_next, d_cur) of tensors, got "
                        f"{type(out).__name__}")
    return out[0], out[1]


# ----------------------------------------------------------------------------
# Pure-PyTorch references, the same signatures as the kernels.


def euler_step_ref(x_hat: Tensor, denoised: Tensor, t_hat: Tensor, t_next: Tensor, *,
                   out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Alg. 2 lines 7–8: d_cur = (x̂ − D)/t̂, x_next = x̂ + (t_next − t̂)·d_cur."""
    dtype = compute_dtype(x_hat)
    t_hat, t_next = per_sample(t_hat, x_hat, dtype), per_sample(t_next, x_hat, dtype)
    x_hat_ = x_hat.to(dtype)
    d_cur = (x_hat_ - denoised.to(dtype)) / t_hat
    x_next = x_hat_ + (t_next - t_hat) * d_cur
    out = (None, None) if out is None else _pair("euler_step_ref", out)
    return finish(x_next, x_hat, out[0]), finish(d_cur, x_hat, out[1])


def heun_correct_ref(x_hat: Tensor, d_cur: Tensor, x_next: Tensor, denoised_next: Tensor,
                     t_hat: Tensor, t_next: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Alg. 2 lines 10–11: d' = (x_next − D_next)/t_next, x̂ + (t_next − t̂)(½d_cur + ½d')."""
    dtype = compute_dtype(x_hat)
    t_hat, t_next = per_sample(t_hat, x_hat, dtype), per_sample(t_next, x_hat, dtype)
    d_prime = (x_next.to(dtype) - denoised_next.to(dtype)) / t_next
    x_next_new = x_hat.to(dtype) + (t_next - t_hat) * (0.5 * d_cur.to(dtype) + 0.5 * d_prime)
    return finish(x_next_new, x_hat, out)


def churn_ref(x: Tensor, eps: Tensor, t_cur: Tensor, t_hat: Tensor, S_noise: float, *,
              out: Tensor | None = None) -> Tensor:
    """Alg. 2 line 6: x̂ = x + sqrt(t̂² − t²)·S_noise·ε, with t̂² − t² = (t̂ − t)(t̂ + t) ≥ 0."""
    dtype = compute_dtype(x)
    t_cur, t_hat = per_sample(t_cur, x, dtype), per_sample(t_hat, x, dtype)
    noise_scale = ((t_hat - t_cur) * (t_hat + t_cur)).clamp_min(0).sqrt() * S_noise
    return finish(x.to(dtype) + noise_scale * eps.to(dtype), x, out)


def precond_out_euler_ref(x_hat: Tensor, F_x: Tensor, c_skip: Tensor, c_out: Tensor,
                          t_hat: Tensor, t_next: Tensor, *,
                          out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Eq. 7 then Alg. 2 lines 7–8: D = c_skip·x̂ + c_out·F_x, then the Euler step with D."""
    dtype = compute_dtype(x_hat)
    c_skip, c_out = per_sample(c_skip, x_hat, dtype), per_sample(c_out, x_hat, dtype)
    t_hat, t_next = per_sample(t_hat, x_hat, dtype), per_sample(t_next, x_hat, dtype)
    x_hat_ = x_hat.to(dtype)
    D = c_skip * x_hat_ + c_out * F_x.to(dtype)
    d_cur = (x_hat_ - D) / t_hat
    x_next = x_hat_ + (t_next - t_hat) * d_cur
    out = (None, None) if out is None else _pair("precond_out_euler_ref", out)
    return finish(x_next, x_hat, out[0]), finish(d_cur, x_hat, out[1])


def precond_out_heun_ref(x_hat: Tensor, d_cur: Tensor, x_next: Tensor, F_next: Tensor,
                         c_skip_next: Tensor, c_out_next: Tensor, t_hat: Tensor, t_next: Tensor,
                         *, out: Tensor | None = None) -> Tensor:
    """Eq. 7 at t_next then Alg. 2 lines 10–11: D_next = c_skip·x_next + c_out·F_next, Heun."""
    dtype = compute_dtype(x_hat)
    c_skip = per_sample(c_skip_next, x_hat, dtype)
    c_out = per_sample(c_out_next, x_hat, dtype)
    t_hat, t_next = per_sample(t_hat, x_hat, dtype), per_sample(t_next, x_hat, dtype)
    x_next_ = x_next.to(dtype)
    D_next = c_skip * x_next_ + c_out * F_next.to(dtype)
    d_prime = (x_next_ - D_next) / t_next
    x_next_new = x_hat.to(dtype) + (t_next - t_hat) * (0.5 * d_cur.to(dtype) + 0.5 * d_prime)
    return finish(x_next_new, x_hat, out)


# ----------------------------------------------------------------------------
# Kernels. Each program loads its sample's scalars once, then a block of BLOCK_SIZE elements.

if HAS_TRITON:

    # .. math::
    #     d_{cur} = (\hat x - D) / \hat t                    (Alg. 2 line 7)
    #     x_{next} = \hat x + (t_{next} - \hat t) \, d_{cur}   (Alg. 2 line 8)
    @triton.jit
    def _euler(x_hat, D, t_hat, t_next, USE_FP64: tl.constexpr):
        d_cur = div(x_hat - D, t_hat, USE_FP64)
        x_next = x_hat + (t_next - t_hat) * d_cur
        return x_next, d_cur

    # .. math::
    #     d' = (x_{next} - D_{next}) / t_{next}                                    (line 10)
    #     x_{next}^{new} = \hat x + (t_{next} - \hat t)(\tfrac12 d_{cur} + \tfrac12 d')   (line 11)
    @triton.jit
    def _heun(x_hat, d_cur, x_next, D_next, t_hat, t_next, USE_FP64: tl.constexpr):
        d_prime = div(x_next - D_next, t_next, USE_FP64)
        return x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    @triton.jit
    def _euler_step_kernel(
        x_hat_ptr,  # *Pointer* to x̂, N samples of M elements each
        denoised_ptr,  # *Pointer* to D(x̂; t̂), x̂'s layout, any float dtype
        t_hat_ptr,  # *Pointer* to t̂, (N,)
        t_hat_stride,  # element stride of t̂ (0 when expanded from one value)
        t_next_ptr,  # *Pointer* to t_next, (N,); 0 at the last step
        t_next_stride,  # element stride of t_next
        x_next_ptr,  # *Pointer* to the output x_next, x̂'s layout and dtype
        d_cur_ptr,  # *Pointer* to the output d_cur, x̂'s layout and dtype
        M,  # elements per sample
        USE_FP64: tl.constexpr,  # compute in float64 (x̂ is float64), else in float32
        BLOCK_SIZE: tl.constexpr,  # elements of one sample per program
    ):
        n, offs, mask = sample_offsets(M, BLOCK_SIZE)
        t_hat = load_scalar(t_hat_ptr, t_hat_stride, n, USE_FP64)
        t_next = load_scalar(t_next_ptr, t_next_stride, n, USE_FP64)
        x_hat = load_block(x_hat_ptr, offs, mask, USE_FP64)
        D = load_block(denoised_ptr, offs, mask, USE_FP64)
        x_next, d_cur = _euler(x_hat, D, t_hat, t_next, USE_FP64)
        store_block(x_next_ptr, offs, mask, x_next)
        store_block(d_cur_ptr, offs, mask, d_cur)

    @triton.jit
    def _heun_correct_kernel(
        x_hat_ptr,  # *Pointer* to x̂, N samples of M elements each
        d_cur_ptr,  # *Pointer* to d_cur from the Euler step, x̂'s layout
        x_next_ptr,  # *Pointer* to the Euler prediction x_next, x̂'s layout
        denoised_next_ptr,  # *Pointer* to D(x_next; t_next), x̂'s layout
        t_hat_ptr,  # *Pointer* to t̂, (N,)
        t_hat_stride,  # element stride of t̂
        t_next_ptr,  # *Pointer* to t_next, (N,), nonzero
        t_next_stride,  # element stride of t_next
        x_next_new_ptr,  # *Pointer* to the output, the corrected x_next; x̂'s layout and dtype
        M,  # elements per sample
        USE_FP64: tl.constexpr,  # compute in float64 (x̂ is float64), else in float32
        BLOCK_SIZE: tl.constexpr,  # elements of one sample per program
    ):
        n, offs, mask = sample_offsets(M, BLOCK_SIZE)
        t_hat = load_scalar(t_hat_ptr, t_hat_stride, n, USE_FP64)
        t_next = load_scalar(t_next_ptr, t_next_stride, n, USE_FP64)
        x_hat = load_block(x_hat_ptr, offs, mask, USE_FP64)
        d_cur = load_block(d_cur_ptr, offs, mask, USE_FP64)
        x_next = load_block(x_next_ptr, offs, mask, USE_FP64)
        D_next = load_block(denoised_next_ptr, offs, mask, USE_FP64)
        x_next_new = _heun(x_hat, d_cur, x_next, D_next, t_hat, t_next, USE_FP64)
        store_block(x_next_new_ptr, offs, mask, x_next_new)

    # .. math::
    #     noise\_scale = S_{noise} \sqrt{\max((\hat t - t_{cur})(\hat t + t_{cur}), 0)}
    #     \hat x = x + noise\_scale \, \epsilon          (Alg. 2 line 6, ε ~ N(0, S_noise² I))
    # t̂² − t² is formed as (t̂ − t)(t̂ + t): exactly 0 when t̂ = t, and no a·a − b·b for the
    # compiler to contract into an FMA, whose rounding sqrt would blow up to ~t·sqrt(eps).
    @triton.jit
    def _churn_kernel(
        x_ptr,  # *Pointer* to x, N samples of M elements each
        eps_ptr,  # *Pointer* to the standard normal noise ε, x's layout
        t_cur_ptr,  # *Pointer* to t_cur, (N,)
        t_cur_stride,  # element stride of t_cur
        t_hat_ptr,  # *Pointer* to t̂ ≥ t_cur, (N,)
        t_hat_stride,  # element stride of t̂
        S_noise: tl.float64,  # noise inflation S_noise (a float64 argument: no bits lost)
        x_hat_ptr,  # *Pointer* to the output x̂, x's layout and dtype
        M,  # elements per sample
        USE_FP64: tl.constexpr,  # compute in float64 (x is float64), else in float32
        BLOCK_SIZE: tl.constexpr,  # elements of one sample per program
    ):
        n, offs, mask = sample_offsets(M, BLOCK_SIZE)
        t_cur = load_scalar(t_cur_ptr, t_cur_stride, n, USE_FP64)
        t_hat = load_scalar(t_hat_ptr, t_hat_stride, n, USE_FP64)
        noise_scale = sqrt(tl.maximum((t_hat - t_cur) * (t_hat + t_cur), 0.0), USE_FP64)
        noise_scale = noise_scale * float_arg(S_noise, USE_FP64)
        x = load_block(x_ptr, offs, mask, USE_FP64)
        eps = load_block(eps_ptr, offs, mask, USE_FP64)
        store_block(x_hat_ptr, offs, mask, x + noise_scale * eps)

    # .. math::
    #     D = c_{skip} \hat x + c_{out} F_x                 (Eq. 7 at σ = t̂)
    #     d_{cur}, x_{next} as in _euler                    (Alg. 2 lines 7–8)
    @triton.jit
    def _precond_out_euler_kernel(
        x_hat_ptr,  # *Pointer* to x̂, N samples of M elements each
        F_x_ptr,  # *Pointer* to the network output F(c_in·x̂; c_noise), x̂'s layout
        c_skip_ptr,  # *Pointer* to c_skip(t̂), (N,)
        c_skip_stride,  # element stride of c_skip
        c_out_ptr,  # *Pointer* to c_out(t̂), (N,)
        c_out_stride,  # element stride of c_out
        t_hat_ptr,  # *Pointer* to t̂, (N,)
        t_hat_stride,  # element stride of t̂
        t_next_ptr,  # *Pointer* to t_next, (N,); 0 at the last step
        t_next_stride,  # element stride of t_next
        x_next_ptr,  # *Pointer* to the output x_next, x̂'s layout and dtype
        d_cur_ptr,  # *Pointer* to the output d_cur, x̂'s layout and dtype
        M,  # elements per sample
        USE_FP64: tl.constexpr,  # compute in float64 (x̂ is float64), else in float32
        BLOCK_SIZE: tl.constexpr,  # elements of one sample per program
    ):
        n, offs, mask = sample_offsets(M, BLOCK_SIZE)
        c_skip = load_scalar(c_skip_ptr, c_skip_stride, n, USE_FP64)
        c_out = load_scalar(c_out_ptr, c_out_stride, n, USE_FP64)
        t_hat = load_scalar(t_hat_ptr, t_hat_stride, n, USE_FP64)
        t_next = load_scalar(t_next_ptr, t_next_stride, n, USE_FP64)
        x_hat = load_block(x_hat_ptr, offs, mask, USE_FP64)
        F_x = load_block(F_x_ptr, offs, mask, USE_FP64)
        D = c_skip * x_hat + c_out * F_x
        x_next, d_cur = _euler(x_hat, D, t_hat, t_next, USE_FP64)
        store_block(x_next_ptr, offs, mask, x_next)
        store_block(d_cur_ptr, offs, mask, d_cur)

    # .. math::
    #     D_{next} = c_{skip,next} x_{next} + c_{out,next} F_{next}   (Eq. 7 at σ = t_next)
    #     x_{next}^{new} as in _heun                                  (Alg. 2 lines 10–11)
    @triton.jit
    def _precond_out_heun_kernel(
        x_hat_ptr,  # *Pointer* to x̂, N samples of M elements each
        d_cur_ptr,  # *Pointer* to d_cur from the Euler step, x̂'s layout
        x_next_ptr,  # *Pointer* to the Euler prediction x_next, x̂'s layout
        F_next_ptr,  # *Pointer* to the network output at (x_next, t_next), x̂'s layout
        c_skip_ptr,  # *Pointer* to c_skip(t_next), (N,)
        c_skip_stride,  # element stride of c_skip
        c_out_ptr,  # *Pointer* to c_out(t_next), (N,)
        c_out_stride,  # element stride of c_out
        t_hat_ptr,  # *Pointer* to t̂, (N,)
        t_hat_stride,  # element stride of t̂
        t_next_ptr,  # *Pointer* to t_next, (N,), nonzero
        t_next_stride,  # element stride of t_next
        x_next_new_ptr,  # *Pointer* to the output, the corrected x_next; x̂'s layout and dtype
        M,  # elements per sample
        USE_FP64: tl.constexpr,  # compute in float64 (x̂ is float64), else in float32
        BLOCK_SIZE: tl.constexpr,  # elements of one sample per program
    ):
        n, offs, mask = sample_offsets(M, BLOCK_SIZE)
        c_skip = load_scalar(c_skip_ptr, c_skip_stride, n, USE_FP64)
        c_out = load_scalar(c_out_ptr, c_out_stride, n, USE_FP64)
        t_hat = load_scalar(t_hat_ptr, t_hat_stride, n, USE_FP64)
        t_next = load_scalar(t_next_ptr, t_next_stride, n, USE_FP64)
        x_hat = load_block(x_hat_ptr, offs, mask, USE_FP64)
        d_cur = load_block(d_cur_ptr, offs, mask, USE_FP64)
        x_next = load_block(x_next_ptr, offs, mask, USE_FP64)
        F_next = load_block(F_next_ptr, offs, mask, USE_FP64)
        D_next = c_skip * x_next + c_out * F_next
        x_next_new = _heun(x_hat, d_cur, x_next, D_next, t_hat, t_next, USE_FP64)
        store_block(x_next_new_ptr, offs, mask, x_next_new)
else:  # no Triton: the ops below still register, and raise a RuntimeError naming the *_ref
    _euler_step_kernel = _heun_correct_kernel = _churn_kernel = None
    _precond_out_euler_kernel = _precond_out_heun_kernel = None

# ----------------------------------------------------------------------------
# Registered ops, torch.ops.edm_fast_triton.<op> and <op>_out; they validate, allocate, launch.

_euler_step_op, _euler_step_out_op = register_ops(
    "euler_step", _euler_step_kernel, tensors=("x_hat", "denoised"),
    scalars=("t_hat", "t_next"), outs=("x_next", "d_cur"))
_heun_correct_op, _heun_correct_out_op = register_ops(
    "heun_correct", _heun_correct_kernel, tensors=("x_hat", "d_cur", "x_next", "denoised_next"),
    scalars=("t_hat", "t_next"), outs=("x_next_new",))
_churn_op, _churn_out_op = register_ops(
    "churn", _churn_kernel, tensors=("x", "eps"), scalars=("t_cur", "t_hat"),
    floats=("S_noise",), outs=("x_hat",))
_precond_out_euler_op, _precond_out_euler_out_op = register_ops(
    "precond_out_euler", _precond_out_euler_kernel, tensors=("x_hat", "F_x"),
    scalars=("c_skip", "c_out", "t_hat", "t_next"), outs=("x_next", "d_cur"))
_precond_out_heun_op, _precond_out_heun_out_op = register_ops(
    "precond_out_heun", _precond_out_heun_kernel, tensors=("x_hat", "d_cur", "x_next", "F_next"),
    scalars=("c_skip_next", "c_out_next", "t_hat", "t_next"), outs=("x_next_new",))


# ----------------------------------------------------------------------------
# Public functions. Shapes: element tensors (N, ...) with x_hat's (or x's) shape and memory
# layout (contiguous, or all 4-D channels_last), any of float16/bfloat16/float32/float64;
# per-sample scalars (N,) of any float dtype and stride. Outputs have x_hat's (x's) dtype and
# are computed in float32 (float64 for float64 x_hat). `out` takes preallocated buffers
# (static buffers of a CUDA graph); a buffer may be one of the inputs (in place).


def euler_step(x_hat: Tensor, denoised: Tensor, t_hat: Tensor, t_next: Tensor, *,
               out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Euler step of Alg. 2, lines 7–8, fused: returns (x_next, d_cur).

    d_cur = (x̂ − D)/t̂ and x_next = x̂ + (t_next − t̂)·d_cur; t̂ > 0, t_next may be 0.
    """
    if out is None:
        return _euler_step_op(x_hat, denoised, t_hat, t_next)
    x_next, d_cur = _pair("euler_step", out)
    _euler_step_out_op(x_hat, denoised, t_hat, t_next, x_next, d_cur)
    return x_next, d_cur


def heun_correct(x_hat: Tensor, d_cur: Tensor, x_next: Tensor, denoised_next: Tensor,
                 t_hat: Tensor, t_next: Tensor, *, out: Tensor | None = None) -> Tensor:
    """2nd-order correction of Alg. 2, lines 10–11, fused: returns the corrected x_next.

    d' = (x_next − D_next)/t_next, then x̂ + (t_next − t̂)·(½·d_cur + ½·d'). Needs t_next ≠ 0.
    """
    if out is None:
        return _heun_correct_op(x_hat, d_cur, x_next, denoised_next, t_hat, t_next)
    _heun_correct_out_op(x_hat, d_cur, x_next, denoised_next, t_hat, t_next, out)
    return out


def churn(x: Tensor, eps: Tensor, t_cur: Tensor, t_hat: Tensor, S_noise: float, *,
          out: Tensor | None = None) -> Tensor:
    """Noise injection of Alg. 2, line 6, fused: x̂ = x + sqrt(t̂² − t_cur²)·S_noise·ε.

    eps: standard normal, x's shape; t̂ ≥ t_cur (t̂² − t_cur² is clamped at 0 against rounding).
    """
    if out is None:
        return _churn_op(x, eps, t_cur, t_hat, float(S_noise))
    _churn_out_op(x, eps, t_cur, t_hat, float(S_noise), out)
    return out


def precond_out_euler(x_hat: Tensor, F_x: Tensor, c_skip: Tensor, c_out: Tensor, t_hat: Tensor,
                      t_next: Tensor, *,
                      out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """D = c_skip·x̂ + c_out·F_x (Eq. 7) and the Euler step with it (Alg. 2 lines 7–8), one pass.

    Returns (x_next, d_cur) as euler_step(x_hat, precond_out(x_hat, F_x, c_skip, c_out), ...)
    does, without writing D to memory and reading it back.
    """
    if out is None:
        return _precond_out_euler_op(x_hat, F_x, c_skip, c_out, t_hat, t_next)
    x_next, d_cur = _pair("precond_out_euler", out)
    _precond_out_euler_out_op(x_hat, F_x, c_skip, c_out, t_hat, t_next, x_next, d_cur)
    return x_next, d_cur


def precond_out_heun(x_hat: Tensor, d_cur: Tensor, x_next: Tensor, F_next: Tensor,
                     c_skip_next: Tensor, c_out_next: Tensor, t_hat: Tensor, t_next: Tensor, *,
                     out: Tensor | None = None) -> Tensor:
    """D_next = c_skip_next·x_next + c_out_next·F_next (Eq. 7) and the Heun correction, one pass.

    Returns heun_correct(x_hat, d_cur, x_next, precond_out(x_next, F_next, ...), t_hat, t_next)
    without the round trip of D_next through memory. Needs t_next ≠ 0.
    """
    args = (x_hat, d_cur, x_next, F_next, c_skip_next, c_out_next, t_hat, t_next)
    if out is None:
        return _precond_out_heun_op(*args)
    _precond_out_heun_out_op(*args, out)
    return out
