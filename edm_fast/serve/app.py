"""The HTTP API (FastAPI): POST /generate, GET /healthz, GET /metrics; OpenAPI docs at /docs.

Errors are JSON {"error": message, "status": code}: 400 malformed JSON, a field of the wrong
type, a missing or unknown field; 404 / 405; 408 a body that stalls for body_timeout_s; 413 a
body over max_body_bytes; 422 a value out of range (steps, format, solver, class, seeds, a plan
the planner refuses, a cost over max_cost); 431 too many headers or header bytes; 503 queue
full or shutting down (Retry-After: 1); 504 past request_timeout_s (the request's queued seeds
are dropped); 500 a sampling failure. A client that disconnects has its queued seeds dropped
(counted as status 499 in /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from ..solvers import SOLVERS
from .batcher import Batcher, Job, QueueFull, ShuttingDown
from .metrics import GuardMiddleware, ServerMetrics, error_response
from .render import render

__all__ = ["DEFAULT_MAX_COST", "MAX_STEPS", "GenerateBody", "ServeSettings", "create_app"]

MAX_STEPS = 256
# 64 seeds of 256 Heun steps (511 NFE) = 32,704; 256 seeds of 18 guided steps = 17,920.
DEFAULT_MAX_COST = 32_768
FORMATS = ("png", "npy", "json")
MAX_GUIDANCE = 100.0  # |w|; larger weights overflow float32 samples (a 5xx, not a request)
VALUE_ERRORS = {"greater_than_equal", "less_than_equal", "literal_error", "finite_number"}


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The server's limits and defaults; ValueError naming the setting when one is out of
    range (NaN and inf included)."""

    max_batch: int = 64
    max_wait_ms: float = 10.0
    max_seeds: int = 256
    max_queue: int = 4096
    max_cost: int = DEFAULT_MAX_COST  # seeds x denoiser evaluations, x2 where guided
    max_batch_cost: int | None = None  # per batch; None: max_batch x the default plan's cost
    request_timeout_s: float = 60.0
    body_timeout_s: float = 10.0
    max_body_bytes: int = 65536
    max_headers: int = 100
    max_header_bytes: int = 16384  # request line + headers
    default_steps: int = 18
    default_solver: str = "heun"
    default_guidance: float | None = None

    def __post_init__(self):
        for name, lo, hi in (("max_batch", 1, 4096), ("max_seeds", 1, 10**6),
                             ("max_queue", 1, 10**7), ("max_cost", 1, 10**12),
                             ("max_body_bytes", 64, 2**30), ("max_headers", 8, 10**4),
                             ("max_header_bytes", 1024, 2**20),
                             *([("max_batch_cost", 1, 10**12)] if self.max_batch_cost is not None
                               else []),
                             ("default_steps", 1, MAX_STEPS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                flag = " (--steps)" if name == "default_steps" else ""
                raise ValueError(f"{name}{flag} must be in [{lo}, {hi}], got {value!r}")
        for name, lo, hi in (("max_wait_ms", 0, 60_000), ("request_timeout_s", 1e-3, 86_400),
                             ("body_timeout_s", 1e-3, 3600)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got "
                                 f"{value!r}")
        if self.max_seeds > self.max_queue:
            raise ValueError(f"max_seeds ({self.max_seeds}) is over max_queue "
                             f"({self.max_queue}): such a request could never be queued")
        if self.default_solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}")


class GenerateBody(BaseModel):
    """POST /generate. Absent fields take the server's defaults (--steps, --solver,
    --guidance); "guidance": null turns a server-wide guidance off for this request."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    seeds: int | list[int] | str = Field(description='seeds: 7, [1, 2] or "0-7,9"')
    class_: int | str | None | list[int | str | None] = Field(
        None, alias="class", description="a class index or stored name, null (zero labels), "
        "or one per seed")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    solver: Literal[tuple(SOLVERS)] | None = None
    guidance: float | None = Field(None, ge=-MAX_GUIDANCE, le=MAX_GUIDANCE, allow_inf_nan=False,
                                   description="classifier-free guidance weight w (null: off)")
    format: Literal[FORMATS] | None = Field(None, description="default png (json for "
                                            "non-image samples)")


OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": GenerateBody.model_json_schema(by_alias=True)}}}}
OPENAPI_RESPONSES = {200: {"content": {"image/png": {}, "application/x-npy": {}}}}


def validate(data: bytes) -> GenerateBody:
    """The body as a GenerateBody: HTTPException 400 for malformed JSON, wrong types, missing
    or unknown fields, 422 for values out of range (the error names each field)."""
    try:
        return GenerateBody.model_validate_json(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        raise HTTPException(400, f"malformed JSON: {errors[0]['msg']}")
    status = 422 if all(e["type"] in VALUE_ERRORS for e in errors) else 400
    fields = {}
    for e in errors:  # one message per field (a union lists one error per member)
        fields.setdefault(str(e["loc"][0]) if e["loc"] else "body", e["msg"])
    raise HTTPException(status, "; ".join(f"'{k}': {v}" for k, v in sorted(fields.items())))


def unprocessable(message: str) -> HTTPException:
    return HTTPException(422, message)


def _seed_count(spec: str) -> int:
    """How many seeds a '0-7,9' string holds, counted before it is expanded; a decreasing
    range 'b-a' counts as its size (noise.parse_seeds then refuses it)."""
    total = 0
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            total += abs(int(hi) - int(lo)) + 1 if sep else int(bool(lo))
        except ValueError:
            total += 1
    return total


def parse_seeds(spec, max_seeds: int) -> list[int]:
    from ..noise import parse_seeds as expand

    if isinstance(spec, str) and _seed_count(spec) > max_seeds:
        raise unprocessable(f"too many seeds: at most {max_seeds} per request")
    try:
        seeds = expand(spec) if isinstance(spec, str) else ([spec] if isinstance(spec, int)
                                                            else list(spec))
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    if not seeds:
        raise unprocessable("'seeds' is empty")
    if len(seeds) > max_seeds:
        raise unprocessable(f"too many seeds ({len(seeds)}): at most {max_seeds} per request")
    if any(not 0 <= s < 2**64 for s in seeds):
        raise unprocessable("seeds must be integers in [0, 2**64)")
    return seeds


def parse_labels(spec, n: int, label_dim: int, names: list[str]) -> list[int | None]:
    labels = list(spec) if isinstance(spec, list) else [spec] * n
    if len(labels) != n:
        raise unprocessable(f"'class' has {len(labels)} entries for {n} seeds")
    for i, c in enumerate(labels):
        if c is None:
            continue
        if label_dim == 0:
            raise unprocessable("the model is unconditional: 'class' must be null")
        if isinstance(c, str):
            if c not in names:
                known = f"; its classes: {', '.join(names)}" if names else " (it stores none)"
                raise unprocessable(f"unknown class name {c!r}: not a class of the model{known}")
            labels[i] = c = names.index(c)
        if not 0 <= c < label_dim:
            raise unprocessable(f"unknown class {c}: the model has classes 0..{label_dim - 1}")
    return labels


def create_app(engine, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app over a warmed ``engine.Engine``; its batcher lives with the app's
    lifespan (started on start-up, drained on shutdown)."""
    s = settings
    metrics = ServerMetrics(engine.batch_sizes)
    metrics.warmup.set(engine.warmup_seconds)
    image = len(engine.shape) == 3
    default = engine.plan(s.default_solver, s.default_steps, s.default_guidance)
    batch_cost = s.max_batch_cost or s.max_batch * default.cost  # a batch of default requests
    longest = engine.longest_batch_seconds(batch_cost, 2 * MAX_STEPS)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.batcher = batcher = Batcher(
            engine.sample, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue, max_batch_cost=batch_cost, on_batch=metrics.batch)
        metrics.queue_depth.set_function(lambda: batcher.queued)
        yield
        await batcher.stop()

    app = FastAPI(title="edm-fast", lifespan=lifespan, max_body_size=s.max_body_bytes,
                  description=__doc__)
    app.add_middleware(GuardMiddleware, metrics=metrics, max_headers=s.max_headers,
                       max_header_bytes=s.max_header_bytes,
                       body_timeout_s=s.body_timeout_s)
    app.state.engine, app.state.settings, app.state.metrics = engine, s, metrics
    app.state.longest_batch_s = longest

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.get("/healthz")
    async def healthz():
        batcher = getattr(app.state, "batcher", None)
        failure = batcher.failure if batcher else "not started"
        body = {"status": "ok" if failure is None else "error", "backend": engine.backend_name,
                "warmup_s": round(engine.warmup_seconds, 3), "device": str(engine.device),
                "model": {"shape": list(engine.shape), "label_dim": engine.label_dim,
                          "class_names": engine.class_names},
                "limits": {**dataclasses.asdict(s), "steps": [1, MAX_STEPS],
                           "batch_sizes": engine.batch_sizes, "solvers": list(SOLVERS),
                           "formats": list(FORMATS), "batch_cost": batch_cost,
                           "longest_batch_s": round(longest, 3)}}
        if failure is not None:
            body["error"] = f"internal error: the batcher stopped ({failure})"
        return JSONResponse(body, 200 if failure is None else 503)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/generate", openapi_extra=OPENAPI_BODY, responses=OPENAPI_RESPONSES)
    async def generate(request: Request):
        start = time.perf_counter()
        body = validate(await request.body())  # JSON whatever the Content-Type (curl -d)
        seeds = parse_seeds(body.seeds, s.max_seeds)
        labels = parse_labels(body.class_, len(seeds), engine.label_dim, engine.class_names)
        steps = body.steps or s.default_steps
        solver = body.solver or s.default_solver
        guidance = body.guidance if "guidance" in body.model_fields_set else s.default_guidance
        fmt = body.format or ("png" if image else "json")
        if fmt == "png" and not image:
            raise unprocessable("format 'png' needs image samples (C, H, W); use npy or json")
        if guidance is not None and None in labels:
            raise unprocessable("guidance needs a class for every seed")
        try:
            served = engine.plan(solver, steps, guidance)
        except ValueError as exc:
            raise unprocessable(str(exc)) from None
        cost = served.cost * len(seeds)
        if cost > s.max_cost:
            raise unprocessable(f"request too costly: {len(seeds)} seeds x {served.cost} "
                                f"denoiser rows = {cost} > max_cost {s.max_cost}; ask for "
                                "fewer seeds or steps")
        job = Job((steps, solver, guidance), seeds, labels, served.cost, served)
        batcher = app.state.batcher
        try:
            batcher.submit(job)
        except (QueueFull, ShuttingDown) as exc:
            return error_response(503, str(exc), {"Retry-After": "1"})
        except RuntimeError as exc:
            return error_response(500, f"internal error: {exc}")
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({job.future, gone}, timeout=s.request_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():
            batcher.cancel(job)
            if gone.done() and not gone.cancelled():
                return Response(status_code=499)  # nobody reads it; counted in /metrics
            return error_response(504, f"timed out after {s.request_timeout_s:g} s; the "
                                  "request's queued work was dropped")
        exc = job.future.exception()
        if isinstance(exc, ShuttingDown):
            return error_response(503, str(exc), {"Retry-After": "1"})
        if exc is not None:
            return error_response(500, f"internal error: the batcher stopped ({batcher.failure})"
                                  if batcher.failure else
                                  f"sampling failed: {type(exc).__name__}: {exc}")
        meta = {"seeds": seeds, "classes": labels, "steps": steps, "solver": solver,
                "guidance": guidance}
        ctype, data, headers = await asyncio.to_thread(render, torch.stack(job.future.result()),
                                                       meta, fmt)
        metrics.latency.observe(time.perf_counter() - start)
        return Response(data, media_type=ctype, headers=headers)

    return app


async def _disconnect(request: Request) -> None:
    """Returns once the client has closed the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
