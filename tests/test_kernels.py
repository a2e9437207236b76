"""Tests of the fused Triton kernels (kernels/, installed as edm_fast.kernels).

Each kernel is compared with its *_ref twin, and each *_ref with an independent float64 formula
of EDM Eq. (7) / Algorithm 2 (Karras et al. 2022), over op × dtype × shape with different
scalars per sample. Kernels run on CUDA, or on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, which tests/conftest.py sets when there is no GPU).

Tolerances:
- float32 / float64: kernel and ref do the same operations in the same precision, so they differ
  only by a few roundings (FMA contraction on GPUs; torch's vectorised float32 sqrt on CPU is not
  correctly rounded). Each rounding errs by at most eps/2 of an intermediate, and every
  intermediate is bounded by `scale`, the formula evaluated on absolute values with every
  difference a − b replaced by |a| + |b|. So we require |got − want| ≤ 8·eps·scale per element
  (room for 16 roundings; the formulas have at most 9). A relative tolerance on the output would
  not do: x_next = x̂ + (0 − t̂)·(x̂ − D)/t̂ cancels down to D at the last step.
- float16 / bfloat16: the flash-attention rule. With `exact` the float64 formula on the same
  (rounded) inputs and `naive` the formula computed entirely in the low dtype,
  max|got − exact| ≤ 2·max|naive − exact| + eps·max|exact|. The atol is one unit in the last
  place of the largest output: one output rounding (a truncation in the interpreter) may cost
  that much even where the naive computation happened to be exact.
"""

import importlib
import importlib.util
import operator
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

try:
    import edm_fast.kernels as K
except ImportError:  # the source tree, not installed: kernels/ is importable from the repo root
    import kernels as K

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_PRECISION = (torch.float16, torch.bfloat16)
# (5, 2500): several blocks per sample with a ragged last block; (5, 1000): one masked block.
SHAPES = [(1, 1, 1, 1), (3, 1, 17, 17), (7, 3, 5, 9), (2, 2), (5, 1000), (5, 2500)]
SIGMA_DATA = 0.5
S_NOISE = 1.003  # the tests draw S_noise in [1, 1.1]; this one is for the hand-written cases

# Arguments of each op in signature order: element tensors, per-sample (N,) scalars, floats.
OP_ARGS = {
    "precond_in": (("x",), ("c_in",), ()),
    "precond_out": (("x", "F_x"), ("c_skip", "c_out"), ()),
    "euler_step": (("x_hat", "denoised"), ("t_hat", "t_next"), ()),
    "heun_correct": (("x_hat", "d_cur", "x_next", "denoised_next"), ("t_hat", "t_next"), ()),
    "churn": (("x", "eps"), ("t_cur", "t_hat"), ("S_noise",)),
    "precond_out_euler": (("x_hat", "F_x"), ("c_skip", "c_out", "t_hat", "t_next"), ()),
    "precond_out_heun": (("x_hat", "d_cur", "x_next", "F_next"),
                         ("c_skip_next", "c_out_next", "t_hat", "t_next"), ()),
}
# Ops whose t_next may be 0 (the last step); the Heun correction is never called there.
LAST_STEP_OPS = ("euler_step", "precond_out_euler")

KERNEL_DEVICES = [d for d in ("cpu", "cuda") if K.triton_available(d)]


@pytest.fixture(params=KERNEL_DEVICES or [pytest.param(
    "cpu", marks=pytest.mark.skip(reason="Triton kernels cannot run here: no CUDA device and no "
                                         "TRITON_INTERPRET=1, or Triton missing or disabled"))])
def kernel_device(request):
    return torch.device(request.param)


# ----------------------------------------------------------------------------
# Inputs and the independent float64 math.


def make_args(op, shape, dtype, device, seed_extra=""):
    """Random arguments of `op`, in signature order, with different scalars per sample."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{op}{shape}{dtype}{seed_extra}".encode()))
    n = shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    sigma = torch.exp(uniform(torch.log(torch.tensor(0.002)), torch.log(torch.tensor(80.0))))
    gamma = uniform(0.05, 0.5)
    gamma[0] = 0.0  # no churn for sample 0: x̂ must come back exactly x
    t_next = sigma * uniform(0.2, 0.9)
    if op in LAST_STEP_OPS:
        t_next[0] = 0.0  # the last step of Alg. 2 for sample 0
    t_hat = sigma * (1 + gamma) if op == "churn" else sigma
    sd2 = SIGMA_DATA**2
    scalars = {
        "t_cur": sigma, "t_hat": t_hat, "t_next": t_next,
        "c_in": 1 / (sd2 + t_hat**2).sqrt(),
        "c_skip": sd2 / (t_hat**2 + sd2), "c_out": t_hat * SIGMA_DATA / (t_hat**2 + sd2).sqrt(),
        "c_skip_next": sd2 / (t_next**2 + sd2),
        "c_out_next": t_next * SIGMA_DATA / (t_next**2 + sd2).sqrt(),
    }
    per_sample = sigma.reshape(-1, *[1] * (len(shape) - 1))

    def element(name):
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name in ("x", "x_hat", "x_next"):  # noisy samples: data + σ·noise
            data = SIGMA_DATA * torch.randn(shape, generator=gen, dtype=torch.float64)
            return data + per_sample * z
        return SIGMA_DATA * z if name.startswith("denoised") else z

    tensors, scalar_names, floats = OP_ARGS[op]
    scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = [element(t).to(dtype) for t in tensors]
    args += [scalars[s].to(scalar_dtype) for s in scalar_names]
    args += [1 + 0.1 * torch.rand((), generator=gen, dtype=torch.float64).item() for _ in floats]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def formula(op, v, sub):
    """The math of `op` on the named values `v` (scalars shaped (N, 1, ...) to broadcast).

    With sub=operator.sub it is the value. With absolute inputs and sub=operator.add it bounds
    every intermediate of any evaluation order: the scale of the rounding-error bound.
    """
    def euler(x_hat, D):
        d_cur = sub(x_hat, D) / v["t_hat"]
        return x_hat + sub(v["t_next"], v["t_hat"]) * d_cur, d_cur

    def heun(D_next):
        d_prime = sub(v["x_next"], D_next) / v["t_next"]
        return (v["x_hat"] + sub(v["t_next"], v["t_hat"]) * (v["d_cur"] + d_prime) / 2,)

    if op == "precond_in":
        return (v["c_in"] * v["x"],)
    if op == "precond_out":
        return (v["c_skip"] * v["x"] + v["c_out"] * v["F_x"],)
    if op == "euler_step":
        return euler(v["x_hat"], v["denoised"])
    if op == "heun_correct":
        return heun(v["denoised_next"])
    if op == "churn":
        noise_scale = sub(v["t_hat"] ** 2, v["t_cur"] ** 2).sqrt() * v["S_noise"]
        return (v["x"] + noise_scale * v["eps"],)
    if op == "precond_out_euler":
        return euler(v["x_hat"], v["c_skip"] * v["x_hat"] + v["c_out"] * v["F_x"])
    if op == "precond_out_heun":
        return heun(v["c_skip_next"] * v["x_next"] + v["c_out_next"] * v["F_next"])
    raise KeyError(op)


def named(op, args, dtype):
    """`args` by name, tensors in `dtype`, per-sample scalars shaped to broadcast."""
    tensors, scalars, floats = OP_ARGS[op]
    ndim = args[0].dim()
    out = {}
    for name, a in zip(tensors + scalars + floats, args):
        if name in scalars:
            a = a.reshape(-1, *[1] * (ndim - 1))
        out[name] = a.to(dtype) if isinstance(a, torch.Tensor) else a
    return out


def exact_and_scale(op, args):
    """The float64 value of `op` on `args` and the magnitude scale of its rounding errors."""
    v = named(op, args, torch.float64)
    exact = formula(op, v, operator.sub)
    absolute = {k: (a.abs() if isinstance(a, torch.Tensor) else abs(a)) for k, a in v.items()}
    return exact, formula(op, absolute, operator.add)


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def assert_within(got, want, tol, what):
    err = (got.double() - want.double()).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    worst = err.nan_to_num(float("inf")).argmax()
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{err.numel()} elements off, worst error "
                           f"{err.flatten()[worst]:.3g}, tolerance there "
                           f"{tol.flatten()[worst]:.3g}")


def assert_flash_attention_rule(got, exact, naive, dtype, what):
    assert torch.isfinite(naive).all(), "test inputs overflow the naive low-precision baseline"
    err = (got.double() - exact).abs().max().item()
    naive_err = (naive.double() - exact).abs().max().item()
    atol = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err <= 2 * naive_err + atol, (f"{what}: error {err:.3g} > 2 × naive {dtype} error "
                                         f"{naive_err:.3g} + {atol:.3g}")


def check_against(got, want, op, args, dtype, what):
    """float32/float64: |got − want| ≤ 8·eps·scale; low precision: the flash-attention rule."""
    exact, scale = exact_and_scale(op, args)
    if dtype in LOW_PRECISION:
        naive = formula(op, named(op, args, dtype), operator.sub)
        for g, e, nv in zip(got, exact, naive):
            assert_flash_attention_rule(g, e, nv, dtype, what)
        return
    eps = torch.finfo(dtype).eps
    for g, w, s in zip(got, want, scale):
        assert_within(g, w, 8 * eps * s.to(g.device), what)


# ----------------------------------------------------------------------------
# Equivalence: kernel vs ref vs math.


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", list(OP_ARGS))
def test_ref_matches_math(op, dtype, shape):
    args = make_args(op, shape, dtype, "cpu")
    want = as_tuple(K.OPS[op][1](*args))
    exact, _ = exact_and_scale(op, args)
    for w in want:
        assert w.dtype == dtype and w.shape == shape
    check_against(want, exact, op, args, dtype, f"{op}_ref vs float64 math")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", list(OP_ARGS))
def test_kernel_matches_ref(op, dtype, shape, kernel_device):
    args = make_args(op, shape, dtype, kernel_device)
    kernel, ref = K.OPS[op]
    got, want = as_tuple(kernel(*args)), as_tuple(ref(*args))
    assert len(got) == len(want)
    for g in got:
        assert g.dtype == dtype and g.shape == shape and g.device == args[0].device
    check_against(got, want, op, args, dtype, f"{op} kernel vs {op}_ref")


def test_shapes_cover_several_blocks_per_sample():
    common = importlib.import_module(f"{K.__name__}._common")
    assert 2500 > common.block_size(2500) and 2500 % common.block_size(2500) != 0


def test_churn_without_noise_returns_x(kernel_device):
    x = torch.randn(3, 50, device=kernel_device)
    t = torch.rand(3, device=kernel_device) + 0.1
    assert torch.equal(K.churn(x, torch.randn_like(x), t, t, S_NOISE), x)
    assert torch.equal(K.churn_ref(x, torch.randn_like(x), t, t, S_NOISE), x)


# ----------------------------------------------------------------------------
# Fused variants equal the composition of the unfused ops.


def _compositions(args, step, precond_out, heun):
    x_hat, F_x, x_next, F_next = args["x_hat"], args["F_x"], args["x_next"], args["F_next"]
    D = precond_out(x_hat, F_x, args["c_skip"], args["c_out"])
    x_next_e, d_cur = step(x_hat, D, args["t_hat"], args["t_next_e"])
    D_next = precond_out(x_next, F_next, args["c_skip_next"], args["c_out_next"])
    return (x_next_e, d_cur), heun(x_hat, d_cur, x_next, D_next, args["t_hat"], args["t_next"])


def _fused_case(dtype, device):
    e = make_args("precond_out_euler", (3, 2, 9, 5), dtype, device)
    h = make_args("precond_out_heun", (3, 2, 9, 5), dtype, device)
    return dict(x_hat=e[0], F_x=e[1], c_skip=e[2], c_out=e[3], t_hat=e[4], t_next_e=e[5],
                x_next=h[2], F_next=h[3], c_skip_next=h[4], c_out_next=h[5], t_next=h[7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_refs_equal_composition_of_unfused_refs(dtype):
    # Bitwise: in float32/float64 the unfused refs round D to the compute dtype, a no-op.
    # (In float16/bfloat16 they would round D to the low dtype, which the fused ops avoid.)
    a = _fused_case(dtype, "cpu")
    euler, heun = _compositions(a, K.euler_step_ref, K.precond_out_ref, K.heun_correct_ref)
    fused_euler = K.precond_out_euler_ref(a["x_hat"], a["F_x"], a["c_skip"], a["c_out"],
                                          a["t_hat"], a["t_next_e"])
    _, d_cur = fused_euler
    fused_heun = K.precond_out_heun_ref(a["x_hat"], d_cur, a["x_next"], a["F_next"],
                                        a["c_skip_next"], a["c_out_next"], a["t_hat"],
                                        a["t_next"])
    assert all(torch.equal(f, u) for f, u in zip(fused_euler, euler))
    assert torch.equal(fused_heun, heun)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernels_match_composition_of_unfused_kernels(dtype, kernel_device):
    a = _fused_case(dtype, kernel_device)
    euler, heun = _compositions(a, K.euler_step, K.precond_out, K.heun_correct)
    fused_euler = K.precond_out_euler(a["x_hat"], a["F_x"], a["c_skip"], a["c_out"], a["t_hat"],
                                      a["t_next_e"])
    fused_heun = K.precond_out_heun(a["x_hat"], euler[1], a["x_next"], a["F_next"],
                                    a["c_skip_next"], a["c_out_next"], a["t_hat"], a["t_next"])
    eps = torch.finfo(dtype).eps
    euler_args = [a[k] for k in ("x_hat", "F_x", "c_skip", "c_out", "t_hat", "t_next_e")]
    _, scale = exact_and_scale("precond_out_euler", euler_args)
    for f, u, s in zip(fused_euler, euler, scale):
        assert_within(f, u, 8 * eps * s, "precond_out_euler vs precond_out + euler_step")
    heun_args = [a["x_hat"], euler[1]] + [a[k] for k in ("x_next", "F_next", "c_skip_next",
                                                         "c_out_next", "t_hat", "t_next")]
    _, (scale,) = exact_and_scale("precond_out_heun", heun_args)
    assert_within(fused_heun, heun, 8 * eps * scale,
                  "precond_out_heun vs precond_out + heun_correct")


# ----------------------------------------------------------------------------
# out= buffers, layouts and argument dtypes.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(OP_ARGS))
def test_out_buffers_are_filled_and_returned(op, dtype, kernel_device):
    args = make_args(op, (3, 1, 17, 17), dtype, kernel_device)
    kernel, ref = K.OPS[op]
    n_out = len(as_tuple(ref(*args)))
    for fn in (kernel, ref):
        bufs = tuple(torch.full_like(args[0], float("nan")) for _ in range(n_out))
        result = fn(*args, out=bufs if n_out > 1 else bufs[0])
        assert all(r is b for r, b in zip(as_tuple(result), bufs))
        assert all(not b.isnan().any() for b in bufs), f"{fn.__name__} left elements unwritten"
        assert all(torch.equal(b, r) for b, r in zip(bufs, as_tuple(fn(*args))))


def test_out_may_be_an_input(kernel_device):
    x_hat, denoised, t_hat, t_next = make_args("euler_step", (3, 40), torch.float32, kernel_device)
    want = K.euler_step(x_hat, denoised, t_hat, t_next)
    got = K.euler_step(x_hat, denoised, t_hat, t_next, out=(x_hat, denoised))
    assert got[0] is x_hat and all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("shape", [(7, 3, 5, 9), (3, 1, 17, 17)], ids=str)
@pytest.mark.parametrize("op", list(OP_ARGS))
def test_channels_last(op, shape, kernel_device):
    args = make_args(op, shape, torch.float32, kernel_device)
    n_tensors = len(OP_ARGS[op][0])
    cl = [a.contiguous(memory_format=torch.channels_last) if i < n_tensors else a
          for i, a in enumerate(args)]
    for got, want in zip(as_tuple(K.OPS[op][0](*cl)), as_tuple(K.OPS[op][0](*args))):
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, want)


@pytest.mark.parametrize("F_dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op", ["precond_out", "precond_out_euler", "precond_out_heun"])
def test_network_output_in_another_dtype(op, F_dtype, kernel_device):
    args = make_args(op, (3, 2, 8, 8), torch.float32, kernel_device)
    f = OP_ARGS[op][0].index("F_next" if op == "precond_out_heun" else "F_x")
    args[f] = args[f].to(F_dtype)
    got, want = as_tuple(K.OPS[op][0](*args)), as_tuple(K.OPS[op][1](*args))
    check_against(got, want, op, args, torch.float32, f"{op} with F in {F_dtype}")
    assert all(g.dtype == torch.float32 for g in got)


@pytest.mark.parametrize("form", ["float64", "float16", "expanded", "strided"])
def test_per_sample_scalar_forms(form, kernel_device):
    x_hat, denoised, t_hat, t_next = make_args("euler_step", (4, 3, 6), torch.float32,
                                               kernel_device)
    if form in ("float64", "float16"):
        t_hat = t_hat.to(getattr(torch, form))
    elif form == "expanded":
        t_hat = t_hat[1:2].expand(4)
    else:
        t_hat = torch.stack([t_hat, t_hat + 1], dim=1)[:, 0]
    assert t_hat.shape == (4,)
    args = [x_hat, denoised, t_hat, t_next]
    check_against(K.euler_step(*args), K.euler_step_ref(*args), "euler_step", args,
                  torch.float32, f"euler_step with {form} t_hat")


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (3, 0)], ids=str)
def test_empty_tensors(shape, kernel_device):
    x = torch.empty(shape, device=kernel_device)
    c = torch.ones(shape[0], device=kernel_device)
    assert K.precond_in(x, c).shape == shape
    assert [o.shape for o in K.euler_step(x, x, c, c)] == [shape, shape]


# ----------------------------------------------------------------------------
# Validation: errors a user can act on.


def _euler(device, **override):
    """A call of euler_step on valid arguments, with some of them replaced."""
    names = ("x_hat", "denoised", "t_hat", "t_next")
    args = dict(zip(names, make_args("euler_step", (3, 2, 4, 4), torch.float32, device)))
    args.update(override)
    out = {"out": args["out"]} if "out" in args else {}
    return lambda: K.euler_step(**{k: args[k] for k in names}, **out)


INVALID = {  # case: (device -> call, error type, message pattern)
    "shape mismatch": (lambda d: _euler(d, denoised=torch.randn(3, 2, 4, 5, device=d)),
                       ValueError, "shape"),
    "scalar not (N,)": (lambda d: _euler(d, t_hat=torch.ones(1, device=d)), ValueError,
                        r"\(N,\) = \(3,\)"),
    "0-d scalar": (lambda d: _euler(d, t_next=torch.tensor(1.0, device=d)), ValueError,
                   r"\(N,\)"),
    "2-d scalar": (lambda d: _euler(d, t_hat=torch.ones(3, 1, device=d)), ValueError, r"\(N,\)"),
    "device mismatch": (lambda d: _euler(d, t_hat=torch.ones(3, device="meta")), ValueError,
                        "is on meta"),
    "non-contiguous": (lambda d: _euler(d, x_hat=torch.randn(3, 4, 4, 2, device=d).permute(
        0, 3, 1, 2)), ValueError, "contiguous"),
    "layouts differ": (lambda d: _euler(d, denoised=torch.randn(3, 2, 4, 4, device=d).contiguous(
        memory_format=torch.channels_last)), ValueError, "layout"),
    "integer x": (lambda d: _euler(d, x_hat=torch.ones(3, 2, 4, 4, dtype=torch.int64, device=d)),
                  TypeError, "dtype"),
    "integer scalar": (lambda d: _euler(d, t_next=torch.ones(3, dtype=torch.int32, device=d)),
                       TypeError, "dtype"),
    "0-d x": (lambda d: lambda: K.precond_in(torch.tensor(1.0, device=d), torch.ones(1, device=d)),
              ValueError, "batch dimension"),
    "out dtype": (lambda d: _euler(d, out=(torch.empty(3, 2, 4, 4, dtype=torch.float64, device=d),
                                           torch.empty(3, 2, 4, 4, device=d))), TypeError,
                  "dtype"),
    "out shape": (lambda d: _euler(d, out=(torch.empty(3, 2, 4, 4, device=d),
                                           torch.empty(3, 32, device=d))), ValueError, "shape"),
    "out not a pair": (lambda d: _euler(d, out=torch.empty(3, 2, 4, 4, device=d)), TypeError,
                       "pair"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_inputs_raise_clear_errors(case, kernel_device):
    make_call, error, message = INVALID[case]
    with pytest.raises(error, match=message):
        make_call(kernel_device)()


def test_ref_out_must_be_a_pair():
    args = make_args("euler_step", (3, 4), torch.float32, "cpu")
    with pytest.raises(TypeError, match="pair"):
        K.euler_step_ref(*args, out=torch.empty(3, 4))


def test_fake_implementations_validate_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 4)
        out = torch.ops.edm_fast_triton.precond_in(x, torch.empty(3))
        assert out.shape == (3, 4)
        with pytest.raises(ValueError, match=r"\(N,\)"):
            torch.ops.edm_fast_triton.precond_in(x, torch.empty(4))


# ----------------------------------------------------------------------------
# torch.library registration and torch.compile.


@pytest.mark.parametrize("op", list(OP_ARGS))
def test_registered_ops(op, kernel_device):
    args = make_args(op, (2, 3, 4), torch.float32, kernel_device)
    want = as_tuple(K.OPS[op][0](*args))
    got = as_tuple(getattr(torch.ops.edm_fast_triton, op)(*args))
    bufs = [torch.full_like(args[0], float("nan")) for _ in want]
    getattr(torch.ops.edm_fast_triton, f"{op}_out")(*args, *bufs)
    assert all(torch.equal(g, w) and torch.equal(b, w) for g, b, w in zip(got, bufs, want))


@pytest.mark.parametrize("op", ["precond_out", "euler_step", "churn"])
def test_opcheck(op, kernel_device):
    args = make_args(op, (2, 3), torch.float32, kernel_device)
    torch.library.opcheck(getattr(torch.ops.edm_fast_triton, op).default, tuple(args))
    bufs = tuple(torch.empty_like(args[0]) for _ in as_tuple(K.OPS[op][1](*args)))
    torch.library.opcheck(getattr(torch.ops.edm_fast_triton, f"{op}_out").default,
                          tuple(args) + bufs)


def test_torch_compile_traces_a_whole_step(kernel_device):
    """One Alg. 2 step through the ops, traced by torch.compile without graph breaks."""
    x, eps, t_cur, t_hat, _ = make_args("churn", (2, 1, 4, 4), torch.float32, kernel_device)
    t_next = t_hat * 0.5
    F = torch.tanh  # a stand-in for the network

    def step(x, eps, t_cur, t_hat, t_next):
        x_hat = K.churn(x, eps, t_cur, t_hat, S_NOISE)
        c_in, c_out = 1 / (t_hat**2 + 0.25).sqrt(), t_hat * 0.5 / (t_hat**2 + 0.25).sqrt()
        F_x = F(K.precond_in(x_hat, c_in))
        x_next, d_cur = K.precond_out_euler(x_hat, F_x, 0.25 / (t_hat**2 + 0.25), c_out, t_hat,
                                            t_next)
        c_in_n = 1 / (t_next**2 + 0.25).sqrt()
        F_next = F(K.precond_in(x_next, c_in_n))
        return K.precond_out_heun(x_hat, d_cur, x_next, F_next, 0.25 / (t_next**2 + 0.25),
                                  t_next * 0.5 * c_in_n, t_hat, t_next)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, eps, t_cur, t_hat, t_next), step(x, eps, t_cur, t_hat, t_next))


# ----------------------------------------------------------------------------
# Availability, the kill-switch, and life without Triton.


def test_triton_available_predicate(monkeypatch):
    assert not K.triton_available("meta")
    cpu_ok = "cpu" in KERNEL_DEVICES
    assert K.triton_available("cpu") == K.triton_available(torch.ones(1)) == cpu_ok
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not K.triton_available("cpu")
    monkeypatch.setenv("EDM_FAST_DISABLE_TRITON", "1")
    assert not any(K.triton_available(d) for d in ("cpu", "cuda", None))


def test_kill_switch_raises_and_refs_still_work(monkeypatch):
    args = make_args("euler_step", (2, 5), torch.float32, "cpu")
    monkeypatch.setenv("EDM_FAST_DISABLE_TRITON", "1")
    with pytest.raises(RuntimeError, match="EDM_FAST_DISABLE_TRITON=1.*euler_step_ref"):
        K.euler_step(*args)
    assert K.euler_step_ref(*args)[0].shape == (2, 5)


NO_TRITON_SCRIPT = """
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is hidden for this test")
sys.meta_path.insert(0, NoTriton())
import torch
import {module} as K
assert not K.HAS_TRITON and not K.triton_available() and not K.triton_available("cpu")
x, c = torch.randn(2, 3), torch.rand(2)
assert torch.equal(K.precond_in_ref(x, c), c[:, None] * x)
try:
    K.precond_in(x, c)
except RuntimeError as e:
    assert "Triton is not installed" in str(e) and "precond_in_ref" in str(e), e
else:
    raise AssertionError("no RuntimeError")
print("ok")
"""


def test_import_and_refs_without_triton():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH",
                                                                                  "")])}
    result = subprocess.run([sys.executable, "-c", NO_TRITON_SCRIPT.format(module=K.__name__)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_second_import_under_another_name_reuses_the_ops():
    path = Path(K.__file__).parent
    spec = importlib.util.spec_from_file_location("kernels_second_copy", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    copy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = copy
    try:
        spec.loader.exec_module(copy)  # would raise "already registered" without the guard
        x, c = torch.randn(2, 3), torch.rand(2)
        assert torch.equal(copy.precond_in_ref(x, c), K.precond_in_ref(x, c))
    finally:
        for name in [m for m in sys.modules if m.startswith(spec.name)]:
            del sys.modules[name]
