"""``edm-fast serve``: an inference server that batches concurrent requests (FastAPI + uvicorn).

    engine = Engine("default", device="cpu")              # load, build and warm the evaluator
    app = create_app(engine, ServeSettings(max_batch=64))   # POST /generate, /healthz, /metrics
    run(app, bind("127.0.0.1", 8000))                       # uvicorn, until SIGINT/SIGTERM

Modules: settings (limits and defaults, checked by pydantic), engine (the evaluator of D shared
by every plan), batcher (asyncio batching and fairness), app (HTTP API, pydantic models), render
(png/npy/json), metrics (Prometheus), server (uvicorn), ray_app (the app on Ray Serve).
See docs/SERVING.md.
"""

import importlib

from .limits import DEFAULT_MAX_COST, MAX_STEPS

__all__ = ["DEFAULT_MAX_COST", "MAX_STEPS", "Engine", "ServeSettings", "UvicornLimits",
           "bind", "create_app", "run"]

# The rest needs the `serve` extra (FastAPI, uvicorn, pydantic): imported on first use, so that
# the package (and `edm-fast --help`, `edm-fast sample`) loads without it.
_LAZY = {"create_app": "app", "Engine": "engine", "bind": "server", "run": "server",
         "ServeSettings": "settings", "UvicornLimits": "settings"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
