"""Bandwidth of the fused Triton kernels against their eager PyTorch `_ref` twins, in GB/s.

Run on a CUDA machine, from the repository root:

    python -m pytest bench/bench_kernels.py -q -s

Ops: precond_in, precond_out, and lincomb (the sampler program's LIN op, out = Σ c_j·src_j)
with 2, 4 and 8 sources (an Euler step, a Heun correction, the kernel's maximum).

For every op × dtype × size, in one run:
- triton µs, torch µs: device time of one call, the median over `triton.testing.do_bench` runs
  of a CUDA graph that calls the op on `sets` different input sets (together more than the L2
  cache; do_bench also clears L2 before each replay), so neither launch overhead nor cache hits
  count. Outputs stay alive during capture, so each call writes fresh memory;
- GB/s: bytes moved / time, where bytes moved = every input read once + every output written
  once (the minimum: the eager reference moves more, which is what fusing saves);
- speedup: torch µs / triton µs;
- expr µs, vs expr (lincomb only): the device time of the plain torch expression
  srcs[0]*c0 + srcs[1]*c1 + ... in the sources' dtype (what a backend without the kernel would
  run; it rounds every term in float16/bfloat16), and expr µs / triton µs;
- % copy: triton GB/s over the bandwidth of a 1 GiB device-to-device `copy_` measured in the same
  run (bytes read + bytes written), the practical roofline;
- eager µs: wall time per call of 100 back-to-back Python calls (median of 5 such loops), i.e.
  the larger of host overhead (dispatch, checks, launch) and device time: what a loop that is
  not captured in a CUDA graph pays;
- first call ms: the first call in this process, Triton compilation (or its disk cache) included.
The table is printed and appended to bench/RESULTS.md (bench/results.py). pytest-benchmark:
with --benchmark-enable, the `benchmark` fixture also times host-synchronised replays of the
Triton graph and keeps every number above in its JSON `extra_info`.
"""

import math
import os
import shlex
import statistics
import time

import pytest
import torch

import edm_fast.kernels as K

try:
    from bench.results import append_results
except ImportError:  # bench/ itself on sys.path (pytest's rootdir-relative import)
    from results import append_results

if not torch.cuda.is_available():
    pytest.skip("the kernel benchmark needs a CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: interpreter timings mean nothing", allow_module_level=True)
if not K.triton_available("cuda"):
    pytest.skip("Triton is not installed or is disabled (EDM_FAST_DISABLE_TRITON=1)",
                allow_module_level=True)

import triton.testing  # noqa: E402  (only once Triton is known to be there)

SIZES = {"64x3x32x32": (64, 3, 32, 32), "1024x3x64x64": (1024, 3, 64, 64)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OP_ARGS = K.OP_ARGS  # each per-sample op's arguments (lincomb has its own tests/rows)
# lincomb rows: name -> number of sources; the op takes (srcs, coefs).
LINCOMB_SOURCES = {"lincomb N=2": 2, "lincomb N=4": 4, "lincomb N=8": 8}
OPS = list(OP_ARGS) + list(LINCOMB_SOURCES)
COLUMNS = ("op", "dtype", "shape", "MB/call", "sets", "triton µs", "torch µs", "speedup",
           "expr µs", "vs expr", "triton GB/s", "torch GB/s", "% copy", "eager triton µs",
           "eager torch µs", "first call ms")


def kernel_and_ref(op):
    """The fused kernel and its pure-PyTorch twin for a row name of OPS."""
    return K.OPS["lincomb" if op in LINCOMB_SOURCES else op]


def lincomb_expr(srcs, coefs):
    """The plain torch expression srcs[0]*c0 + srcs[1]*c1 + ..., in the sources' dtype."""
    out = srcs[0] * coefs[0]
    for s, c in zip(srcs[1:], coefs[1:]):
        out = out + s * c
    return out


def make_args(op, shape, dtype, device="cuda"):
    """Realistic arguments of `op` on the GPU: per-sample σ in [0.5, 80], EDM's c_* of σ; for
    lincomb, sources of magnitude up to 80 and coefficients in [-1, 1] (a step's h/σ ratios)."""
    if op in LINCOMB_SOURCES:
        n_src = LINCOMB_SOURCES[op]
        scales = 0.5 + 79.5 * torch.rand(n_src)
        srcs = [(torch.randn(shape, device=device) * s).to(dtype) for s in scales.tolist()]
        return [srcs, (2 * torch.rand(n_src, dtype=torch.float64) - 1).tolist()]
    n, sigma_data = shape[0], 0.5
    t_hat = 0.5 + 79.5 * torch.rand(n, device=device)
    t_next = 0.5 * t_hat
    scalars = {"t_cur": t_hat / 1.2, "t_hat": t_hat, "t_next": t_next,
               "c_in": 1 / (t_hat**2 + sigma_data**2).sqrt()}
    for suffix, t in (("", t_hat), ("_next", t_next)):
        scalars["c_skip" + suffix] = sigma_data**2 / (t**2 + sigma_data**2)
        scalars["c_out" + suffix] = t * sigma_data / (t**2 + sigma_data**2).sqrt()
    tensors, scalar_names, floats = OP_ARGS[op]
    scale = t_hat.reshape(-1, *[1] * (len(shape) - 1))
    args = [(torch.randn(shape, device=device) * (scale if name.startswith("x") else 1)).to(dtype)
            for name in tensors]
    return args + [scalars[s] for s in scalar_names] + [1.003 for _ in floats]


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def bytes_moved(args, outputs) -> int:
    """Each input read once and each output written once (lincomb's srcs: each source)."""
    flat = [t for a in args for t in (a if isinstance(a, list) else [a])]
    tensors = [a for a in flat if isinstance(a, torch.Tensor)] + list(outputs)
    return sum(t.numel() * t.element_size() for t in tensors)


def check_result(op, args, got, want):
    """Kernel vs ref: both compute in float32 and round once, ~1 ulp apart; lincomb's sum may
    cancel, so its atol is relative to Σ|c_j|·max|src_j| (a few float32 roundings per term)."""
    eps = torch.finfo(want.dtype).eps
    if op in LINCOMB_SOURCES:
        srcs, coefs = args
        scale = sum(abs(c) * s.abs().max().item() for s, c in zip(srcs, coefs))
        atol = 2 * len(srcs) * max(eps, torch.finfo(torch.float32).eps) * scale
    else:
        atol = 8 * eps * want.abs().max()
    torch.testing.assert_close(got, want, rtol=8 * eps, atol=atol)


def capture(fn, arg_sets):
    """A CUDA graph of `fn` called once on each argument set, and the outputs it keeps alive."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture, as torch.cuda.graph asks
        for args in arg_sets[:2]:
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep = [fn(*args) for args in arg_sets]
    return graph, keep


def median_us(fn) -> float:
    """Device time of fn() in µs: do_bench's median, L2 cleared before each run."""
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def eager_us(fn, loops=5, calls=100) -> float:
    """Wall time per call of back-to-back calls from Python, in µs (median over loops)."""
    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(per_call)


@pytest.fixture(scope="module")
def copy_gbps():
    """Bandwidth of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    gbps = 2 * src.numel() * src.element_size() / median_us(lambda: dst.copy_(src)) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    print(f"\ndevice-to-device copy: {gbps:.0f} GB/s")
    return gbps


@pytest.fixture(scope="module")
def table(request, copy_gbps):
    """Rows filled by the tests; printed and appended to bench/RESULTS.md at the end."""
    rows = []
    yield rows
    if not rows:
        return
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    markdown = (f"Device-to-device copy: {copy_gbps:.0f} GB/s (1 GiB, read + write).\n\n"
                + "\n".join(lines))
    print("\n" + markdown)
    command = "python -m pytest " + shlex.join(request.config.invocation_params.args)
    path = append_results("Fused Triton kernels vs eager PyTorch (bench/bench_kernels.py)",
                          markdown, command)
    print(f"appended to {path}")


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("op", OPS)
def test_bandwidth(op, dtype, size, copy_gbps, table, benchmark):
    kernel, ref = kernel_and_ref(op)
    shape, dt = SIZES[size], DTYPES[dtype]
    torch.manual_seed(0)
    first = make_args(op, shape, dt)

    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = as_tuple(kernel(*first))
    torch.cuda.synchronize()
    first_call_ms = 1e3 * (time.perf_counter() - start)
    for got, want in zip(outputs, as_tuple(ref(*first))):
        check_result(op, first, got, want)

    nbytes = bytes_moved(first, outputs)
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    n_sets = max(4, min(64, math.ceil(4 * l2_bytes / nbytes)))
    arg_sets = [first] + [make_args(op, shape, dt) for _ in range(n_sets - 1)]
    triton_graph, triton_keep = capture(kernel, arg_sets)
    torch_graph, torch_keep = capture(ref, arg_sets)
    triton_us = median_us(triton_graph.replay) / n_sets
    torch_us = median_us(torch_graph.replay) / n_sets
    expr_us = None
    if op in LINCOMB_SOURCES:
        expr_graph, expr_keep = capture(lincomb_expr, arg_sets)
        expr_us = median_us(expr_graph.replay) / n_sets
        del expr_graph, expr_keep
    row = {
        "op": op, "dtype": dtype, "shape": size, "MB/call": f"{nbytes / 1e6:.1f}",
        "sets": n_sets, "triton µs": f"{triton_us:.1f}", "torch µs": f"{torch_us:.1f}",
        "speedup": f"{torch_us / triton_us:.2f}x",
        "expr µs": "—" if expr_us is None else f"{expr_us:.1f}",
        "vs expr": "—" if expr_us is None else f"{expr_us / triton_us:.2f}x",
        "triton GB/s": f"{nbytes / triton_us / 1e3:.0f}",
        "torch GB/s": f"{nbytes / torch_us / 1e3:.0f}",
        "% copy": f"{100 * nbytes / triton_us / 1e3 / copy_gbps:.0f}%",
        "eager triton µs": f"{eager_us(lambda: kernel(*first)):.1f}",
        "eager torch µs": f"{eager_us(lambda: ref(*first)):.1f}",
        "first call ms": f"{first_call_ms:.0f}",
    }
    table.append(row)
    benchmark.extra_info.update(row)

    def replay_synchronized():
        triton_graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay_synchronized, rounds=20, warmup_rounds=2)
    del triton_graph, torch_graph, triton_keep, torch_keep, arg_sets
    torch.cuda.empty_cache()
