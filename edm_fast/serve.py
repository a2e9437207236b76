"""``edm-fast serve``: an HTTP inference server that batches concurrent requests.

Standard library only (``http.server.ThreadingHTTPServer``). A handler thread per connection
parses and validates a request, queues one item per seed and waits for its rows. One dispatcher
thread takes the oldest pending item's ``steps``, collects pending items with the same ``steps``
(up to ``max_batch``, or until ``max_wait_ms`` has passed since the oldest arrived), runs one
Sampler call on them and hands every request its rows. Noise is per seed (edm_fast.noise), so a
response does not depend on which other requests shared its batch (up to float rounding, ~1e-5).
Samplers are made lazily by ``sampler_factory(steps, batch_size)`` for each (steps, bucket):
a batch of n items runs at the smallest of ``batch_sizes`` (default: powers of two up to
``max_batch``) that holds it; at most ``max_samplers`` are kept (least recently used go first).

Limits are checked at construction (ValueError): ``max_wait_ms`` in [0, 60000] (MAX_WAIT_MS),
``request_timeout_s`` and ``socket_timeout_s`` finite and > 0 (NaN and inf are refused).
``max_seeds`` above ``max_queue`` is lowered to ``max_queue`` with a warning: a request larger
than the whole queue could never be queued, so it gets 422 (too many seeds), never 503.

Endpoints
    POST /generate  {"seeds": [1, 2] | 7 | "0-7,9",       one to max_seeds non-negative ints
                     "class": 3 | "dog" | null | [...],   an index or a stored class name (as
                                                          `sample --class`), per seed in a list;
                                                          null: all-zero labels (unconditional)
                     "steps": 18,                         1 .. 256; default: the server's --steps
                     "format": "png" | "npy" | "json"}    default: png (json for non-images)
        png, one seed       -> image/png
        png, several seeds  -> application/json {"seeds", "classes", "steps", "images": [base64]}
        npy                 -> application/x-npy: float32 (N, *shape), about [-1, 1] (not
                               clipped), rows in seed order (also in the X-Seeds header)
        json                -> application/json {"seeds", "classes", "steps", "shape", "samples"}
    GET /healthz    200 {"status": "ok", "model": {...}, "limits": {...}}; once the dispatcher
                    thread has died (a bug; the server cannot recover), 503 {"error": why,
                    "status": 503, "model", "limits"} instead
    GET /metrics    counters (requests: every HTTP response, by status in "responses"),
                    batch-size histogram, latency p50/p90/p99 (ms, successful /generate),
                    queue depth (queued images), open connections, cached samplers

Errors are JSON {"error": message, "status": code}: 400 malformed JSON or wrong types; 404, 405;
411 no Content-Length; 413 body over max_body_bytes; 422 a value out of range (unknown class,
steps outside [1, 256], more than max_seeds seeds, png of non-image samples; a "0-7,9" string
is counted before it is expanded); 503 queue full or shutting down (with Retry-After: 1; a
request that fits max_seeds always fits an empty queue); 504 past the request deadline
(request_timeout_s): the request's queued items are dropped, and a batch already running
finishes with its rows discarded; 500 a sampler failure, or the dispatcher thread has died
(requests waiting then are answered at once, and every later /generate gets 500 too).
A client that disconnects is noticed while its request waits (its queued items are dropped);
the dispatcher never touches a socket.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import numbers
import os
import select
import signal
import socket
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

__all__ = ["InferenceServer", "make_sampler_factory", "run_until_signal", "parse_generate",
           "GenerateRequest", "render", "HTTPError", "MAX_STEPS", "MAX_WAIT_MS"]

log = logging.getLogger("edm_fast.serve")
MAX_STEPS = 256
MAX_WAIT_MS = 60_000.0  # the largest max_wait_ms: a minute of waiting for a batch to fill
FORMATS = ("png", "npy", "json")


class HTTPError(Exception):
    """An error answered as JSON {"error": message, "status": status}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The client closed its connection while its request waited."""


#----------------------------------------------------------------------------
# Request parsing and validation (pure functions, no server state).

@dataclass(frozen=True)
class GenerateRequest:
    seeds: list[int]
    labels: list[int | None]  # one per seed
    steps: int
    format: str


def parse_generate(body, *, label_dim: int, image: bool, max_seeds: int,
                   default_steps: int, class_names: Sequence[str] = ()) -> GenerateRequest:
    """Validate a decoded /generate body; raises HTTPError 400 (types) or 422 (values)."""
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - {"seeds", "class", "steps", "format"})
    if unknown:
        raise HTTPError(400, f"unknown field(s) {unknown}; expected seeds, class, steps, format")
    if "seeds" not in body:
        raise HTTPError(400, "missing 'seeds' (e.g. [0, 1], 7 or \"0-7\")")
    seeds = _parse_seeds(body["seeds"], max_seeds)
    steps = body.get("steps", default_steps)
    if not _is_int(steps):
        raise HTTPError(400, f"'steps' must be an integer, got {type(steps).__name__}")
    if not 1 <= steps <= MAX_STEPS:
        raise HTTPError(422, f"'steps' must be in [1, {MAX_STEPS}], got {steps}")
    fmt = body.get("format", "png" if image else "json")
    if fmt not in FORMATS:
        raise HTTPError(400 if not isinstance(fmt, str) else 422,
                        f"'format' must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "png" and not image:
        raise HTTPError(422, "format 'png' needs image samples (C, H, W); use 'npy' or 'json'")
    labels = _parse_labels(body.get("class"), len(seeds), label_dim, list(class_names))
    return GenerateRequest(seeds, labels, int(steps), fmt)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_seeds(spec, max_seeds: int) -> list[int]:
    """An int, a list of ints or a '0-7,9' string -> seeds, at most max_seeds of them."""
    from .noise import parse_seeds

    if isinstance(spec, str):
        if _seed_spec_count(spec) > max_seeds:  # count before expanding: '0-999999999'
            raise HTTPError(422, f"too many seeds: at most {max_seeds} per request")
        try:
            seeds = parse_seeds(spec)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
    elif _is_int(spec):
        seeds = [spec]
    elif isinstance(spec, list) and all(_is_int(s) for s in spec):
        seeds = list(spec)
    else:
        raise HTTPError(400, "'seeds' must be an int, a list of ints or a string like \"0-7\"")
    if not seeds:
        raise HTTPError(422, "'seeds' is empty")
    if len(seeds) > max_seeds:
        raise HTTPError(422, f"too many seeds ({len(seeds)}): at most {max_seeds} per request")
    if any(not 0 <= s < 2**64 for s in seeds):
        raise HTTPError(422, "seeds must be integers in [0, 2**64)")
    return seeds


def _seed_spec_count(spec: str) -> int:
    """How many seeds a '0-7,9' string expands to (malformed parts count as one). A decreasing
    range 'b-a' counts as its size b - a + 1, never as a negative number that would cancel the
    other parts; noise.parse_seeds refuses it (400) when the total is within the limit."""
    total = 0
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            total += abs(int(hi) - int(lo)) + 1 if sep else int(bool(lo))
        except ValueError:
            total += 1
    return total


def _parse_labels(spec, n: int, label_dim: int, names: list[str]) -> list[int | None]:
    """null, an int, a class name or a list of n of them -> one label per seed (None or an
    index in [0, label_dim)); a name is looked up in the checkpoint's class names, as
    `edm-fast sample --class NAME` does."""
    labels = list(spec) if isinstance(spec, list) else [spec] * n
    if len(labels) != n:
        raise HTTPError(422, f"'class' has {len(labels)} entries for {n} seeds")
    for i, c in enumerate(labels):
        if c is None:
            continue
        if not (_is_int(c) or isinstance(c, str)):
            raise HTTPError(400, "'class' must be an int, a class name, null, or a list of them")
        if label_dim == 0:
            raise HTTPError(422, "the model is unconditional: 'class' must be null")
        if isinstance(c, str):
            if c not in names:
                known = f"; its classes: {', '.join(names)}" if names else " (it stores none)"
                raise HTTPError(422, f"unknown class name {c!r}: not a class name of the "
                                     f"model{known}")
            labels[i] = c = names.index(c)
        if not 0 <= c < label_dim:
            raise HTTPError(422, f"unknown class {c}: the model has classes 0..{label_dim - 1}")
    return labels


#----------------------------------------------------------------------------
# Responses: rows (N, *shape) in [-1, 1] -> bytes.

def render(rows: torch.Tensor, req: GenerateRequest) -> tuple[str, bytes, dict]:
    """(content type, body, extra headers) for the request's format."""
    seeds_header = {"X-Seeds": ",".join(map(str, req.seeds))}
    if req.format == "npy":
        buf = io.BytesIO()
        np.save(buf, rows.float().numpy())
        return "application/x-npy", buf.getvalue(), seeds_header
    meta = {"seeds": req.seeds, "classes": req.labels, "steps": req.steps}
    if req.format == "json":
        meta.update(shape=list(rows.shape[1:]), samples=rows.float().tolist())
        return "application/json", json.dumps(meta).encode(), {}
    pngs = [_png_bytes(a) for a in _uint8(rows)]
    if len(pngs) == 1:
        return "image/png", pngs[0], seeds_header
    meta["images"] = [base64.b64encode(p).decode("ascii") for p in pngs]
    return "application/json", json.dumps(meta).encode(), {}


def _uint8(rows: torch.Tensor) -> np.ndarray:
    from .images import to_uint8

    return to_uint8(rows)


def _png_bytes(array: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes (grayscale for C = 1)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


#----------------------------------------------------------------------------
# Metrics: counters and bounded samples, one lock.

class Metrics:
    """Thread-safe counters for GET /metrics."""

    def __init__(self, window: int = 4096):
        self._lock = threading.Lock()
        self._latency = deque(maxlen=window)  # seconds, successful /generate requests
        self.started = time.monotonic()
        self.counts = {"requests": 0, "errors": 0, "timeouts": 0, "client_disconnects": 0,
                       "images": 0, "batches": 0, "padded_rows": 0, "dropped_items": 0,
                       "sampler_failures": 0, "samplers_created": 0}
        self.status: dict[int, int] = {}
        self.batch_sizes: dict[int, int] = {}

    def add(self, name: str, k: int = 1) -> None:
        with self._lock:
            self.counts[name] += k

    def response(self, status: int) -> None:
        with self._lock:
            self.counts["requests"] += 1
            self.counts["errors"] += status >= 400
            self.status[status] = self.status.get(status, 0) + 1

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latency.append(seconds)

    def batch(self, size: int, padded: int) -> None:
        with self._lock:
            self.counts["batches"] += 1
            self.counts["images"] += size
            self.counts["padded_rows"] += padded - size
            self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def snapshot(self) -> dict:
        with self._lock:
            lat = sorted(self._latency)
            out = dict(self.counts)
            out["responses"] = {str(k): v for k, v in sorted(self.status.items())}
            out["batch_size_histogram"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        out["mean_batch_size"] = out["images"] / out["batches"] if out["batches"] else 0.0
        out["latency_ms"] = {f"p{q}": _percentile(lat, q) * 1e3 for q in (50, 90, 99)}
        out["latency_ms"]["count"] = len(lat)
        out["uptime_s"] = time.monotonic() - self.started
        return out


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list: the ceil(q n / 100)-th value (0 for an
    empty one). ``q`` is an integer percent, so q n / 100 is exact where it is a whole number."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(q * len(sorted_values) / 100)
    return sorted_values[max(0, min(len(sorted_values), rank) - 1)]


#----------------------------------------------------------------------------
# The batching dispatcher: pending items -> one Sampler call per batch.

@dataclass(eq=False)
class Job:
    """One /generate request's work; the dispatcher fills ``rows`` and sets ``done``."""

    request: GenerateRequest
    deadline: float  # time.monotonic() after which nobody waits for it
    created: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: HTTPError | None = None
    cancelled: bool = False

    def __post_init__(self):
        self.rows: list[torch.Tensor | None] = [None] * len(self.request.seeds)
        self.missing = len(self.rows)


class Dispatcher:
    """Collects queued (job, index) items into batches and runs them on cached Samplers."""

    def __init__(self, sampler_factory, *, max_batch: int, max_wait_ms: float, max_queue: int,
                 batch_sizes, max_samplers: int, metrics: Metrics):
        self.factory = sampler_factory
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.batch_sizes = sorted(set(batch_sizes or _pow2_sizes(max_batch)) | {max_batch})
        if self.batch_sizes[0] < 1 or self.batch_sizes[-1] > max_batch:
            raise ValueError(f"batch_sizes must lie in [1, max_batch={max_batch}]")
        self.max_samplers = max_samplers
        self.metrics = metrics
        self.samplers: OrderedDict = OrderedDict()  # (steps, batch size) -> Sampler, LRU last
        self._pending: deque = deque()  # (job, index), oldest first
        self._count: dict[int, int] = {}  # steps -> pending items
        self._cond = threading.Condition()
        self._stopping = False
        self._running: list = []  # the items of the batch being run
        self.error: str | None = None  # why the dispatcher thread died, if it did
        self._thread = threading.Thread(target=self._loop, name="edm-fast-dispatcher")

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def failure(self) -> str | None:
        """Why the dispatcher cannot run batches any more (its thread died), else None."""
        if self.error is None and self._thread.ident is not None \
                and not self._thread.is_alive() and not self._stopping:
            return "the dispatcher thread is not running"
        return self.error

    def submit(self, job: Job) -> None:
        """Queue every seed of ``job``; 503 when shutting down or the queue is full, 500 when
        the dispatcher thread has died."""
        n = len(job.rows)
        with self._cond:
            failure = self.failure
            if failure is not None:
                raise HTTPError(500, _dead_message(failure))
            if self._stopping:
                raise HTTPError(503, "the server is shutting down")
            if len(self._pending) + n > self.max_queue:
                raise HTTPError(503, f"server busy: {len(self._pending)} images queued "
                                f"(limit {self.max_queue}); retry later")
            self._pending.extend((job, i) for i in range(n))
            steps = job.request.steps
            self._count[steps] = self._count.get(steps, 0) + n
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop the job's queued items; rows of a batch already running are discarded."""
        with self._cond:
            job.cancelled = True
            kept = deque(item for item in self._pending if item[0] is not job)
            dropped = len(self._pending) - len(kept)
            if dropped:
                self._pending = kept
                self._count[job.request.steps] -= dropped
                self.metrics.add("dropped_items", dropped)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running batch, fail every queued request with 503, join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            jobs = {job for job, _ in self._pending}
            self._pending.clear()
            self._count.clear()
        for job in jobs:
            _fail(job, HTTPError(503, "the server shut down before this request ran"))

    def _loop(self) -> None:
        try:
            while True:
                items = self._collect()
                if items is None:
                    return
                if items:
                    self._running = items
                    self._run(items)
                    self._running = []
        except Exception as exc:  # noqa: BLE001 - a bug: say so (healthz, 500s), never hang
            self._die(exc)

    def _die(self, exc: Exception) -> None:
        """Record why the thread died and fail every queued or running request (500)."""
        log.error("the dispatcher thread died", exc_info=exc)
        with self._cond:
            self.error = f"{type(exc).__name__}: {exc}"
            jobs = {job for job, _ in self._pending} | {job for job, _ in self._running}
            self._pending.clear()
            self._count.clear()
            self._running = []
        for job in jobs:
            _fail(job, HTTPError(500, _dead_message(self.error)))

    def _collect(self):
        """Wait for work, then take up to max_batch live items with the oldest item's steps.

        Returns None once stopping; [] when every taken item had been cancelled or expired.
        """
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            oldest = self._pending[0][0]
            steps, end = oldest.request.steps, oldest.created + self.max_wait
            while self._count[steps] < self.max_batch and not self._stopping:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._take(steps)

    def _take(self, steps: int) -> list:
        """Remove up to max_batch items of ``steps`` (caller holds the lock); keep live ones."""
        taken, kept, now = [], deque(), time.monotonic()
        for item in self._pending:
            if len(taken) < self.max_batch and item[0].request.steps == steps:
                taken.append(item)
            else:
                kept.append(item)
        self._pending = kept
        self._count[steps] -= len(taken)
        live = [it for it in taken if not it[0].cancelled and it[0].deadline > now]
        if len(live) < len(taken):
            self.metrics.add("dropped_items", len(taken) - len(live))
        return live

    def _run(self, items: list) -> None:
        """One Sampler call for the items (same steps); deliver rows or fail their jobs."""
        steps = items[0][0].request.steps
        try:
            sampler = self._sampler(steps, len(items))
            seeds = [job.request.seeds[i] for job, i in items]
            labels = _label_tensor([job.request.labels[i] for job, i in items], sampler)
            with torch.no_grad():
                out = sampler(seeds=seeds, class_labels=labels).detach().cpu()
        except Exception as exc:  # a failing model must not stop the dispatcher
            log.exception("sampling failed")
            self.metrics.add("sampler_failures")
            for job in {job for job, _ in items}:
                self.cancel(job)
                _fail(job, HTTPError(500, f"sampling failed: {type(exc).__name__}: {exc}"))
            return
        self.metrics.batch(len(items), sampler.batch_size)
        for row, (job, i) in zip(out, items):
            job.rows[i] = row
            job.missing -= 1
            if job.missing == 0:
                job.done.set()

    def _sampler(self, steps: int, n: int):
        """The cached Sampler for (steps, smallest batch size >= n), made on first use."""
        size = next(b for b in self.batch_sizes if b >= n)
        key = (steps, size)
        sampler = self.samplers.pop(key, None)
        if sampler is None:
            sampler = self.factory(steps, size)
            self.metrics.add("samplers_created")
        self.samplers[key] = sampler
        while len(self.samplers) > self.max_samplers:
            self.samplers.popitem(last=False)
        return sampler


def _pow2_sizes(max_batch: int) -> list[int]:
    return [1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch]


def _dead_message(failure: str) -> str:
    return f"internal error: the batching dispatcher stopped ({failure}); restart the server"


def _fail(job: Job, error: HTTPError) -> None:
    if job.error is None:
        job.error = error
    job.done.set()


def _label_tensor(labels: list[int | None], sampler):
    """(N, label_dim) one-hot rows (all-zero for None), or None for unconditional models."""
    if sampler.label_dim == 0:
        return None
    out = torch.zeros(len(labels), sampler.label_dim, dtype=sampler.dtype)
    for row, c in enumerate(labels):
        if c is not None:
            out[row, c] = 1
    return out


#----------------------------------------------------------------------------
# HTTP: one handler thread per connection (HTTP/1.1 keep-alive), JSON errors.

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edm-fast"

    def setup(self):
        self.app: InferenceServer = self.server.app
        self.timeout = self.app.socket_timeout_s  # idle keep-alive and slow-body limit
        super().setup()
        self.app._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.app._track(self.connection, False)

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.debug("%s " + format, self.address_string(), *args)

    def _endpoint(self) -> str:
        return urllib.parse.urlsplit(self.path).path  # without a query string

    def do_GET(self):
        endpoint = self._endpoint()
        if endpoint == "/healthz":
            health = self.app.health()
            self._send_json(503 if "error" in health else 200, health)
        elif endpoint == "/metrics":
            self._send_json(200, self.app.metrics_snapshot())
        else:
            self._wrong_method_or_endpoint()

    def _wrong_method_or_endpoint(self):
        """405 (with Allow) for a known endpoint asked with the wrong method, else 404. A body
        is not read, so the connection closes after the answer."""
        allowed = {"/healthz": "GET", "/metrics": "GET", "/generate": "POST"}.get(
            self._endpoint())
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True
        if allowed is None:
            self._send_json(404, {"error": f"no such endpoint {self.path!r}; use POST "
                                           "/generate, GET /healthz or GET /metrics"})
        else:
            self._send_json(405, {"error": f"use {allowed} {self._endpoint()}"}, allow=allowed)

    do_PUT = do_DELETE = do_PATCH = _wrong_method_or_endpoint

    def do_POST(self):
        start = time.perf_counter()
        if self._endpoint() != "/generate":
            self._wrong_method_or_endpoint()
            return
        try:
            body = self._read_json()  # read first: an unread body would poison keep-alive
            ctype, data, headers = self.app.generate(body, self.connection)
        except HTTPError as exc:
            self._send_json(exc.status, {"error": exc.message})
            return
        except _ClientGone:
            self.close_connection = True
            self.app.metrics.add("client_disconnects")
            return
        except Exception as exc:  # a bug must cost one request, never the connection loop
            log.exception("error handling POST /generate")
            self._send_json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
            return
        if self._send(200, ctype, data, headers):
            self.app.metrics.latency(time.perf_counter() - start)

    def send_error(self, code, message=None, explain=None):
        """Protocol errors found by the base class (bad request line, 501...) as JSON too."""
        self.close_connection = True
        self._send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _read_json(self):
        """The request body decoded as JSON; 400/411/413 on a bad or oversized body."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(411, "chunked bodies are not supported: send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise HTTPError(411, "missing Content-Length")
        try:
            length = int(length)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, f"bad Content-Length {length!r}") from None
        if length > self.app.max_body_bytes:
            self.close_connection = True
            self._discard(length)
            raise HTTPError(413, f"body of {length} bytes is over the limit of "
                            f"{self.app.max_body_bytes}")
        data = self.rfile.read(length)
        if len(data) < length:
            raise _ClientGone()
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, deep nesting
            raise HTTPError(400, f"malformed JSON: {str(exc)[:200]}") from None

    def _discard(self, length: int) -> None:
        """Read and drop a body up to 16x the limit, so that the client (still sending it)
        reads the 413 instead of a connection reset; larger bodies are cut off."""
        if length > 16 * self.app.max_body_bytes:
            return
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 65536))
                if not chunk:
                    return
                length -= len(chunk)
        except OSError:
            pass

    def _send_json(self, status: int, payload: dict, **headers) -> bool:
        if status >= 400:
            payload = {**payload, "status": status}
        headers = {k.capitalize(): v for k, v in headers.items()}
        if status == 503:
            headers["Retry-After"] = "1"
        return self._send(status, "application/json", json.dumps(payload).encode(), headers)

    def _send(self, status: int, ctype: str, body: bytes, headers: dict) -> bool:
        """Write one response; False (counted as a disconnect) if the client has gone."""
        self.app.metrics.response(status)
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            return True
        except OSError:  # BrokenPipe, ConnectionReset, socket timeout
            self.close_connection = True
            self.app.metrics.add("client_disconnects")
            return False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        log.exception("unhandled error serving %s", client_address)


def _peer_closed(sock: socket.socket) -> bool:
    """True if the client has closed (EOF or reset); never blocks, never consumes data."""
    try:
        poller = select.poll()  # unlike select(), no limit on the descriptor number
        poller.register(sock, select.POLLIN)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            return True
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


#----------------------------------------------------------------------------
# The server.

class InferenceServer:
    """A batching HTTP server for one model: ``start()``, ``url``, ``shutdown()``.

    Args:
        sampler_factory: ``factory(steps, batch_size) -> Sampler`` (see make_sampler_factory);
            called at start (default_steps, smallest batch size) and then lazily.
        host, port: where to listen (port 0: an ephemeral port, see ``url``).
        max_batch: most images per Sampler call (1: batching off).
        max_wait_ms: how long the oldest queued item may wait for a batch to fill, in
            [0, MAX_WAIT_MS].
        max_seeds: most seeds per request; lowered to ``max_queue`` (with a warning) if above.
        request_timeout_s: server-side deadline of a request (then 504), finite and > 0.
        default_steps: steps of requests that do not say.
        batch_sizes: the Sampler batch sizes (buckets) a batch is padded to.
        max_samplers: most cached Samplers (one per (steps, batch size) used).
        max_queue: most queued images before requests get 503.
        max_body_bytes: largest accepted request body (else 413).
        socket_timeout_s: per-connection socket timeout (idle keep-alive, slow bodies), finite
            and > 0.

    Raises ValueError for a limit out of range (NaN and inf included).
    """

    def __init__(self, sampler_factory, *, host: str = "127.0.0.1", port: int = 0,
                 max_batch: int = 64, max_wait_ms: float = 10.0, max_seeds: int = 256,
                 request_timeout_s: float = 60.0, default_steps: int = 18,
                 batch_sizes=None, max_samplers: int = 16, max_queue: int = 4096,
                 max_body_bytes: int = 65536, socket_timeout_s: float = 30.0):
        if min(max_batch, max_seeds, max_samplers, max_queue) < 1:
            raise ValueError("max_batch, max_seeds, max_samplers and max_queue must be >= 1")
        _check_number("max_wait_ms", max_wait_ms, 0, MAX_WAIT_MS)
        _check_number("request_timeout_s", request_timeout_s, 0, math.inf, lo_open=True)
        _check_number("socket_timeout_s", socket_timeout_s, 0, math.inf, lo_open=True)
        if not 1 <= default_steps <= MAX_STEPS:
            raise ValueError(f"default_steps must be in [1, {MAX_STEPS}]")
        if max_seeds > max_queue:
            log.warning("max_seeds (%d) is over max_queue (%d): a larger request could never "
                        "be queued, so at most %d seeds per request are accepted",
                        max_seeds, max_queue, max_queue)
            max_seeds = max_queue
        self.host, self.port = host, port
        self.max_seeds, self.default_steps = max_seeds, default_steps
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes, self.socket_timeout_s = max_body_bytes, socket_timeout_s
        self.poll_s = 0.05  # how often a waiting request checks its deadline and its client
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(sampler_factory, max_batch=max_batch,
                                     max_wait_ms=max_wait_ms, max_queue=max_queue,
                                     batch_sizes=batch_sizes, max_samplers=max_samplers,
                                     metrics=self.metrics)
        self.model_name = getattr(sampler_factory, "model_name", None)
        self._connections: set = set()
        self._conn_lock = threading.Lock()
        self._closing = False
        self._httpd = None
        self._serve_thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "InferenceServer":
        """Make the first Sampler (loads the model), bind, start dispatcher and HTTP threads."""
        if not 0 <= self.port <= 65535:  # before the model is loaded
            raise ValueError(f"port must be in 0..65535 (0: any free port), got {self.port}")
        probe = self.dispatcher._sampler(self.default_steps, 1)
        self.shape = tuple(probe.shape)
        self.label_dim = probe.label_dim
        from .models import class_names

        self.class_names = class_names(probe.denoiser)
        self.info = {"name": self.model_name, "shape": list(self.shape),
                     "label_dim": self.label_dim, "class_names": self.class_names,
                     "backend": probe.backend_name,
                     "device": str(probe.device), "dtype": str(probe.dtype).split(".")[-1]}
        try:
            self._httpd = _HTTPServer((self.host, self.port), _Handler)
        except OSError as exc:  # in use, not permitted, unknown host (socket.gaierror)
            raise ValueError(f"cannot listen on {self.host}:{self.port}: "
                             f"{exc.strerror or exc}") from exc
        self._httpd.app = self
        self.host, self.port = self._httpd.server_address[:2]
        self.dispatcher.start()
        self._serve_thread = threading.Thread(target=self._httpd.serve_forever,
                                              kwargs={"poll_interval": 0.1},
                                              name="edm-fast-http")
        self._serve_thread.start()
        log.info("serving %s on %s", self.model_name, self.url)
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish the running batch, fail queued requests (503), join threads."""
        if self._httpd is None:
            return
        self._httpd.shutdown()  # serve_forever returns: nothing new is accepted
        self.dispatcher.stop(timeout)
        with self._conn_lock:
            self._closing = True
            for conn in self._connections:  # wake handlers waiting for a keep-alive request
                _shut_read(conn)
        self._httpd.server_close()  # closes the port, joins handler threads
        self._serve_thread.join(timeout)
        self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    def generate(self, body, conn) -> tuple[str, bytes, dict]:
        """Validate, queue, wait (deadline, client liveness), then render the rows."""
        req = parse_generate(body, label_dim=self.label_dim, image=len(self.shape) == 3,
                             max_seeds=self.max_seeds, default_steps=self.default_steps,
                             class_names=self.class_names)
        job = Job(req, deadline=time.monotonic() + self.request_timeout_s)
        self.dispatcher.submit(job)
        self._wait(job, conn)
        return render(torch.stack(job.rows), req)

    def _wait(self, job: Job, conn) -> None:
        while not job.done.wait(max(0.0, min(self.poll_s, job.deadline - time.monotonic()))):
            if time.monotonic() >= job.deadline:
                self.dispatcher.cancel(job)
                self.metrics.add("timeouts")
                raise HTTPError(504, f"timed out after {self.request_timeout_s:g} s; "
                                "the request's queued work was dropped")
            # shutdown() closes the read side of every connection only after failing every
            # queued job (503): an EOF then is ours, not the client's, when the job is done
            if _peer_closed(conn) and not job.done.is_set():
                self.dispatcher.cancel(job)
                raise _ClientGone()
        if job.error is not None:
            raise job.error

    def health(self) -> dict:
        """{"status": "ok", "model", "limits"}, or {"error": why, "model", "limits"} once the
        dispatcher thread has died (GET /healthz answers that with 503)."""
        d = self.dispatcher
        failure = d.failure
        out = {"status": "ok"} if failure is None else {"error": _dead_message(failure)}
        out["model"] = self.info
        out["limits"] = {"max_batch": d.max_batch, "max_wait_ms": d.max_wait * 1e3,
                         "max_seeds": self.max_seeds, "max_queue": d.max_queue,
                         "steps": [1, MAX_STEPS], "default_steps": self.default_steps,
                         "batch_sizes": d.batch_sizes,
                         "request_timeout_s": self.request_timeout_s,
                         "max_body_bytes": self.max_body_bytes, "formats": list(FORMATS)}
        return out

    def metrics_snapshot(self) -> dict:
        out = self.metrics.snapshot()
        with self._conn_lock:
            out["open_connections"] = len(self._connections)
        out["queue_depth"] = self.dispatcher.queue_depth
        out["samplers_cached"] = len(self.dispatcher.samplers)
        return out

    def _track(self, conn, opened: bool) -> None:
        with self._conn_lock:
            if not opened:
                self._connections.discard(conn)
                return
            self._connections.add(conn)
            if self._closing:  # accepted just before shutdown: no next request is read
                _shut_read(conn)


def _check_number(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """ValueError unless ``value`` is a finite real number in [lo, hi] ((lo, hi] with lo_open);
    NaN fails every comparison, so it is refused too."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if number and math.isfinite(value) and (lo < value if lo_open else lo <= value) \
            and value <= hi:
        return
    bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
    if math.isfinite(hi):
        bound = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    got = f"{value:g}" if number and isinstance(value, (int, float)) else repr(value)
    raise ValueError(f"{name} must be a finite number {bound}, got {got}")


def _shut_read(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RD)
    except OSError:
        pass


#----------------------------------------------------------------------------
# Building a server from a model name, and running it until SIGINT/SIGTERM.

def make_sampler_factory(model="default", *, device="auto", **sampler_kwargs):
    """``factory(steps, batch_size) -> Sampler`` over one model, loaded once and shared.

    sampler_kwargs go to Sampler (solver, guidance, dtype, backend, sigma_min, ...). Each
    Sampler is told it sees ``batch_size`` images per call, so with backend='auto' on the CPU
    it keeps the reference loop rather than compiling one loop per (steps, batch size) while
    requests wait (edm_fast.backends.SMALL_CPU_JOB).
    """
    from .device import resolve_device
    from .models import load_denoiser
    from .sampler import Sampler

    dev = resolve_device(device)
    named = isinstance(model, (str, bytes, os.PathLike))
    denoiser = load_denoiser(model, device=dev) if named else model

    def factory(steps: int, batch_size: int) -> Sampler:
        return Sampler(denoiser, batch_size=batch_size, num_steps=steps, device=dev,
                       expected_images=batch_size, **sampler_kwargs)

    factory.model_name = str(model) if named else type(model).__name__
    return factory


def run_until_signal(server: InferenceServer, signals=(signal.SIGINT, signal.SIGTERM)) -> None:
    """Start ``server`` and block until one of ``signals``; then shut it down cleanly."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in signals}
    try:
        server.start()
        print(f"edm-fast serve: {server.info['name']} on {server.url} "
              f"(backend {server.info['backend']}, {server.info['device']}); Ctrl-C stops",
              flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.shutdown()
