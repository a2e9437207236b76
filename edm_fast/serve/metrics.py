"""Prometheus metrics of one server (a registry of its own, so that several apps can live in
one process), and the ASGI middleware that counts every response and guards request bodies."""

from __future__ import annotations

import asyncio
import json

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["GuardMiddleware", "ServerMetrics"]

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, batch_sizes):
        self.registry = r = CollectorRegistry()
        self.responses = Counter("edm_fast_requests", "HTTP responses by path and status",
                                 ["path", "status"], registry=r)
        self.latency = Histogram("edm_fast_generate_seconds", "POST /generate latency of "
                                 "answered requests (200)", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("edm_fast_batch_size", "seeds per batch",
                                    buckets=sorted(batch_sizes), registry=r)
        self.batch_seconds = Histogram("edm_fast_batch_seconds", "time of one batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("edm_fast_queue_depth", "seeds waiting for a batch",
                                 registry=r)
        self.warmup = Gauge("edm_fast_warmup_seconds", "start-up: model load and evaluator "
                            "warm-up", registry=r)

    def batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.batch_seconds.observe(seconds)


class GuardMiddleware:
    """Counts every response the app sends (by route path and status); answers 431 for more
    than ``settings.max_headers`` headers or ``max_header_bytes`` of them (uvicorn's h11 limit
    bounds only a head still arriving); 408 when a request body stalls for ``body_timeout_s``."""

    def __init__(self, app, *, metrics: ServerMetrics, settings):
        self.app, self.metrics, self.settings = app, metrics, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, body_done = [None], [scope["method"] in ("GET", "HEAD")]
        s = self.settings

        async def guarded_receive():
            if body_done[0]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), s.body_timeout_s)
            except asyncio.TimeoutError:
                from starlette.exceptions import HTTPException

                raise HTTPException(408, f"the request body stalled for over "
                                    f"{s.body_timeout_s:g} s", {"Connection": "close"})
            body_done[0] = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            size = sum(len(k) + len(v) for k, v in scope["headers"])
            if len(scope["headers"]) > s.max_headers or size > s.max_header_bytes:
                await error_response(431, f"over {s.max_headers} headers or "
                                     f"{s.max_header_bytes} bytes of them",
                                     {"Connection": "close"})(
                    scope, receive, counted_send)
            else:
                await self.app(scope, guarded_receive, counted_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "other")
            self.metrics.responses.labels(path, str(status[0] or 499)).inc()


def error_response(status: int, message: str, headers: dict | None = None):
    """The JSON error body every error response has: {"error": message, "status": status}."""
    from starlette.responses import Response

    body = json.dumps({"error": message, "status": status}).encode()
    return Response(body, status, headers=headers, media_type="application/json")
