"""``edm-fast serve``: the command-line front of edm_fast.serve (FastAPI + uvicorn, or Ray Serve).

    edm-fast serve                                   # bundled digits model on 127.0.0.1:8000
    edm-fast serve --ckpt run/ --port 8080 --max-batch 64 --max-wait-ms 10 --steps 18
    edm-fast serve --ray --replicas 2                # the same app on Ray Serve (pip: [ray])
    edm-fast serve --net-dtype bf16                  # the network in bf16, the sampler in fp32
    edm-fast serve --ckpt run/ --guide-ckpt early-run/ --guidance 2   # autoguided requests
    curl -s -X POST localhost:8000/generate -d '{"seeds": 7, "class": 3}' -o seed7.png
    curl -s -X POST localhost:8000/generate -d '{"seeds": "0-7", "solver": "dpmpp_2m",
         "steps": 10, "format": "npy"}' -o x.npy
    curl -s localhost:8000/metrics                   # Prometheus text format; docs at /docs
"""

from __future__ import annotations

__all__ = ["add_serve_command"]

POLICY = (
    "Fairness: a request costs seeds x denoiser evaluations per seed (doubled where guidance "
    "applies); one over --max-cost gets 422. Requests queue in arrival order; each batch takes "
    "the plan (steps, solver, guidance) of the request at the head and at most --max-batch "
    "seeds (and at most --max-batch-cost evaluations of rows) of that plan; a request with "
    "seeds left "
    "then goes to the back of the queue. A large request is thus split into batches "
    "interleaved with the others, and a small request waits for at most the running batch plus "
    "one batch per request ahead of it.")


def add_serve_command(sub, formatter) -> None:
    """Register ``serve`` on the subparsers ``sub`` (the sampling options shared with sample)."""
    from .sampling_options import add_guide_option, add_model_option, add_sampling_options
    from ..serve.limits import DEFAULT_MAX_COST, MAX_STEPS

    p = sub.add_parser(
        "serve", formatter_class=formatter, conflict_handler="resolve",
        help="HTTP inference server that batches concurrent requests",
        description=__doc__ + "\nPOST /generate takes {\"seeds\", \"class\", \"steps\", "
        "\"solver\", \"guidance\", \"format\"}; --steps, --solver and --guidance are the "
        "defaults of requests that give none. GET /healthz (backend, network precision, kind "
        "of guidance, warm-up time, limits), "
        "GET /metrics, GET /docs. Every batch size is warmed before the port opens. "
        f"{POLICY} SIGINT/SIGTERM answer the "
        "requests in flight, then stop. See docs/SERVING.md.")
    add_model_option(p)
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="default guidance weight of requests, in [-100, 100]: classifier-free "
                   "D_u + w (D_c - D_u) (1 = conditional only), or with --guide-ckpt "
                   "autoguidance D_g + w (D - D_g) (1 = the main model alone)")
    add_guide_option(p, "requests with a guidance weight are then guided by it instead of "
                     "by classifier-free guidance (and need no class)")
    add_sampling_options(p, threads=True)
    p.add_argument("--backend", choices=["auto", "onnx", "compiled", "reference"],
                   default="auto", help="evaluator of D shared by every request's plan; auto: "
                   "onnx then compiled on the CPU, compiled (a CUDA graph per batch size) on CUDA")

    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 exposes it to the network)")
    g.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    g.add_argument("--max-batch", "--batch", dest="max_batch", type=int, default=64,
                   metavar="B", help="most seeds per batch (1 turns batching off)")
    g.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                   help="how long the oldest request waits for its batch to fill, 0 to 60000")
    g.add_argument("--batch-sizes", default=None, metavar="B1,B2,...",
                   help="row counts warmed at start-up; the compiled backend pads a batch "
                   "to the next of them, onnx and reference only to a multiple of 8 (default: "
                   "powers of two up to --max-batch)")
    g.add_argument("--max-seeds", type=int, default=256, metavar="N", help="most seeds per request")
    g.add_argument("--max-cost", type=int, default=DEFAULT_MAX_COST, metavar="C",
                   help="most seeds x evaluations per request (x2 where guided): e.g. 64 seeds "
                   f"of {MAX_STEPS} Heun steps; more gets 422")
    g.add_argument("--max-batch-cost", type=int, default=None, metavar="C",
                   help="most seeds x evaluations per batch (default: --max-batch x the cost "
                   "of a default request's seed), so that batches of long requests take about "
                   "as long as a default batch")
    g.add_argument("--timeout", dest="request_timeout_s", type=float, default=60.0, metavar="S",
                   help="deadline of a request (then 504)")
    g.add_argument("--body-timeout", dest="body_timeout_s", type=float, default=10.0,
                   metavar="S", help="a request body that stalls this long gets 408")
    g.add_argument("--max-queue", type=int, default=4096, metavar="N",
                   help="most queued seeds before requests get 503 (retry later)")
    g.add_argument("--max-body-bytes", type=int, default=65536, metavar="N", help="else 413")
    g.add_argument("--max-headers", type=int, default=100, metavar="N", help="else 431")
    g.add_argument("--max-header-bytes", type=int, default=16384, metavar="N",
                   help="largest request line + headers (else 431, or 400 and the connection "
                   "closed while they arrive)")
    g.add_argument("--limit-concurrency", type=int, default=512, metavar="N",
                   help="most open connections and requests in flight (else 503)")
    g.add_argument("--graceful-timeout", type=float, default=None, metavar="S",
                   help="at SIGTERM, how long requests in flight may finish (default: --timeout "
                   "+ the longest batch + 5 s)")
    g.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"], help="server log level")
    r = p.add_argument_group("ray (pip install 'edm-fast[ray]')")
    r.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment")
    r.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="Ray Serve replicas, each with its own engine and batcher")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (default: start a local one)")
    r.add_argument("--replica-cpus", type=float, default=1.0, metavar="C",
                   help="CPUs reserved per replica")
    r.add_argument("--replica-gpus", type=float, default=0.0, metavar="G",
                   help="GPUs reserved per replica")
    p.set_defaults(func=cmd_serve)


def _batch_sizes(text: str | None, max_batch: int) -> list[int]:
    from ..serve.engine import pow2_sizes

    if text is None:
        return pow2_sizes(max_batch)
    try:
        sizes = sorted({int(b) for b in text.split(",") if b.strip()} | {max_batch})
    except ValueError:
        raise ValueError(f"bad --batch-sizes {text!r}: use e.g. 1,8,64") from None
    if sizes[0] < 1 or sizes[-1] > max_batch:
        raise ValueError(f"--batch-sizes must lie in [1, --max-batch={max_batch}]")
    return sizes


def serve_config(args) -> dict:
    """The keyword arguments of Engine, ServeSettings and UvicornLimits from parsed ``serve``
    arguments; ValueError naming an option out of range, before any model is loaded."""
    import torch

    from .sampling_options import sampling_options
    from ..serve.settings import ServeSettings, UvicornLimits, checked

    options = sampling_options(args)
    settings = checked(
        ServeSettings, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_seeds=args.max_seeds, max_queue=args.max_queue, max_cost=args.max_cost,
        max_batch_cost=args.max_batch_cost, request_timeout_s=args.request_timeout_s,
        body_timeout_s=args.body_timeout_s, max_body_bytes=args.max_body_bytes,
        max_headers=args.max_headers, max_header_bytes=args.max_header_bytes,
        default_steps=options.pop("num_steps"), default_solver=options.pop("solver"),
        default_guidance=args.guidance)
    limits = checked(UvicornLimits, limit_concurrency=args.limit_concurrency,
                     graceful_timeout_s=args.graceful_timeout)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"port must be in 0..65535 (0: any free port), got {args.port}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    engine = dict(model=args.ckpt, device=args.device, backend=args.backend,
                  batch_sizes=_batch_sizes(args.batch_sizes, args.max_batch),
                  dtype=getattr(torch, args.dtype), guide=args.guide_ckpt, **options)
    return {"engine": engine, "settings": settings, "limits": limits}


def cmd_serve(args) -> int:
    """Warm the engine, then serve until SIGINT/SIGTERM."""
    import logging

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        from ..optional import MissingDependency

        raise MissingDependency(f"edm-fast serve needs {exc.name}: pip install "
                                "'edm-fast[serve]'") from exc
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ..device import set_threads

    set_threads(args.threads)  # this process's evaluators (Ray replicas: their CPU share)
    config = serve_config(args)
    if args.ray:
        from ..serve.ray_app import run_ray

        run_ray(config, host=args.host, port=args.port, replicas=args.replicas,
                address=args.ray_address, cpus=args.replica_cpus, gpus=args.replica_gpus)
        return 0
    from ..serve import Engine, create_app, run
    from ..serve.server import bind

    engine = Engine(**config["engine"])
    app = create_app(engine, config["settings"])
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    from ..precision import short_name

    guided = f", autoguided by {args.guide_ckpt}" if engine.guide is not None else ""
    print(f"edm-fast serve: {args.ckpt} on http://{host}:{port} (backend {engine.backend_name}, "
          f"{engine.device}, network {short_name(engine.net_dtype)}{guided}, warm-up "
          f"{engine.warmup_seconds:.1f} s); Ctrl-C stops", flush=True)
    run(app, sock, config["limits"], args.log_level)
    return 0
