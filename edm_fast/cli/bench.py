"""``edm-fast bench``: a short timing of every sampler backend against an NVlabs-style eager
loop and k-diffusion's sample_heun on the same denoiser (edm_fast.eval.benchmark); the full
benchmark is bench/bench_sampler.py."""

from __future__ import annotations

__all__ = ["add_bench_command", "cmd_bench"]


def add_bench_command(sub, formatter) -> None:
    """Register ``bench`` on the subparsers ``sub`` (argparse) with help ``formatter``."""
    p = sub.add_parser(
        "bench", formatter_class=formatter, help="time the sampler backends (short run)",
        description="Time every available backend against an NVlabs-style eager loop and "
        "k-diffusion's sample_heun on the same denoiser; prints ms/NFE, img/s and overhead, "
        "one row as each sampler finishes (each in its own process), then a legend. The full "
        "benchmark is bench/bench_sampler.py.")
    p.add_argument("--models", default="mlp,tiny",
                   help="comma list: mlp, tiny or any network preset (random weights), or a "
                   "bundled model: bundled (= default, as in --ckpt default), default-ddpm")
    p.add_argument("--batches", default="1,16", help="comma list of batch sizes")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (2N-1 NFE)")
    p.add_argument("--backends", default=None,
                   help="comma list, or 'all'; default: all that load, except on the CPU the "
                   "two that compile first (compiled, cpp: minutes of set-up each per model and "
                   "batch), which get a 'skipped' row")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads of each measurement (default: torch's, one per core)")
    p.set_defaults(func=cmd_bench)


_COMPILE_FIRST = ("compiled", "cpp")  # backends whose set-up is a compile (Inductor, AOTI)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the running measurement's process is killed on the way
    out (edm_fast.eval.benchmark._measure_isolated) and the CLI exits with 143."""

    signum = 15


def _raise_terminated(signum, frame):
    raise _Terminated()


def cmd_bench(args) -> int:
    import signal
    import sys

    from ..sampling.backends import BACKENDS
    from ..eval.benchmark import (
        benchmark_case,
        check_bench_model,
        format_header,
        format_row,
        legend,
        missing_outside_samplers,
        not_installed_row,
    )
    from ..device import busy_cpu_note, resolve_device, set_threads

    device = resolve_device(args.device)
    backends = args.backends.split(",") if args.backends not in (None, "all") else None
    skipped = []
    if args.backends is None and device.type == "cpu":  # the README's short run stays short
        skipped = [b for b in _COMPILE_FIRST if b in BACKENDS]
        backends = [b for b in BACKENDS if b not in skipped]
    unknown = sorted(set(backends or ()) - set(BACKENDS))
    if unknown:
        raise ValueError(f"--backends: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(BACKENDS))}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise ValueError(f"--batches takes a comma list of sizes, got {args.batches!r}") from None
    if min(batches) < 1 or args.repeats < 1 or args.steps < 1:
        raise ValueError("--batches, --repeats and --steps must be >= 1")
    models = [check_bench_model(m) for m in args.models.split(",")]  # all, before any run
    threads = set_threads(args.threads)

    def err(line):
        print(f"edm-fast bench: {line}", file=sys.stderr, flush=True)

    err(f"{len(models) * len(batches)} case(s) on {device}, {threads} thread(s), every sampler "
        "in its own process; rows print as they finish (the compiled and cpp backends "
        "compile first: minutes on a CPU)")
    note = busy_cpu_note(device)
    if note:
        err(note)
    try:  # only the main thread may set handlers (a test may call main() from another)
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        previous = None
    try:
        print(format_header(), flush=True)
        cases = [(model, batch) for model in models for batch in batches]
        for i, (model, batch) in enumerate(cases, 1):
            where = f"[{i}/{len(cases)}] {model} batch {batch}"
            benchmark_case(model, batch, device=device, steps=args.steps,
                           repeats=args.repeats, backends=backends, threads=threads,
                           log=lambda line: err(line.removeprefix("[bench] ")),
                           on_row=lambda row: print(format_row(row), flush=True),
                           on_start=lambda name, where=where: err(f"{where}: {name} ..."))
        for name in skipped:
            print(format_row(not_installed_row(
                f"ours/{name}", "skipped: compiles first (minutes on a CPU); --backends all "
                "includes it")), flush=True)
        for name, reason in missing_outside_samplers().items():
            print(format_row(not_installed_row(name, reason)), flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print()
    print(legend(threads, device, args.steps, args.repeats), flush=True)
    return 0
