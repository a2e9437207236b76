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
import functools
import time
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from ..solvers import SOLVERS
from ..precision import short_name
from .batcher import Batcher, BatchFailed, Busy, Job
from .metrics import GuardMiddleware, ServerMetrics, error_response
from .render import render
from .settings import MAX_GUIDANCE, MAX_STEPS, ServeSettings

__all__ = ["GenerateBody", "create_app"]

FORMATS = ("png", "npy", "json")
VALUE_ERRORS = {"greater_than_equal", "less_than_equal", "literal_error", "finite_number"}


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
                                   description="guidance weight w (null: off): classifier-free, "
                                   "or autoguidance where the server has a guide model")
    format: Literal[FORMATS] | None = Field(None, description="default png (json for "
                                            "non-image samples)")


OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": GenerateBody.model_json_schema(by_alias=True)}}}}
OPENAPI_RESPONSES = {200: {"content": {"image/png": {}, "application/x-npy": {}}}}
unprocessable = functools.partial(HTTPException, 422)  # a value out of range


# The answer to each problem of edm_fast.noise.parse_seeds: a string that is not a seed list is
# malformed (400), the other problems are values out of range (422).
SEED_ANSWERS = {"empty": (422, "'seeds' is empty"),
                "range": (422, "seeds must be integers in [0, 2**64)"),
                "count": (422, "too many seeds: at most {limit} per request")}


def parse_seeds(spec, max_seeds: int) -> list[int]:
    """The request's seeds (7, [1, 2] or "0-7,9") as a list, checked by noise.parse_seeds."""
    from ..noise import SeedListError, parse_seeds as seed_list

    try:
        return seed_list(spec, max_seeds=max_seeds)
    except SeedListError as exc:
        if exc.problem not in SEED_ANSWERS:
            raise HTTPException(400, str(exc)) from None
        status, message = SEED_ANSWERS[exc.problem]
        raise HTTPException(status, message.format(limit=exc.limit)) from None


def parse_labels(spec, n: int, label_dim: int, names: list[str]) -> list[int | None]:
    labels = list(spec) if isinstance(spec, list) else [spec] * n
    if len(labels) != n:
        raise unprocessable(f"'class' has {len(labels)} entries for {n} seeds")
    if label_dim == 0 and labels != [None] * n:
        raise unprocessable("the model is unconditional: 'class' must be null")
    for i, c in enumerate(labels):
        if isinstance(c, str):
            if c not in names:
                known = f"; its classes: {', '.join(names)}" if names else " (it stores none)"
                raise unprocessable(f"unknown class name {c!r}: not a class of the model{known}")
            labels[i] = c = names.index(c)
        if c is not None and not 0 <= c < label_dim:
            raise unprocessable(f"unknown class {c}: the model has classes 0..{label_dim - 1}")
    return labels


def create_app(engine, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app over a warmed ``engine.Engine`` (default ServeSettings()); its batcher
    lives with the app's lifespan (started on start-up, drained on shutdown)."""
    s = settings or ServeSettings()
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
    app.add_middleware(GuardMiddleware, metrics=metrics, settings=s)
    app.state.settings, app.state.longest_batch_s = s, longest

    # every error, as error_response: the statuses of the module's docstring
    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(ValidationError)
    async def invalid_body(request, exc: ValidationError):
        errors = exc.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            return error_response(400, f"malformed JSON: {errors[0]['msg']}")
        # the first message per field (a union lists one error per member)
        fields = {str(e["loc"][0]) if e["loc"] else "body": e["msg"] for e in reversed(errors)}
        return error_response(422 if all(e["type"] in VALUE_ERRORS for e in errors) else 400,
                              "; ".join(f"'{k}': {v}" for k, v in sorted(fields.items())))

    @app.exception_handler(Busy)
    async def busy(request, exc: Busy):
        return error_response(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(BatchFailed)
    async def failed(request, exc: BatchFailed):
        return error_response(500, str(exc))

    @app.get("/healthz")
    async def healthz():
        failure = app.state.batcher.failure
        error = {} if failure is None else {
            "error": f"internal error: the batcher stopped ({failure})"}
        body = {"status": "error" if error else "ok", "backend": engine.backend_name,
                "warmup_s": round(engine.warmup_seconds, 3), "device": str(engine.device),
                "net_dtype": short_name(engine.net_dtype), "guidance": engine.guidance_kind,
                "model": {"shape": list(engine.shape), "label_dim": engine.label_dim,
                          "class_names": engine.class_names},
                "limits": {**dataclasses.asdict(s), "steps": [1, MAX_STEPS],
                           "batch_sizes": engine.batch_sizes, "solvers": list(SOLVERS),
                           "formats": list(FORMATS), "batch_cost": batch_cost,
                           "longest_batch_s": round(longest, 3)}, **error}
        return JSONResponse(body, 503 if error else 200)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/generate", openapi_extra=OPENAPI_BODY, responses=OPENAPI_RESPONSES)
    async def generate(request: Request):
        start = time.perf_counter()
        body = GenerateBody.model_validate_json(await request.body())  # any Content-Type: curl -d
        seeds = parse_seeds(body.seeds, s.max_seeds)
        labels = parse_labels(body.class_, len(seeds), engine.label_dim, engine.class_names)
        steps, solver = body.steps or s.default_steps, body.solver or s.default_solver
        guidance = body.guidance if "guidance" in body.model_fields_set else s.default_guidance
        fmt = body.format or ("png" if image else "json")
        if fmt == "png" and not image:
            raise unprocessable("format 'png' needs image samples (C, H, W); use npy or json")
        if guidance is not None and engine.guide is None and None in labels:
            raise unprocessable("classifier-free guidance needs a class for every seed")
        try:
            served = engine.plan(solver, steps, guidance)
        except ValueError as exc:
            raise unprocessable(str(exc)) from None
        if served.cost * len(seeds) > s.max_cost:
            raise unprocessable(f"request too costly: {len(seeds)} seeds x {served.cost} "
                                f"denoiser rows = {served.cost * len(seeds)} > max_cost "
                                f"{s.max_cost}; ask for fewer seeds or steps")
        job = Job((steps, solver, guidance), seeds, labels, served.cost, served)
        rows = await _answer(app.state.batcher, job, request, s.request_timeout_s)
        if rows is None:
            return Response(status_code=499)  # the client left: nobody reads it; in /metrics
        meta = {"seeds": seeds, "classes": labels, "steps": steps, "solver": solver,
                "guidance": guidance}
        ctype, data, headers = await asyncio.to_thread(render, torch.stack(rows), meta, fmt)
        metrics.latency.observe(time.perf_counter() - start)
        return Response(data, media_type=ctype, headers=headers)

    return app


async def _answer(batcher: Batcher, job: Job, request: Request, timeout: float):
    """Submit ``job`` and return its rows, or None once the client has disconnected; 504 past
    ``timeout``. A job that is not answered has its queued seeds dropped."""
    batcher.submit(job)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({job.future, gone}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job.future.done():
        return job.future.result()  # or its Busy / BatchFailed
    batcher.cancel(job)
    if gone.done():
        return None
    raise HTTPException(504, f"timed out after {timeout:g} s; the request's queued work was "
                        "dropped")


async def _disconnect(request: Request) -> None:
    """Returns once the client has closed the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
