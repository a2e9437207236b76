"""The same app as a Ray Serve deployment, for more than one machine or device.

Each replica builds and warms its own Engine and serves the same FastAPI app (``create_app``)
with its own batcher, so max_cost, the batching and the fairness policy hold behind Ray's proxy,
which spreads requests over the replicas. ``edm-fast serve --ray`` runs it (``run_ray``);
``serve run edm_fast.serve.ray_app:build key=value ...`` too. See docs/SERVING.md.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading

from ray import serve

from .app import create_app
from .engine import Engine
from .settings import SWITCH_INTERVAL_S, ServeSettings

__all__ = ["EdmFastDeployment", "build", "deployment", "run_ray"]


@serve.deployment(max_ongoing_requests=1024)  # the batcher needs the concurrent requests
@serve.ingress()
class EdmFastDeployment:
    def __init__(self, engine: dict, settings: ServeSettings):
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # a replica is a serving process (settings)
        self.engine, self.settings = Engine(**engine), settings

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self.settings)


def deployment(engine: dict, settings: ServeSettings, *, replicas: int | None = 1,
               autoscaling: dict | None = None, cpus: float = 1.0, gpus: float = 0.0):
    """The bound application: ``replicas`` copies, or ``autoscaling`` (Ray Serve's
    autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 8}) instead."""
    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    return EdmFastDeployment.options(
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        max_ongoing_requests=settings.max_queue, **scale,
    ).bind(engine, settings)


def build(args: dict):
    """Application builder for ``serve run edm_fast.serve.ray_app:build key=value ...``: keys
    model, device, backend, guide, net_dtype, replicas, cpus, gpus, and any ServeSettings
    field."""
    names = {f.name for f in dataclasses.fields(ServeSettings)}
    settings = ServeSettings(**{k: v for k, v in args.items() if k in names})  # "32" -> 32
    engine = {k: v for k, v in args.items()
              if k in ("model", "device", "backend", "guide", "net_dtype")}
    return deployment(engine, settings, replicas=int(args.get("replicas", 1)),
                      cpus=float(args.get("cpus", 1)), gpus=float(args.get("gpus", 0)))


def run_ray(config: dict, *, host: str, port: int, replicas: int, address: str | None,
            cpus: float, gpus: float) -> None:
    """Start (or join) Ray, deploy, print the URL, serve until SIGINT/SIGTERM, shut down."""
    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C (after Ray's)
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(config["engine"], config["settings"], replicas=replicas,
                             cpus=cpus, gpus=gpus), name="edm-fast", route_prefix="/")
        print(f"edm-fast serve: {config['engine']['model']} on http://{host}:{port} (Ray Serve, "
              f"{replicas} replicas); Ctrl-C stops", flush=True)
        threading.Event().wait()  # until SIGINT/SIGTERM raises KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
