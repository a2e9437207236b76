"""Fused Triton kernels for the EDM sampler (Karras et al. 2022), installed as edm_fast.kernels.

Each op is one launch over the whole batch and has a pure-PyTorch `<op>_ref` twin with the
same signature and precision policy (float32 arithmetic, float64 for float64 inputs):

    precond_in(x, c_in)                            c_in·x                                Eq. 7
    precond_out(x, F_x, c_skip, c_out)             D = c_skip·x + c_out·F_x              Eq. 7
    euler_step(x_hat, denoised, t_hat, t_next)     (x_next, d_cur)                Alg. 2 l.7–8
    heun_correct(x_hat, d_cur, x_next, denoised_next, t_hat, t_next)  x_next'    Alg. 2 l.10–11
    churn(x, eps, t_cur, t_hat, S_noise)           x + sqrt(t̂² − t²)·S_noise·ε       Alg. 2 l.6
    precond_out_euler(x_hat, F_x, c_skip, c_out, t_hat, t_next)        precond_out + euler_step
    precond_out_heun(x_hat, d_cur, x_next, F_next, c_skip_next, c_out_next, t_hat, t_next)
                                                   precond_out at t_next + heun_correct

Element tensors are (N, ...), per-sample scalars (N,); every op takes `out=` buffers and is
registered as torch.ops.edm_fast_triton.<op> and <op>_out, so torch.compile can trace it.
`triton_available(device)` says whether the kernels can run on a device (False without
Triton, with EDM_FAST_DISABLE_TRITON=1, and on CPU unless TRITON_INTERPRET=1); the `_ref`
functions always work.
"""

from ._common import HAS_TRITON, triton_available
from .precond import precond_in, precond_in_ref, precond_out, precond_out_ref
from .steps import (churn, churn_ref, euler_step, euler_step_ref, heun_correct, heun_correct_ref,
                    precond_out_euler, precond_out_euler_ref, precond_out_heun,
                    precond_out_heun_ref)

# name -> (fused kernel, pure-PyTorch reference), for tests, benchmarks and backends.
OPS = {
    "precond_in": (precond_in, precond_in_ref),
    "precond_out": (precond_out, precond_out_ref),
    "euler_step": (euler_step, euler_step_ref),
    "heun_correct": (heun_correct, heun_correct_ref),
    "churn": (churn, churn_ref),
    "precond_out_euler": (precond_out_euler, precond_out_euler_ref),
    "precond_out_heun": (precond_out_heun, precond_out_heun_ref),
}

__all__ = ["HAS_TRITON", "OPS", "triton_available", *(n for pair in OPS.values() for n in
                                                       (pair[0].__name__, pair[1].__name__))]
