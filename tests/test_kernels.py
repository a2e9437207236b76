"""Tests of the fused Triton kernels (kernels/, installed as edm_fast.kernels).

Each kernel is compared with its *_ref twin, and each *_ref with an independent float64 formula
of EDM Eq. (7) (Karras et al. 2022) or of the sum Σ c_j·src_j (lincomb, the sampler program's
LIN op), over op × dtype × shape with different scalars per sample. Kernels run on CUDA, or on
the CPU through Triton's interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets when
there is no GPU).

Tolerances of precond_in / precond_out:
- float32 / float64: kernel and ref do the same operations in the same precision, so they differ
  only by a few roundings (FMA contraction on GPUs). Each rounding errs by at most eps/2 of an
  intermediate, and every intermediate is bounded by `scale`, the formula evaluated on absolute
  values. So we require |got − want| ≤ 8·eps·scale per element (room for 16 roundings; the
  formulas have at most 3). A relative tolerance on the output would not do: c_skip·x + c_out·F
  may cancel.
- float16 / bfloat16: the flash-attention rule. With `exact` the float64 formula on the same
  (rounded) inputs and `naive` the formula computed entirely in the low dtype,
  max|got − exact| ≤ 2·max|naive − exact| + eps·max|exact|. The atol is one unit in the last
  place of the largest output: one output rounding (a truncation in the interpreter) may cost
  that much even where the naive computation happened to be exact.

Tolerances of lincomb (out = Σ_{j<N} c_j·src_j, accumulated left to right in float32, float64
for float64 sources), per element, with scale = Σ|c_j|·|src_j| (every partial sum is bounded by
it) and exact the float64 sum of the same (already rounded) inputs:
- float32 / float64: each of the N coefficients is rounded to the compute dtype (float32 only),
  each of the N products and each of the N − 1 additions is rounded: at most (3N − 1)/2 roundings
  of eps/2 · scale. So |ref − exact| ≤ 2N·eps·scale, and the kernel, which may round less (FMA
  on GPUs) but no more, is within 4N·eps·scale of ref. A relative tolerance on the output would
  not do: solver coefficients cancel (x + h·(x − D)/σ with D ≈ x).
- float16 / bfloat16: the float32 sum is within 2N·eps32·scale of exact; then one rounding to
  the output dtype, at most one unit in the last place (the interpreter truncates to bfloat16;
  torch rounds to nearest), ulp(v) ≤ eps·|v|, plus the spacing of float16's subnormals, tiny·eps,
  for outputs below the normal range. So |got − exact| ≤ eps·|exact| + 3N·eps32·scale +
  tiny·eps for both kernel and ref (3N rather than 2N: the ulp is of the float32 value, not of
  exact), and kernel and ref are within twice that of each other.
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

import edm_fast.kernels as K

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_PRECISION = (torch.float16, torch.bfloat16)
# (5, 2500): several blocks per sample with a ragged last block; (5, 1000): one masked block.
SHAPES = [(1, 1, 1, 1), (3, 1, 17, 17), (7, 3, 5, 9), (2, 2), (5, 1000), (5, 2500)]
SIGMA_DATA = 0.5

OP_ARGS = K.OP_ARGS  # each per-sample op's arguments (lincomb has its own tests/rows)

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
    sd2 = SIGMA_DATA**2
    scalars = {
        "c_in": 1 / (sd2 + sigma**2).sqrt(),
        "c_skip": sd2 / (sigma**2 + sd2), "c_out": sigma * SIGMA_DATA / (sigma**2 + sd2).sqrt(),
    }
    per_sample = sigma.reshape(-1, *[1] * (len(shape) - 1))

    def element(name):
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name == "x":  # noisy samples: data + σ·noise
            data = SIGMA_DATA * torch.randn(shape, generator=gen, dtype=torch.float64)
            return data + per_sample * z
        return z

    tensors, scalar_names, floats = OP_ARGS[op]
    scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = [element(t).to(dtype) for t in tensors]
    args += [scalars[s].to(scalar_dtype) for s in scalar_names]
    args += [1 + 0.1 * torch.rand((), generator=gen, dtype=torch.float64).item() for _ in floats]
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def formula(op, v, sub):
    """The math of `op` on the named values `v` (scalars shaped (N, 1, ...) to broadcast).

    With sub=operator.sub it is the value. With absolute inputs and sub=operator.add it bounds
    every intermediate of any evaluation order: the scale of the rounding-error bound. (The
    formulas here have no difference; `sub` stays for formulas that would.)
    """
    if op == "precond_in":
        return (v["c_in"] * v["x"],)
    if op == "precond_out":
        return (v["c_skip"] * v["x"] + v["c_out"] * v["F_x"],)
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
    if err.numel() == 0:
        return
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


@pytest.mark.parametrize("i", [0, 1])
def test_out_may_be_an_input(i, kernel_device):
    args = make_args("precond_out", (3, 40), torch.float32, kernel_device)
    want = K.precond_out(*args)
    got = K.precond_out(*args, out=args[i])
    assert got is args[i] and torch.equal(got, want)


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
def test_network_output_in_another_dtype(F_dtype, kernel_device):
    op = "precond_out"
    args = make_args(op, (3, 2, 8, 8), torch.float32, kernel_device)
    args[1] = args[1].to(F_dtype)
    got, want = as_tuple(K.OPS[op][0](*args)), as_tuple(K.OPS[op][1](*args))
    check_against(got, want, op, args, torch.float32, f"{op} with F in {F_dtype}")
    assert all(g.dtype == torch.float32 for g in got)


@pytest.mark.parametrize("form", ["float64", "float16", "expanded", "strided"])
def test_per_sample_scalar_forms(form, kernel_device):
    x, F_x, c_skip, c_out = make_args("precond_out", (4, 3, 6), torch.float32, kernel_device)
    if form in ("float64", "float16"):
        c_skip = c_skip.to(getattr(torch, form))
    elif form == "expanded":
        c_skip = c_skip[1:2].expand(4)
    else:
        c_skip = torch.stack([c_skip, c_skip + 1], dim=1)[:, 0]
    assert c_skip.shape == (4,)
    args = [x, F_x, c_skip, c_out]
    check_against((K.precond_out(*args),), (K.precond_out_ref(*args),), "precond_out", args,
                  torch.float32, f"precond_out with {form} c_skip")


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (3, 0)], ids=str)
def test_empty_tensors(shape, kernel_device):
    x = torch.empty(shape, device=kernel_device)
    c = torch.ones(shape[0], device=kernel_device)
    assert K.precond_in(x, c).shape == shape
    assert K.precond_out(x, x, c, c).shape == shape
    assert K.lincomb([x, x], [1.0, 2.0]).shape == shape


# ----------------------------------------------------------------------------
# Validation: errors a user can act on.


def _precond_out(device, **override):
    """A call of precond_out on valid arguments, with some of them replaced."""
    names = ("x", "F_x", "c_skip", "c_out")
    args = dict(zip(names, make_args("precond_out", (3, 2, 4, 4), torch.float32, device)))
    args.update(override)
    out = {"out": args["out"]} if "out" in args else {}
    return lambda: K.precond_out(**{k: args[k] for k in names}, **out)


INVALID = {  # case: (device -> call, error type, message pattern)
    "shape mismatch": (lambda d: _precond_out(d, F_x=torch.randn(3, 2, 4, 5, device=d)),
                       ValueError, "shape"),
    "scalar not (N,)": (lambda d: _precond_out(d, c_skip=torch.ones(1, device=d)), ValueError,
                        r"\(N,\) = \(3,\)"),
    "0-d scalar": (lambda d: _precond_out(d, c_out=torch.tensor(1.0, device=d)), ValueError,
                   r"\(N,\)"),
    "2-d scalar": (lambda d: _precond_out(d, c_skip=torch.ones(3, 1, device=d)), ValueError,
                   r"\(N,\)"),
    "device mismatch": (lambda d: _precond_out(d, c_skip=torch.ones(3, device="meta")), ValueError,
                        "is on meta"),
    "non-contiguous": (lambda d: _precond_out(d, x=torch.randn(3, 4, 4, 2, device=d).permute(
        0, 3, 1, 2)), ValueError, "contiguous"),
    "layouts differ": (lambda d: _precond_out(d, F_x=torch.randn(3, 2, 4, 4, device=d).contiguous(
        memory_format=torch.channels_last)), ValueError, "layout"),
    "integer x": (lambda d: _precond_out(d, x=torch.ones(3, 2, 4, 4, dtype=torch.int64, device=d)),
                  TypeError, "dtype"),
    "integer scalar": (lambda d: _precond_out(d, c_out=torch.ones(3, dtype=torch.int32, device=d)),
                       TypeError, "dtype"),
    "0-d x": (lambda d: lambda: K.precond_in(torch.tensor(1.0, device=d), torch.ones(1, device=d)),
              ValueError, "batch dimension"),
    "out dtype": (lambda d: _precond_out(d, out=torch.empty(3, 2, 4, 4, dtype=torch.float64,
                                                            device=d)), TypeError, "dtype"),
    "out shape": (lambda d: _precond_out(d, out=torch.empty(3, 32, device=d)), ValueError,
                  "shape"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_inputs_raise_clear_errors(case, kernel_device):
    make_call, error, message = INVALID[case]
    with pytest.raises(error, match=message):
        make_call(kernel_device)()


def test_fake_implementations_validate_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 4)
        out = torch.ops.edm_fast_triton.precond_in(x, torch.empty(3))
        assert out.shape == (3, 4)
        with pytest.raises(ValueError, match=r"\(N,\)"):
            torch.ops.edm_fast_triton.precond_in(x, torch.empty(4))
        assert torch.ops.edm_fast_triton.lincomb([x, x], [1.0, 2.0]).shape == (3, 4)
        with pytest.raises(ValueError, match="shape"):
            torch.ops.edm_fast_triton.lincomb([x, torch.empty(4, 3)], [1.0, 2.0])
        with pytest.raises(ValueError, match="finite"):
            torch.ops.edm_fast_triton.lincomb_out([x], [float("nan")], x)


# ----------------------------------------------------------------------------
# lincomb, the LIN op of the sampler program: out = Σ_j coefs[j]·srcs[j].

LINCOMB_COUNTS = [1, 2, 3, 5, 8]  # 8 = K.MAX_SOURCES, every pointer slot of the kernel
# 1: a one-element block; 7: one masked block; 4097: four full blocks and a last block of one.
LINCOMB_SIZES = [(1,), (7,), (4097,)]


def lincomb_args(n, shape, dtype, device, seed=""):
    """n sources of different magnitudes (like x ~ σ·noise and D ~ data) and n coefficients of
    both signs that float32 cannot hold exactly (like a solver's h/σ products)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"lincomb{n}{shape}{dtype}{seed}".encode()))
    mags = 10 ** (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    srcs = [(m * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)
            for m in mags.tolist()]
    coefs = (4 * torch.rand(n, generator=gen, dtype=torch.float64) - 2).tolist()
    return srcs, coefs


def lincomb_exact(srcs, coefs):
    """The float64 sum of the (rounded) inputs, and scale = Σ|c_j|·|src_j|."""
    exact = sum(c * s.double() for c, s in zip(coefs, srcs))
    scale = sum(abs(c) * s.double().abs() for c, s in zip(coefs, srcs))
    return exact, scale


def lincomb_tol(srcs, coefs, exact, scale):
    """The per-element error bound of one evaluation against exact (see the module docstring)."""
    n, dtype = len(srcs), srcs[0].dtype
    if dtype in LOW_PRECISION:
        fi = torch.finfo(dtype)
        return (fi.eps * exact.abs() + 3 * n * torch.finfo(torch.float32).eps * scale
                + fi.tiny * fi.eps)
    return 2 * n * torch.finfo(dtype).eps * scale


@pytest.mark.parametrize("shape", LINCOMB_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n", LINCOMB_COUNTS)
def test_lincomb_matches_ref(n, dtype, shape, kernel_device):
    srcs, coefs = lincomb_args(n, shape, dtype, kernel_device)
    got, want = K.lincomb(srcs, coefs), K.lincomb_ref(srcs, coefs)
    for r in (got, want):
        assert r.dtype == dtype and r.shape == shape and r.device == srcs[0].device
        assert all(r.data_ptr() != s.data_ptr() for s in srcs)
    exact, scale = lincomb_exact(srcs, coefs)
    tol = lincomb_tol(srcs, coefs, exact, scale).to(kernel_device)
    assert_within(want, exact, tol, f"lincomb_ref, {n} sources, vs float64 math")
    if dtype in LOW_PRECISION:
        assert_within(got, exact, tol, f"lincomb, {n} sources, vs float64 math")
        assert_within(got, want, 2 * tol, f"lincomb, {n} sources, vs lincomb_ref")
    else:
        assert_within(got, want, 2 * tol, f"lincomb, {n} sources, vs lincomb_ref")


@pytest.mark.parametrize("alias", ["first", "last", "twice"])
@pytest.mark.parametrize("fn", ["lincomb", "lincomb_ref"])
def test_lincomb_out_may_alias_a_source(fn, alias, kernel_device):
    """out = srcs[j] gives the value of a fresh out (every element reads its sources first)."""
    f = getattr(K, fn)
    srcs, coefs = lincomb_args(3, (5, 1000), torch.float32, kernel_device)
    if alias == "twice":  # the same tensor as two sources and as out
        srcs[2] = srcs[0]
    want = f(srcs, coefs)
    j = {"first": 0, "last": 2, "twice": 0}[alias]
    target = srcs[j]
    got = f(srcs, coefs, out=target)
    assert got is target and torch.equal(got, want)
    x = torch.randn(4097, device=kernel_device)
    want = f([x], [0.3])
    assert torch.equal(f([x], [0.3], x), want)  # a one-source LIN in place: out = 0.3·out


@pytest.mark.parametrize("fn", ["lincomb", "lincomb_ref"])
def test_lincomb_out_buffer_and_none(fn, kernel_device):
    f = getattr(K, fn)
    srcs, coefs = lincomb_args(5, (3, 1, 17, 17), torch.bfloat16, kernel_device)
    before = [s.clone() for s in srcs]
    fresh = f(srcs, coefs)
    buf = torch.full_like(srcs[0], float("nan"))
    assert f(srcs, coefs, buf) is buf and torch.equal(buf, fresh)
    assert all(torch.equal(s, b) for s, b in zip(srcs, before)), "a source was written"
    assert fresh.shape == srcs[0].shape and fresh.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(), (0, 3), (2, 3, 5, 7)], ids=str)
def test_lincomb_shapes_and_layouts(shape, kernel_device):
    srcs, coefs = lincomb_args(3, shape, torch.float64, kernel_device)
    want = K.lincomb_ref(srcs, coefs)
    assert K.lincomb(srcs, coefs).shape == shape
    assert_within(K.lincomb(srcs, coefs), want, lincomb_tol(srcs, coefs, *lincomb_exact(
        srcs, coefs)).to(kernel_device), f"lincomb on shape {shape}")
    if len(shape) == 4:  # all sources channels_last: out too, the same values
        cl = [s.contiguous(memory_format=torch.channels_last) for s in srcs]
        got = K.lincomb(cl, coefs)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, K.lincomb(srcs, coefs))


def _lincomb_call(fn, device, n=2, **override):
    """A call of lincomb (or lincomb_ref) on valid arguments, with some of them replaced."""
    srcs, coefs = lincomb_args(n, (3, 4, 4), torch.float32, device)
    args = {"srcs": srcs, "coefs": coefs, **override}
    if callable(args["srcs"]):
        args["srcs"] = args["srcs"](srcs)
    return lambda: getattr(K, fn)(**args)


INVALID_LINCOMB = {  # case: ((fn, device) -> call, error type, message pattern)
    "no sources": (lambda f, d: _lincomb_call(f, d, srcs=[], coefs=[]), ValueError,
                   "0 sources; 1 to 8"),
    "9 sources": (lambda f, d: _lincomb_call(f, d, n=9), ValueError, "9 sources; 1 to 8"),
    "too few coefs": (lambda f, d: _lincomb_call(f, d, coefs=[1.0]), ValueError,
                      "1 coefficients for 2 sources"),
    "too many coefs": (lambda f, d: _lincomb_call(f, d, coefs=[1.0, 2.0, 3.0]), ValueError,
                       "3 coefficients for 2 sources"),
    "nan coef": (lambda f, d: _lincomb_call(f, d, coefs=[1.0, float("nan")]), ValueError,
                 r"coefs\[1\] is nan; coefficients must be finite"),
    "inf coef": (lambda f, d: _lincomb_call(f, d, coefs=[float("-inf"), 1.0]), ValueError,
                 r"coefs\[0\] is -inf"),
    "tensor coef": (lambda f, d: _lincomb_call(f, d, coefs=[1.0, torch.tensor(2.0)]), TypeError,
                    r"coefs\[1\] must be a Python float"),
    "coefs a tensor": (lambda f, d: _lincomb_call(f, d, coefs=torch.ones(2)), TypeError,
                       "list of floats"),
    "srcs a tensor": (lambda f, d: _lincomb_call(f, d, srcs=torch.ones(2, 3)), TypeError,
                      "list of tensors"),
    "not a tensor": (lambda f, d: _lincomb_call(f, d, srcs=lambda s: [s[0], 1.0]), TypeError,
                     r"srcs\[1\] must be a torch.Tensor"),
    "shape mismatch": (lambda f, d: _lincomb_call(f, d, srcs=lambda s: [s[0], s[1][:, :2]]),
                       ValueError, r"srcs\[1\] has shape \(3, 2, 4\) but srcs\[0\]"),
    "dtype mismatch": (lambda f, d: _lincomb_call(f, d, srcs=lambda s: [s[0], s[1].half()]),
                       TypeError, r"srcs\[1\] has dtype torch.float16 but srcs\[0\]"),
    "integer dtype": (lambda f, d: _lincomb_call(f, d, srcs=lambda s: [s[0].long(), s[1]]),
                      TypeError, "dtype torch.int64; supported"),
    "device mismatch": (lambda f, d: _lincomb_call(f, d, srcs=lambda s: [s[0], s[1].to("meta")]),
                        ValueError, "is on meta"),
    "non-contiguous": (lambda f, d: _lincomb_call(f, d, srcs=lambda s: [s[0].transpose(1, 2),
                                                                        s[1]]),
                       ValueError, r"srcs\[0\] is not contiguous"),
    "layouts differ": (lambda f, d: _lincomb_call(f, d, srcs=lambda s: [
        s[0].reshape(3, 2, 2, 4), s[1].reshape(3, 2, 2, 4).contiguous(
            memory_format=torch.channels_last)]), ValueError, "memory layout"),
    "out dtype": (lambda f, d: _lincomb_call(f, d, out=torch.empty(3, 4, 4, dtype=torch.float64,
                                                                   device=d)), TypeError,
                  "out has dtype"),
    "out shape": (lambda f, d: _lincomb_call(f, d, out=torch.empty(3, 16, device=d)), ValueError,
                  "out must have"),
    "out device": (lambda f, d: _lincomb_call(f, d, out=torch.empty(3, 4, 4, device="meta")),
                   ValueError, "out is on meta"),
}


@pytest.mark.parametrize("case", list(INVALID_LINCOMB))
@pytest.mark.parametrize("fn", ["lincomb", "lincomb_ref"])
def test_lincomb_invalid_inputs_raise_clear_errors(fn, case, kernel_device):
    make_call, error, message = INVALID_LINCOMB[case]
    with pytest.raises(error, match=message):
        make_call(fn, kernel_device)()


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


def test_registered_lincomb_ops(kernel_device):
    srcs, coefs = lincomb_args(3, (2, 3, 4), torch.float32, kernel_device)
    want = K.lincomb(srcs, coefs)
    buf = torch.full_like(want, float("nan"))
    torch.ops.edm_fast_triton.lincomb_out(srcs, coefs, buf)
    assert torch.equal(torch.ops.edm_fast_triton.lincomb(srcs, coefs), want)
    assert torch.equal(buf, want)


@pytest.mark.parametrize("op", ["precond_out", "lincomb"])
def test_opcheck(op, kernel_device):
    if op == "lincomb":
        args = lincomb_args(3, (2, 3), torch.float32, kernel_device)
        bufs = (torch.empty_like(args[0][0]),)
    else:
        args = make_args(op, (2, 3), torch.float32, kernel_device)
        bufs = (torch.empty_like(args[0]),)
    torch.library.opcheck(getattr(torch.ops.edm_fast_triton, op).default, tuple(args))
    torch.library.opcheck(getattr(torch.ops.edm_fast_triton, f"{op}_out").default,
                          tuple(args) + bufs)


def test_torch_compile_traces_a_whole_step(kernel_device):
    """One Heun step (Alg. 1) as a program would run it: precond_in, network, precond_out, then
    the step arithmetic as LIN ops, one written in place; torch.compile traces it without graph
    breaks."""
    x = make_args("precond_in", (2, 1, 4, 4), torch.float32, kernel_device)[0]
    t_cur, t_next = 2.0, 1.25
    F = torch.tanh  # a stand-in for the network

    def denoise(x, t):
        c = torch.full((x.shape[0],), t, device=x.device)
        c_in, c_skip, c_out = 1 / (c**2 + 0.25).sqrt(), 0.25 / (c**2 + 0.25), c * 0.5 / (
            c**2 + 0.25).sqrt()
        return K.precond_out(x, F(K.precond_in(x, c_in)), c_skip, c_out)

    def step(x):
        h = t_next - t_cur
        D = denoise(x, t_cur)
        x_next = K.lincomb([x, D], [1 + h / t_cur, -h / t_cur])  # x + h·(x − D)/t
        D_next = denoise(x_next, t_next)
        # x + h/2·((x − D)/t + (x_next − D_next)/t_next), written over x_next
        return K.lincomb([x, D, x_next, D_next], [1 + h / (2 * t_cur), -h / (2 * t_cur),
                                                  h / (2 * t_next), -h / (2 * t_next)],
                         out=x_next)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), step(x))


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
    args = make_args("precond_out", (2, 5), torch.float32, "cpu")
    srcs, coefs = lincomb_args(2, (2, 5), torch.float32, "cpu")
    monkeypatch.setenv("EDM_FAST_DISABLE_TRITON", "1")
    with pytest.raises(RuntimeError, match="EDM_FAST_DISABLE_TRITON=1.*precond_out_ref"):
        K.precond_out(*args)
    with pytest.raises(RuntimeError, match="EDM_FAST_DISABLE_TRITON=1.*lincomb_ref"):
        K.lincomb(srcs, coefs, out=srcs[0])
    assert K.precond_out_ref(*args).shape == (2, 5)
    assert K.lincomb_ref(srcs, coefs).shape == (2, 5)


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
assert torch.equal(K.lincomb_ref([x, x], [1.0, 2.0]), 3 * x)
try:
    K.lincomb([x, x], [1.0, 2.0])
except RuntimeError as e:
    assert "Triton is not installed" in str(e) and "lincomb_ref" in str(e), e
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
