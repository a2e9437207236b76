"""``edm-fast serve``: the command-line front of edm_fast.serve (an HTTP server that batches).

    edm-fast serve                                   # bundled digits model on 127.0.0.1:8000
    edm-fast serve --ckpt run/ --port 8080 --max-batch 64 --max-wait-ms 10 --steps 18
    curl -s -X POST localhost:8000/generate -d '{"seeds": 7, "class": 3}' -o seed7.png
    curl -s -X POST localhost:8000/generate -d '{"seeds": "0-7", "format": "npy"}' -o x.npy
    curl -s localhost:8000/metrics
"""

from __future__ import annotations

__all__ = ["add_serve_command"]


def add_serve_command(sub, formatter) -> None:
    """Register ``serve`` on the subparsers ``sub`` (Algorithm 2's options shared with sample)."""
    from .cli_sampling import add_sampling_options

    p = sub.add_parser(
        "serve", formatter_class=formatter, conflict_handler="resolve",
        help="HTTP inference server that batches concurrent requests",
        description=__doc__ + "\nPOST /generate takes {\"seeds\", \"class\", \"steps\", "
        "\"format\"}; --steps is the default for requests that give none. GET /healthz and "
        "GET /metrics report the model and the load. SIGINT/SIGTERM stop it cleanly. "
        "See edm_fast/serve.py for every response format and error code.")
    p.add_argument("--ckpt", "--model", dest="ckpt", default="default", metavar="PATH|NAME",
                   help="checkpoint (.safetensors, run folder, official .pkl or training-state "
                   ".pt) or a model name: default, default-ddpm, toy-gmm (= toy-gmm2d), "
                   "toy-gmm1d")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance weight for every request (1 = conditional)")
    add_sampling_options(p)

    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 exposes it to the network)")
    g.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    # replaces the shared --batch: the batch is formed from concurrent requests
    g.add_argument("--max-batch", "--batch", dest="max_batch", type=int, default=64,
                   metavar="B", help="most images per sampler call (1 turns batching off)")
    g.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                   help="how long the oldest queued image waits for a batch to fill, "
                   "0 to 60000 ms")
    g.add_argument("--batch-sizes", default=None, metavar="B1,B2,...",
                   help="sampler batch sizes a batch is padded to (default: powers of two up "
                   "to --max-batch); fewer sizes mean fewer compiled samplers")
    g.add_argument("--max-seeds", type=int, default=256, metavar="N",
                   help="most seeds in one request (at most --max-queue: a larger value is "
                   "lowered to it, with a warning)")
    g.add_argument("--timeout", dest="request_timeout_s", type=float, default=60.0,
                   metavar="S", help="server-side deadline of a request (then 504), "
                   "finite and > 0")
    g.add_argument("--max-queue", type=int, default=4096, metavar="N",
                   help="most queued images before requests get 503 (retry later)")
    g.add_argument("--max-samplers", type=int, default=16, metavar="N",
                   help="most cached samplers (one per steps value and batch size used)")
    g.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"], help="server log level")
    p.set_defaults(func=cmd_serve)


def _batch_sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"bad --batch-sizes {text!r}: use e.g. 1,8,64") from None


def _check_options(args) -> None:
    """ValueError naming the option for a float option out of range (NaN and inf included),
    before the model is loaded; InferenceServer checks the same limits again."""
    import math

    from .serve import MAX_WAIT_MS, _check_number

    _check_number("--max-wait-ms", args.max_wait_ms, 0, MAX_WAIT_MS)
    _check_number("--timeout", args.request_timeout_s, 0, math.inf, lo_open=True)


def build_server(args):
    """An InferenceServer (not started) from parsed ``serve`` arguments; ValueError for an
    option out of range."""
    import torch

    from .cli_sampling import sampling_options
    from .serve import InferenceServer, make_sampler_factory

    _check_options(args)
    options = sampling_options(args)
    del options["num_steps"]  # per request (--steps is the default)
    factory = make_sampler_factory(
        args.ckpt, device=args.device, backend=args.backend, **options,
        guidance=args.guidance, dtype=getattr(torch, args.dtype))
    return InferenceServer(
        factory, host=args.host, port=args.port, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, max_seeds=args.max_seeds,
        request_timeout_s=args.request_timeout_s, default_steps=args.num_steps,
        batch_sizes=_batch_sizes(args.batch_sizes), max_samplers=args.max_samplers,
        max_queue=args.max_queue)


def cmd_serve(args) -> int:
    """Run the server until SIGINT/SIGTERM."""
    import logging

    from .serve import run_until_signal

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_until_signal(build_server(args))
    return 0
