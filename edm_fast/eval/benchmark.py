"""Timing of sampler backends against each other and against outside samplers.

Used by ``edm-fast bench`` (a short run) and bench/bench_sampler.py (the full table). Every
row of a case comes from the same benchmark run, on the same denoiser (same seed, same weights)
and sigma grid, each sampler in a fresh process of its own (``_measure_isolated``: backends in
one process disturb each other's timings), with its total and t_F timed in alternation:
  - ours/<backend>: the Sampler with each backend that loads here (warm-up = construction:
    compilation, export, graph capture; reported apart);
  - nvlabs-eager: a loop written here to behave like NVlabs' edm_sampler (float64 step math, the
    per-step host sync of `if S_min <= t_cur <= S_max` on a device scalar, a randn drawn every
    step whether or not churn is on);
  - k-diffusion: k_diffusion.sampling.sample_heun from PyPI, when it is installed.
Columns: total ms per call (median), ms/NFE, images/s, t_F (one denoiser forward in the same
execution mode: eager, compiled, or the exported model the C++ loop runs), overhead =
total - NFE x t_F as % of total (the definition of the fast-sampler issue: a difference of two
timings, so it carries the host's timing noise), host % (one call with the network swapped
for one that costs nothing - identity D, or a session call that runs nothing - as % of total:
the sampler's own work measured directly; n/a where the network cannot be swapped out, inside
the C++ loop or a CUDA graph), and the achieved FLOP rate (FLOPs of one forward counted with
torch.utils.flop_counter) against the measured rate of a large float32 matmul (the practical
peak of this device).
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import sys
import time
import types

import torch

from ..sampling.backends import available_backends
from ..device import synchronize
from ..noise import SeedNoise
from ..plan import SamplingPlan
from ..precond import Denoiser, EDMPrecond
from ..sampling.sampler import Sampler, model_shape, plan_for_model

__all__ = ["COLUMNS", "bench_model", "bench_model_names", "benchmark_case", "check_bench_model",
           "format_header", "format_row", "format_table", "legend", "load_k_diffusion_sampling",
           "measure_sampler", "missing_outside_samplers", "not_installed_row",
           "nvlabs_style_sampler", "peak_flops", "time_call", "time_pair"]

COLUMNS = ["model", "batch", "sampler", "warm-up s", "total ms", "ms/NFE", "img/s", "t_F ms",
           "overhead %", "host %", "GFLOP/s", "% peak"]

BENCH_ALIASES = {"mlp": "toy-mlp", "bundled": "default"}  # short names of a preset / model


def bench_model_names() -> list[str]:
    """Every model name ``bench_model`` takes: 'mlp', the bundled models ('bundled' = the
    CLI's 'default', and 'default-ddpm'), then the network presets (random weights)."""
    from ..io.models import BUNDLED
    from ..nets.presets import PRESETS

    return ["mlp", "bundled", *BUNDLED, *PRESETS]


def check_bench_model(name: str) -> str:
    """``name`` if ``bench_model`` takes it, else ValueError listing every name it takes."""
    if name not in bench_model_names():
        raise ValueError(f"Unknown network preset {name!r} (nor a model name); "
                         f"--models takes: {', '.join(bench_model_names())}")
    return name


def bench_model(name: str, device):
    """A bundled model by name ('bundled' = 'default', the packaged digits model; or
    'default-ddpm'), or 'mlp' (= 'toy-mlp'), 'tiny' or any network preset with random
    weights and EDM preconditioning."""
    from ..io.models import BUNDLED, load_denoiser
    from ..nets import build_net

    name = BENCH_ALIASES.get(check_bench_model(name), name)
    torch.manual_seed(0)
    if name in BUNDLED:
        return load_denoiser(name, device=device)
    net = build_net(name, dropout=0.0)
    return Denoiser(net, EDMPrecond()).eval().requires_grad_(False).to(device)


def _single(fn, device) -> float:
    """Seconds of one device-synchronised fn() call."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _turn(fn, inner: int, device) -> float:
    """Seconds per call of ``inner`` back-to-back fn() calls, device-synchronised once."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / inner


def _calibrate(fn, device) -> float:
    """One untimed warm-up call, then the seconds of one call (the warm-up's own time when it
    took over a second, to spare a second long call)."""
    first = _single(fn, device)
    return first if first > 1.0 else _single(fn, device)


def _inner_count(one: float, seconds: float = 0.02, most: int = 1000) -> int:
    """Calls per turn so that a turn lasts >= ``seconds`` (timer resolution, launch smoothing)."""
    return max(1, min(most, int(seconds / max(one, 1e-7))))


def time_call(fn, device, repeats: int = 5) -> float:
    """Median wall seconds of one fn() call, device-synchronised; each of the ``repeats``
    measurements runs fn back to back for >= 20 ms (timer resolution, launch smoothing), after
    one untimed warm-up call and one calibrating call (``_calibrate``)."""
    inner = _inner_count(_calibrate(fn, device))
    return statistics.median(_turn(fn, inner, device) for _ in range(repeats))


def load_k_diffusion_sampling():
    """k_diffusion.sampling without k_diffusion/__init__ (which imports torchvision, clip, ...);
    its only package-internal need, utils.append_dims, is a one-line reshape given here."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [root]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x.reshape(*x.shape, *([1] * (n - x.ndim)))
    pkg.utils = utils
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils", "torchsde")}
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    if importlib.util.find_spec("torchsde") is None:
        sys.modules["torchsde"] = types.ModuleType("torchsde")  # only BrownianTree uses it
    try:
        file_spec = importlib.util.spec_from_file_location("k_diffusion.sampling",
                                                           os.path.join(root, "sampling.py"))
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module
    except Exception:
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@torch.no_grad()
def nvlabs_style_sampler(den, latents, sigmas, S_churn=0.0, S_min=0.0, S_max=float("inf"),
                         S_noise=1.0):
    """Behaves like NVlabs' edm_sampler for timing: float64 state, device-scalar comparisons
    (one host sync per step) and a randn_like every step even when S_churn = 0."""
    t_steps = torch.as_tensor(sigmas, dtype=torch.float64, device=latents.device)
    num_steps = len(t_steps) - 1
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * torch.randn_like(x_cur)
        sigma = t_hat.float().expand(len(x_hat))
        denoised = den(x_hat.to(torch.float32), sigma).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = den(x_next.to(torch.float32), t_next.float().expand(len(x_hat)))
            d_prime = (x_next - denoised.to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def count_flops(den, x, sigma, labels=None) -> float:
    """FLOPs of one denoiser forward (torch.utils.flop_counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        den(x, sigma, labels)
    return float(counter.get_total_flops())


_PEAK: dict = {}


def peak_flops(device) -> float:
    """The practical compute ceiling of ``device``: the best measured float32 rate of a large
    matmul and of a 3x3 convolution (TF32 off), with their nominal FLOP counts. (A library may
    run the convolution with Winograd, doing fewer multiplications than counted; the ceiling is
    then a rate the UNets' convolutions can actually show.)"""
    key = str(device)
    if key not in _PEAK:
        gpu = device.type == "cuda"
        n = 8192 if gpu else 2048
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        x = torch.randn(64 if gpu else 8, 256, 32, 32, device=device)
        w = torch.randn(256, 256, 3, 3, device=device)
        conv_flops = 2 * x.shape[0] * 256 * 256 * 9 * 32 * 32
        prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            mm = 2 * n**3 / time_call(lambda: a @ b, device)
            conv = conv_flops / time_call(lambda: torch.nn.functional.conv2d(x, w, padding=1),
                                          device)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
        _PEAK[key] = max(mm, conv)
    return _PEAK[key]


def _row(model, batch, name, total, nfe, t_f, flops, peak, warmup=0.0, host=None):
    overhead = total - nfe * t_f
    return {"model": model, "batch": batch, "sampler": name, "warm-up s": f"{warmup:.1f}",
            "total ms": f"{total * 1e3:.1f}", "ms/NFE": f"{total * 1e3 / nfe:.3f}",
            "img/s": f"{batch / total:.1f}", "t_F ms": f"{t_f * 1e3:.3f}",
            "overhead %": f"{100 * overhead / total:.1f}",
            "host %": "n/a" if host is None else f"{100 * host / total:.2f}",
            "GFLOP/s": f"{nfe * flops / total / 1e9:.1f}",
            "% peak": f"{100 * nfe * flops / total / peak:.1f}"}


def time_pair(total_fn, eval_fn, device, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of one ``total_fn()`` and of one ``eval_fn()`` call, measured in turns of
    equal length (total, eval, total, eval, ...): the host's speed drifts on a scale of seconds,
    and turns that alternate and last alike see the same drift, so it cannot masquerade as
    sampler overhead. A turn runs its function back to back for >= 20 ms and, for eval_fn, for
    as long as one total turn; each function is warmed up once first."""
    one_total, one_eval = _calibrate(total_fn, device), _calibrate(eval_fn, device)
    inner_total = _inner_count(one_total)
    inner_eval = _inner_count(one_eval, seconds=inner_total * max(one_total, 0.02),
                              most=100_000)
    totals, evals = [], []
    for _ in range(repeats):
        totals.append(_turn(total_fn, inner_total, device))
        evals.append(_turn(eval_fn, inner_eval, device))
    return statistics.median(totals), statistics.median(evals)


def _case_inputs(model_name: str, batch: int, device):
    den = bench_model(model_name, device)
    shape = model_shape(den)
    latents = SeedNoise(range(batch), shape, device=device).draw()
    sigma = torch.full((batch,), 2.0, device=device)
    labels = (torch.arange(batch) % den.label_dim) if den.label_dim else None
    one_hot = (None if labels is None else
               torch.nn.functional.one_hot(labels.to(device), den.label_dim).float())
    return den, shape, latents, sigma, labels, one_hot


class _NullSession:
    """Stands in for an ONNX Runtime session: runs nothing (host-time measurement)."""

    def run_with_iobinding(self, binding):
        return None


def _identity_denoiser(x, sigma=None, class_labels=None, *args):
    return x


def _install_null_network(sampler: str, ours) -> bool:
    """Make the network of ``ours`` cost nothing, where the backend allows it: D(x) = x (the
    reference and compiled loops) or a session call that does nothing (onnx). False where the
    network cannot be swapped out (cpp: inside the C++ loop; CUDA graph: captured)."""
    backend = ours.backend
    if sampler == "ours/reference":
        backend.denoiser = _identity_denoiser
        return True
    if sampler == "ours/compiled" and getattr(backend, "graph", None) is None:
        backend.denoise = _identity_denoiser
        return True
    if sampler == "ours/onnx":
        backend.evaluate.session = _NullSession()
        for binding in backend.evaluate._bindings.values():
            binding.out.zero_()  # D = 0 from now on: finite, so no NonFiniteError
        return True
    return False


def sampler_plan(den, steps: int) -> SamplingPlan:
    """The plan ``Sampler(den, num_steps=steps)`` builds: EDM's grid within the model's sigma
    range, rounded to a discrete-time net's levels (as NVlabs' edm_sampler also does), so the
    outside samplers run exactly our grid."""
    return plan_for_model(den, num_steps=steps)


def measure_sampler(model_name: str, batch: int, sampler: str, *, device, steps: int = 18,
                    repeats: int = 5) -> dict:
    """Seconds of one sampling call (``total``), of one denoiser evaluation in the same
    execution mode (``t_f``), of the set-up (``warmup``) and of one call with a network that
    costs nothing (``host``: the sampler's own work, measured directly; None where the network
    cannot be swapped out) for one sampler in this process: 'ours/<backend>', 'nvlabs-eager' or
    'k-diffusion'. Raises when the sampler cannot run."""
    den, shape, latents, sigma, labels, one_hot = _case_inputs(model_name, batch, device)
    plan = sampler_plan(den, steps)
    net = [lambda x, s: den(x, s, one_hot)]  # swapped for the identity to time the host work

    def eager():
        return den(latents, sigma, one_hot)

    ours = None
    if sampler.startswith("ours/"):
        start = time.perf_counter()
        ours = Sampler(den, shape=shape, batch_size=batch, num_steps=steps, device=device,
                       backend=sampler.removeprefix("ours/"))
        warmup = time.perf_counter() - start
        evaluation = getattr(ours.backend, "evaluation", None)
        eval_fn = eager if evaluation is None else evaluation(latents, sigma, one_hot)

        def total_fn():
            return ours(seeds=range(batch), class_labels=labels)
    else:
        warmup, eval_fn = 0.0, eager
        sigmas = list(plan.sigmas)
        if sampler == "nvlabs-eager":
            def total_fn():
                return nvlabs_style_sampler(lambda x, s: net[0](x, s), latents, sigmas)
        elif sampler == "k-diffusion":
            kd = load_k_diffusion_sampling()
            if kd is None:
                raise ImportError("k-diffusion is not installed")
            sig_t = torch.tensor(sigmas, dtype=torch.float32, device=device)

            class KModel(torch.nn.Module):
                def forward(self, x, s):
                    return net[0](x, s)

            km = KModel()

            def total_fn():
                return kd.sample_heun(km, latents * sigmas[0], sig_t, disable=True)
        else:
            raise ValueError(f"unknown sampler {sampler!r}")
    total, t_f = time_pair(total_fn, eval_fn, device, repeats)
    if ours is None:
        net[0] = _identity_denoiser
        swapped = True
    else:
        swapped = _install_null_network(sampler, ours)
    host = time_call(total_fn, device, repeats) if swapped else None
    return {"total": total, "t_f": t_f, "warmup": warmup, "host": host}


def _die_with_parent(parent: int) -> None:
    """In a child, before exec (Linux): get SIGTERM when the parent dies, however it dies (even
    SIGKILL), so no measurement outlives an interrupted ``edm-fast bench``."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 15)  # PR_SET_PDEATHSIG = 1, SIGTERM = 15
    except (OSError, AttributeError):  # no prctl: the parent's kill on interrupt remains
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _measure_isolated(model_name, batch, sampler, device, steps, repeats,
                      threads: int | None = None) -> dict:
    """``measure_sampler`` in a fresh Python process: backends measured one after another in
    one process disturb each other (Inductor's OpenMP threads slowed ONNX Runtime's loop up to
    2x on 2 cores; TorchDynamo stops compiling after 8 recompilations of one forward). The
    child ends with this process: it is killed when this one is interrupted (any exception,
    KeyboardInterrupt included) and, on Linux, gets SIGTERM when this one dies."""
    import json
    import subprocess

    spec = {"model_name": model_name, "batch": batch, "sampler": sampler,
            "device": str(device), "steps": steps, "repeats": repeats}
    if threads:
        spec["threads"] = threads
    parent = os.getpid()
    preexec = (lambda: _die_with_parent(parent)) if sys.platform.startswith("linux") else None
    with subprocess.Popen([sys.executable, "-m", "edm_fast.eval.benchmark", json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=preexec) as proc:  # noqa: PLW1509 (no threads here)
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (err.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(tail)
    return json.loads(lines[-1])


def benchmark_case(model_name: str, batch: int, *, device, steps: int = 18, repeats: int = 5,
                   rounds: int = 1, backends=None, outside: bool = True, isolate: bool = True,
                   log=print, on_row=None, on_start=None,
                   threads: int | None = None) -> list[dict]:
    """Rows for one (model, batch): ours per backend, then nvlabs-eager and k-diffusion.

    Each sampler is measured in its own process unless ``isolate=False`` (with ``threads``
    torch threads, when given). With ``rounds`` > 1 the samplers are measured in turn that
    many times (round 1: every sampler, round 2: every sampler, ...) and each keeps its fastest
    round: the host's speed drifts between processes, and the minimum over rounds is the
    estimate least disturbed by it. ``on_row(row)`` is called with each row as soon as it is
    final (after its measurement with one round; after the last round otherwise), and
    ``on_start(name)`` before each sampler's measurement starts.
    """
    den, _, latents, sigma, _, one_hot = _case_inputs(model_name, batch, device)
    plan = sampler_plan(den, steps)
    names = [f"ours/{name}" for name, reason in available_backends().items()
             if reason is None and (backends is None or name in backends)]
    if outside:
        names.append("nvlabs-eager")
        if load_k_diffusion_sampling() is not None:
            names.append("k-diffusion")
    rounds = max(1, rounds)
    best: dict[str, dict] = {}
    rates: dict[str, float] = {}  # measured once the first sampler is: its process starts sooner

    def row(name):
        if not rates:
            rates.update(flops=count_flops(den, latents, sigma, one_hot), peak=peak_flops(device))
        flops, peak = rates["flops"], rates["peak"]
        m = best[name]
        return _row(model_name, batch, name, m["total"], plan.num_evals, m["t_f"], flops, peak,
                    m["warmup"], m.get("host"))

    for _ in range(rounds):
        for name in names:
            if on_start is not None:
                on_start(name)
            try:
                if isolate:
                    m = _measure_isolated(model_name, batch, name, device, steps, repeats,
                                          threads)
                else:
                    m = measure_sampler(model_name, batch, name, device=device, steps=steps,
                                        repeats=repeats)
            except Exception as exc:  # a sampler that cannot run this model here: say so
                log(f"[bench] {model_name} batch {batch} {name}: {type(exc).__name__}: {exc}")
                continue
            if name not in best or m["total"] < best[name]["total"]:
                best[name] = m
            if on_row is not None and rounds == 1:
                on_row(row(name))
    rows = [row(name) for name in names if name in best]
    if on_row is not None and rounds > 1:
        for r in rows:
            on_row(r)
    return rows


def missing_outside_samplers() -> dict[str, str]:
    """The outside samplers the benchmark promises that cannot run here, with the reason."""
    if load_k_diffusion_sampling() is None:
        return {"k-diffusion": "not installed (pip install k-diffusion)"}
    return {}


def not_installed_row(sampler: str, reason: str, model: str = "*", batch="*") -> dict:
    """A table row that says a sampler was not measured, and why (instead of no row)."""
    row = dict.fromkeys(COLUMNS, "-")
    row.update({"model": model, "batch": batch, "sampler": sampler, "warm-up s": reason})
    return row


def format_header(columns=COLUMNS) -> str:
    """The Markdown table's header and rule lines (the bench rows' columns by default)."""
    return "| " + " | ".join(columns) + " |\n" + "|" + "---|" * len(columns)


def format_row(row: dict, columns=COLUMNS) -> str:
    """One row as a Markdown table line."""
    return "| " + " | ".join(str(row.get(c, "")) for c in columns) + " |"


def format_table(rows: list[dict]) -> str:
    """Rows as a Markdown table (the columns of the first row)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    return "\n".join([format_header(cols), *(format_row(r, cols) for r in rows)])


def legend(threads: int, device="cpu", steps: int = 18, repeats: int = 3) -> str:
    """What each column of the table means, printed under it."""
    nfe = 2 * steps - 1
    return f"""\
Columns (every sampler in its own process, {threads} torch thread(s) each, on {device};
median of {repeats} timed turns):
  NFE        network evaluations per image: {steps} Heun steps = {nfe} NFE (2N-1)
  warm-up s  set-up before the first call (compile, export, capture); not in the times
  total ms   one sampling call for the whole batch
  ms/NFE     one batch call's time / NFE (the batch's images share each evaluation)
  img/s      batch / total
  t_F ms     one denoiser forward on the batch, in the same execution mode (eager,
             compiled, or the exported model the C++ loop runs)
  overhead % (total - NFE x t_F) / total: the sampler's cost beyond its network calls. A
             difference of two separate timings, so it carries the host's timing noise and
             can be negative: a forward inside the loop ran faster than the isolated t_F
             (warm caches, no dispatch between calls) or the host sped up between turns
  host %     one call with a network that costs nothing (identity D / a session that runs
             nothing), as % of total: the sampler's own work measured directly; n/a where
             the network cannot be swapped out (inside the C++ loop, a CUDA graph)
  GFLOP/s    FLOPs of the forward passes (torch.utils.flop_counter) per second of total
  % peak     GFLOP/s against the best float32 matmul / 3x3 conv rate measured here
Rows with '-' were not measured; their warm-up column says why."""


if __name__ == "__main__":  # one isolated measurement (see _measure_isolated)
    import json

    _spec = json.loads(sys.argv[1])
    _device = torch.device(_spec.pop("device"))
    if _spec.get("threads"):
        torch.set_num_threads(int(_spec["threads"]))
    _spec.pop("threads", None)
    if _device.type == "cuda":
        torch.cuda.set_device(_device)
    print(json.dumps(measure_sampler(_spec.pop("model_name"), _spec.pop("batch"),
                                     _spec.pop("sampler"), device=_device, **_spec)))
