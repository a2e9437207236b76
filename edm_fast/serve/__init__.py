"""``edm-fast serve``: an inference server that batches concurrent requests (FastAPI + uvicorn).

    engine = Engine("default", device="cpu")              # load, build and warm the evaluator
    app = create_app(engine, ServeSettings(max_batch=64))   # POST /generate, /healthz, /metrics
    run(app, bind("127.0.0.1", 8000))                       # uvicorn, until SIGINT/SIGTERM

Modules: settings (limits and defaults, checked by pydantic), engine (the evaluator of D shared
by every plan), batcher (asyncio batching and fairness), app (HTTP API, pydantic models), render
(png/npy/json), metrics (Prometheus), server (uvicorn), ray_app (the app on Ray Serve).
See docs/SERVING.md.
"""

from .app import create_app
from .engine import Engine
from .server import bind, run
from .settings import DEFAULT_MAX_COST, MAX_STEPS, ServeSettings, UvicornLimits

__all__ = ["DEFAULT_MAX_COST", "MAX_STEPS", "Engine", "ServeSettings", "UvicornLimits",
           "bind", "create_app", "run"]
