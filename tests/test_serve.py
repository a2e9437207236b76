"""edm_fast.serve: answers equal a direct Sampler call seed for seed (also with a bf16 network
and with autoguidance), bad input gets 4xx, cost limits, Prometheus metrics, the fairness
policy, deadlines, disconnects and shutdown.

Every server listens on 127.0.0.1 on an ephemeral port (uvicorn in a thread of this process)
and every client call has a timeout. Images come from the bundled digits model at 4 steps;
the deadline and disconnect tests slow the exact toy model down, so their timing is under the
test's control.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from guide_fixtures import perturbed

from edm_fast.io.samples import to_uint8
from edm_fast.sampling.sampler import Sampler
from edm_fast.serve import Engine, ServeSettings, UvicornLimits, create_app
from edm_fast.serve.batcher import Batcher, Job
from edm_fast.serve.server import bind, make_server

STEPS = 4
# A row's float32 rounding depends on its batch size (batched convolutions sum in another
# order): up to 2.5e-5 per pixel, a 2-norm relative error (the project's measure,
# tests/test_backends.py) under 1e-5. A wrong seed, class, solver or guidance is off by ~1.
REL_TOL = 1e-5


def assert_close(got, want, rel=REL_TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= rel, f"relative error {err:.3g} > {rel:g}"


class Running:
    """uvicorn serving ``app`` in a thread; ``stop()`` is what SIGTERM does (should_exit)."""

    def __init__(self, app, limits=None):
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = make_server(app, limits or UvicornLimits())
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        end = time.monotonic() + 20
        while not self.server.started and time.monotonic() < end:
            time.sleep(0.02)
        assert self.server.started

    def request(self, method="GET", path="/healthz", body=None, headers=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def generate(self, **body):
        return self.request("POST", "/generate", body)

    def metric(self, name, **labels) -> float:
        text = self.request(path="/metrics")[2].decode()
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


@pytest.fixture(scope="module")
def digits():
    engine = Engine("default", device="cpu", backend="reference", batch_sizes=[1, 2, 4, 8])
    app = create_app(engine, ServeSettings(max_batch=8, max_wait_ms=150, max_seeds=32,
                                           max_cost=600, default_steps=STEPS,
                                           body_timeout_s=0.5, max_body_bytes=4096))
    server = Running(app)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sampler():
    """(solver, guidance) -> the direct Sampler call of one seed (batch size 1)."""
    cache = {}

    def sample(seed, c=None, solver="heun", guidance=None):
        key = (solver, guidance)
        if key not in cache:
            cache[key] = Sampler("default", num_steps=STEPS, batch_size=1, device="cpu",
                                 backend="reference", solver=solver, guidance=guidance)
        return cache[key](seeds=[seed], class_labels=c)[0].numpy()
    return sample


#----------------------------------------------------------------------------
# Answers: seed for seed equal to a direct Sampler call, whatever the batch company.

def test_concurrent_mixed_plans_are_batched_and_equal_the_sampler(digits, sampler):
    jobs = [dict(seeds=[s], **{"class": s % 10 if s % 3 else None}) for s in range(8)]
    jobs += [dict(seeds=[s], solver="dpmpp_2m", **{"class": 2}) for s in range(8, 12)]
    jobs += [dict(seeds=[s], guidance=2.0, **{"class": 7}) for s in range(12, 15)]
    batches = digits.metric("edm_fast_batch_size_count")
    barrier, results = threading.Barrier(len(jobs)), {}

    def client(body):
        barrier.wait(timeout=10)
        results[body["seeds"][0]] = digits.generate(steps=STEPS, format="npy", **body)

    threads = [threading.Thread(target=client, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for body in jobs:
        seed = body["seeds"][0]
        status, headers, data = results[seed]
        assert status == 200 and headers["x-seeds"] == str(seed), data
        want = sampler(seed, body["class"], body.get("solver", "heun"), body.get("guidance"))
        assert_close(npy(data)[0], want)
    # three plans: at least three batches, and fewer than one per request
    ran = digits.metric("edm_fast_batch_size_count") - batches
    assert 3 <= ran < len(jobs)


def test_png_and_multi_seed_formats_equal_the_sampler(digits, sampler):
    status, headers, body = digits.generate(seeds=5, **{"class": 3})
    assert status == 200 and headers["content-type"] == "image/png"
    png = np.asarray(Image.open(io.BytesIO(body)))
    want = to_uint8(torch.from_numpy(sampler(5, 3))[None])[0, ..., 0]
    assert png.shape == (16, 16) and np.abs(png.astype(int) - want).max() <= 1  # one level

    status, _, body = digits.generate(seeds="7-9", **{"class": [1, None, "2"]})
    out = json.loads(body)
    assert status == 200 and out["seeds"] == [7, 8, 9] and out["classes"] == [1, None, 2]
    for b64, seed, c in zip(out["images"], out["seeds"], out["classes"]):
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
        want = to_uint8(torch.from_numpy(sampler(seed, c))[None])[0, ..., 0]
        assert np.abs(img.astype(int) - want).max() <= 1

    status, _, body = digits.generate(seeds=[4, 4], format="json")
    samples = np.asarray(json.loads(body)["samples"], dtype=np.float32)
    assert status == 200 and samples.shape == (2, 1, 16, 16)
    assert_close(samples[1], sampler(4))


def test_healthz_names_backend_warmup_and_limits(digits):
    status, _, body = digits.request(path="/healthz")
    info = json.loads(body)
    assert status == 200 and info["status"] == "ok" and info["backend"] == "reference"
    assert info["warmup_s"] > 0 and info["limits"]["max_cost"] == 600
    assert info["model"]["class_names"] == [str(c) for c in range(10)]
    assert "dpmpp_2m" in info["limits"]["solvers"]
    assert digits.request(path="/docs")[0] == 200  # OpenAPI docs
    spec = json.loads(digits.request(path="/openapi.json")[2])
    assert "seeds" in json.dumps(spec["paths"]["/generate"]["post"]["requestBody"])


def test_metrics_are_prometheus_text_by_status(digits):
    before = digits.metric("edm_fast_requests_total", path="/generate", status="422")
    assert digits.generate(seeds=1, steps=999)[0] == 422
    assert digits.generate(seeds=1, format="npy")[0] == 200
    text = digits.request(path="/metrics")[2].decode()
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert {"edm_fast_requests", "edm_fast_generate_seconds", "edm_fast_batch_size",
            "edm_fast_queue_depth", "edm_fast_warmup_seconds"} <= names
    assert digits.metric("edm_fast_requests_total", path="/generate", status="422") == before + 1
    assert digits.metric("edm_fast_generate_seconds_count") >= 1
    assert digits.metric("edm_fast_queue_depth") == 0


#----------------------------------------------------------------------------
# Bad input: the right 4xx with a JSON message, and the server keeps serving.

def _json(obj):
    return json.dumps(obj).encode()


BAD = [  # (id, method, path, body, headers, status, words in the message)
    ("malformed-json", "POST", "/generate", b'{"seeds": [1,', {}, 400, "malformed JSON"),
    ("not-utf8", "POST", "/generate", b"\xff\xfe\x00{", {}, 400, "malformed JSON"),
    ("nan", "POST", "/generate", b'{"seeds": 1, "guidance": NaN}', {}, 422, "finite"),
    ("inf", "POST", "/generate", b'{"seeds": 1, "guidance": Infinity}', {}, 422, "finite"),
    ("guidance-1e308", "POST", "/generate", _json({"seeds": 1, "class": 1, "guidance": 1e308}),
     {}, 422, "'guidance'"),
    ("deep-nesting", "POST", "/generate", b"[" * 2000 + b"]" * 2000, {}, 400, ""),
    ("not-an-object", "POST", "/generate", _json([1, 2]), {}, 400, "body"),
    ("no-seeds", "POST", "/generate", _json({"steps": 4}), {}, 400, "'seeds'"),
    ("unknown-field", "POST", "/generate", _json({"seeds": 1, "sede": 2}), {}, 400, "'sede'"),
    ("seeds-float", "POST", "/generate", _json({"seeds": [1.5]}), {}, 400, "'seeds'"),
    ("seeds-bool", "POST", "/generate", _json({"seeds": True}), {}, 400, "'seeds'"),
    ("seeds-decreasing", "POST", "/generate", _json({"seeds": "9-1"}), {}, 400, "decreases"),
    ("steps-string", "POST", "/generate", _json({"seeds": 1, "steps": "4"}), {}, 400, "'steps'"),
    ("class-float", "POST", "/generate", _json({"seeds": 1, "class": 3.0}), {}, 400, "'class'"),
    ("guidance-string", "POST", "/generate", _json({"seeds": 1, "guidance": "2"}), {}, 400,
     "'guidance'"),
    ("steps-zero", "POST", "/generate", _json({"seeds": 1, "steps": 0}), {}, 422, "'steps'"),
    ("steps-257", "POST", "/generate", _json({"seeds": 1, "steps": 257}), {}, 422, "256"),
    ("solver-unknown", "POST", "/generate", _json({"seeds": 1, "solver": "rk9"}), {}, 422,
     "'solver'"),
    ("format-gif", "POST", "/generate", _json({"seeds": 1, "format": "gif"}), {}, 422,
     "'format'"),
    ("class-name", "POST", "/generate", _json({"seeds": 1, "class": "cat"}), {}, 422,
     "unknown class name 'cat'"),
    ("class-10", "POST", "/generate", _json({"seeds": 1, "class": 10}), {}, 422, "unknown class"),
    ("class-count", "POST", "/generate", _json({"seeds": [1, 2], "class": [1]}), {}, 422,
     "entries"),
    ("guided-null-class", "POST", "/generate", _json({"seeds": 1, "guidance": 2.0}), {}, 422,
     "guidance needs a class"),
    ("too-many-seeds", "POST", "/generate", _json({"seeds": list(range(33))}), {}, 422,
     "too many seeds"),
    ("huge-seed-range", "POST", "/generate", _json({"seeds": "0-999999999999"}), {}, 422,
     "too many seeds"),
    ("decreasing-hides-count", "POST", "/generate", _json({"seeds": "0-99,100-0"}), {}, 422,
     "too many seeds"),
    ("empty-seeds", "POST", "/generate", _json({"seeds": []}), {}, 422, "empty"),
    ("negative-seed", "POST", "/generate", _json({"seeds": [-1]}), {}, 422, "2**64"),
    ("seed-2**64", "POST", "/generate", _json({"seeds": [2**64]}), {}, 422, "2**64"),
    # 4 steps of Heun = 7 evaluations; 30 seeds x 7 x 2 (guided) = 420, 30 x 7 = 210 fit 600
    ("over-max-cost", "POST", "/generate", _json({"seeds": "0-29", "steps": 64}), {}, 422,
     "max_cost 600"),
    ("option-not-for-solver", "POST", "/generate", _json({"seeds": 1, "solver": "dpmpp_2m",
                                                          "steps": 300}), {}, 422, "256"),
    ("body-too-large", "POST", "/generate", b" " * 5000, {}, 413, ""),
    ("too-many-headers", "GET", "/healthz", None, {f"x-h{i}": "1" for i in range(120)}, 431,
     "headers"),
    ("wrong-path", "POST", "/nope", _json({"seeds": 1}), {}, 404, "Not Found"),
    ("post-healthz", "POST", "/healthz", _json({}), {}, 405, "Method Not Allowed"),
    ("get-generate", "GET", "/generate", None, {}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_request_gets_4xx_and_server_keeps_serving(digits, case):
    _, method, path, body, headers, want, words = case
    status, _, data = digits.request(method, path, body, headers)
    assert status == want, data
    if want != 413:  # Starlette's body limit answers in plain text
        err = json.loads(data)
        assert err["status"] == want and words in err["error"], err
    status, _, data = digits.generate(seeds=1, format="npy")
    assert status == 200 and npy(data).shape == (1, 1, 16, 16)


def _raw(port, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(data)
        s.settimeout(wait)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def test_stalled_body_gets_408_and_oversized_heads_get_4xx(digits):
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"seeds\""
    reply = _raw(digits.port, head)  # the body stops short: body_timeout_s=0.5
    assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply, reply
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert _raw(digits.port, big).startswith(b"HTTP/1.1 431")  # complete, over 16384 bytes
    with socket.create_connection(("127.0.0.1", digits.port), 10) as s:  # still arriving
        s.sendall(big[:-4])
        s.sendall(b"a" * 20000)
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert digits.request(path="/healthz")[0] == 200


#----------------------------------------------------------------------------
# Deadlines, disconnects, queue limits, shutdown: a toy engine whose batches sleep.

def slow_server(calls, *, delay=1.0, limits=None, **settings):
    """A toy-model server whose batches sleep ``delay`` s at >= 100 steps and fail with seed 13."""
    engine = Engine("toy-gmm", device="cpu", backend="reference", batch_sizes=[1, 2, 4, 8])
    sample = engine.sample

    def slow(served, seeds, labels):
        if 13 in seeds:
            raise RuntimeError("boom")
        calls.append(list(seeds))
        time.sleep(delay if served.plan.num_steps >= 100 else 0.0)
        return sample(served, seeds, labels)

    engine.sample = slow
    settings = {"max_batch": 8, "max_wait_ms": 5, "default_steps": STEPS,
                "max_batch_cost": 10**6, **settings}  # whole batches: one sleep each
    return Running(create_app(engine, ServeSettings(**settings)), limits)


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_deadline_is_504_and_drops_the_queued_work():
    calls = []
    server = slow_server(calls, delay=2.5, request_timeout_s=0.8)  # a 1.7 s margin under load
    try:
        results = {}
        running = threading.Thread(target=lambda: results.setdefault(
            "running", server.generate(seeds=[1], steps=200)))
        running.start()
        assert wait_for(lambda: calls)  # the slow batch runs
        status, _, body = server.generate(seeds="20-25")  # queued behind it
        assert status == 504 and "timed out" in json.loads(body)["error"]
        running.join(timeout=10)
        assert results["running"][0] == 504
        assert server.metric("edm_fast_queue_depth") == 0
        assert wait_for(lambda: server.metric("edm_fast_batch_size_count") == 1)  # slow one
        status, _, body = server.generate(seeds=[2, 3], format="npy")
        assert status == 200 and npy(body).shape == (2, 2)
        assert not any(20 <= s <= 25 for call in calls for s in call)  # never ran
    finally:
        server.stop()


def test_client_that_disconnects_has_its_queued_work_dropped():
    calls = []
    server = slow_server(calls, request_timeout_s=30)
    try:
        running = threading.Thread(target=server.generate, kwargs={"seeds": [1], "steps": 200})
        running.start()
        assert wait_for(lambda: calls)
        with socket.create_connection(("127.0.0.1", server.port), 10) as s:
            body = _json({"seeds": "100-103", "steps": 200})
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert wait_for(lambda: server.metric("edm_fast_queue_depth") == 4)
        assert wait_for(lambda: server.metric("edm_fast_requests_total", status="499") == 1)
        assert server.metric("edm_fast_queue_depth") == 0
        running.join(timeout=10)
        assert server.generate(seeds=5)[0] == 200
        assert not any(s >= 100 for call in calls for s in call)
    finally:
        server.stop()


def test_queue_full_is_503_with_retry_after():
    calls = []
    server = slow_server(calls, request_timeout_s=30, max_queue=8, max_seeds=8)
    try:
        results = {}
        threads = [threading.Thread(target=lambda: results.setdefault(
            "running", server.generate(seeds=[1], steps=200)))]
        threads[0].start()
        assert wait_for(lambda: calls)
        threads.append(threading.Thread(target=lambda: results.setdefault(
            "queued", server.generate(seeds="20-25", steps=200, format="npy"))))
        threads[1].start()
        assert wait_for(lambda: server.metric("edm_fast_queue_depth") == 6)
        status, headers, body = server.generate(seeds="0-3")  # 6 + 4 > 8: busy now
        assert status == 503 and headers["retry-after"] == "1", body
        for t in threads:
            t.join(timeout=20)
        assert results["running"][0] == 200 and npy(results["queued"][2]).shape == (6, 2)
    finally:
        server.stop()


def test_shutdown_answers_requests_in_flight():
    """What SIGTERM does (uvicorn's should_exit): the running batch and the queued request
    are answered, then the server stops and the port closes."""
    calls = []
    server = slow_server(calls, request_timeout_s=30)
    results = {}

    def client(name, seeds):
        results[name] = server.generate(seeds=seeds, steps=200, format="npy")

    threads = [threading.Thread(target=client, args=("running", [1]))]
    threads[0].start()
    assert wait_for(lambda: calls)
    threads.append(threading.Thread(target=client, args=("queued", [2, 3])))
    threads[1].start()
    assert wait_for(lambda: server.metric("edm_fast_queue_depth") == 2)
    server.stop()
    for t in threads:
        t.join(timeout=10)
    assert results["running"][0] == 200 and results["queued"][0] == 200
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), 2).close()


#----------------------------------------------------------------------------
# Fairness: a large request is split into batches interleaved with the others.

def test_large_request_is_interleaved_with_small_ones():
    """Batches (max_batch 4) of a 12-seed request A and a 1-seed request B that arrives while
    A's first batch runs: B runs in the second batch, not after all of A."""
    order, submitted = [], threading.Event()

    def run_batch(plan, seeds, labels):
        order.append(list(seeds))
        assert submitted.wait(10)  # the first batch runs until B has arrived
        return [torch.tensor(float(s)) for s in seeds]

    async def scenario():
        batcher = Batcher(run_batch, max_batch=4, max_wait_ms=0, max_queue=100,
                          max_batch_cost=10**6)
        big = Job(("a",), list(range(12)), [None] * 12, cost=1)
        batcher.submit(big)
        while not order:
            await asyncio.sleep(0.001)
        small = Job(("b",), [100], [None], cost=1)
        batcher.submit(small)
        submitted.set()
        rows = await asyncio.wait_for(asyncio.gather(big.future, small.future), 10)
        await batcher.stop()
        return rows

    big_rows, small_rows = asyncio.run(scenario())
    assert order == [[0, 1, 2, 3], [100], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [float(r) for r in big_rows] == list(range(12)) and float(small_rows[0]) == 100


def test_batch_rows_are_capped_by_max_cost():
    """A batch holds at most max_batch_cost rows x evaluations: 3 seeds of cost 10 under 25
    run as batches of 2 and 1."""
    sizes = []

    async def scenario():
        batcher = Batcher(lambda p, seeds, l: sizes.append(len(seeds)) or seeds, max_batch=8,
                          max_wait_ms=0, max_queue=100, max_batch_cost=25)
        job = Job(("a",), [1, 2, 3], [None] * 3, cost=10)
        batcher.submit(job)
        await asyncio.wait_for(job.future, 10)
        await batcher.stop()

    asyncio.run(scenario())
    assert sizes == [2, 1]


def test_serving_shortens_the_gil_switch_interval_and_restores_it(monkeypatch):
    """While run() serves, the batch worker gets the GIL back quickly between network calls
    (SWITCH_INTERVAL_S); the process's own interval is back when it returns."""
    from edm_fast.serve import server as server_module
    from edm_fast.serve.settings import SWITCH_INTERVAL_S

    seen = []

    class Recorder:
        def run(self, sockets):
            seen.append(sys.getswitchinterval())

    monkeypatch.setattr(server_module, "make_server", lambda *args, **kwargs: Recorder())
    before = sys.getswitchinterval()
    server_module.run(None, None)
    assert before > SWITCH_INTERVAL_S and seen == [pytest.approx(SWITCH_INTERVAL_S)]
    assert sys.getswitchinterval() == pytest.approx(before)


#----------------------------------------------------------------------------
# A reduced-precision network (net_dtype) and autoguidance (a guide model).

def served_npy(engine, settings=None, **body):
    """One /generate answer (npy) of a server over ``engine``, and its /healthz."""
    server = Running(create_app(engine, settings or ServeSettings(max_batch=4,
                                                                  default_steps=STEPS)))
    try:
        status, _, data = server.generate(format="npy", **body)
        assert status == 200, data
        return npy(data), json.loads(server.request(path="/healthz")[2])
    finally:
        server.stop()


def test_bf16_network_answers_equal_the_sampler_in_bf16():
    """--net-dtype bf16: a served answer equals Sampler(net_dtype="bf16") seed for seed.

    Tolerance REL_TOL, as for float32: both runs evaluate the same bf16 copy of the network on
    the same float32 state, and the Sampler runs at the server's bucket (4 rows), so the same
    kernels run on the same shapes (bit-identical where measured); only the batch's company
    could change rounding. That is far below the bf16-vs-fp32 gap (~1.5e-2 here), which the
    test also checks, so the network did run in bf16."""
    engine = Engine("default", device="cpu", backend="reference", batch_sizes=[1, 2, 4],
                    net_dtype="bf16")
    assert engine.net_dtype == torch.bfloat16
    got, health = served_npy(engine, seeds="3-5", **{"class": [1, 2, 9]})
    assert health["net_dtype"] == "bf16" and health["guidance"] == "classifier-free"
    labels = torch.tensor([1, 2, 9])
    want = Sampler("default", num_steps=STEPS, batch_size=4, device="cpu", backend="reference",
                   net_dtype="bf16")(seeds=[3, 4, 5], class_labels=labels)
    assert_close(got, want)
    fp32 = Sampler("default", num_steps=STEPS, batch_size=4, device="cpu",
                   backend="reference")(seeds=[3, 4, 5], class_labels=labels).numpy()
    assert np.linalg.norm(got - fp32) / np.linalg.norm(fp32) > 1e-3


def test_net_dtype_auto_says_what_it_chose():
    with pytest.warns(UserWarning, match="net_dtype auto: "):
        engine = Engine("default", device="cpu", backend="reference", batch_sizes=[1],
                        net_dtype="auto")
    assert engine.net_dtype in (torch.float32, torch.bfloat16)


def test_autoguided_answers_equal_the_sampler_and_cost_twice():
    """With a guide, a guided request is D_g + w (D - D_g), equal to Sampler(guide=,
    guidance=w) seed for seed (REL_TOL: float32, batch rounding only), with or without a class;
    it costs two rows per evaluation, as classifier-free guidance does."""
    from edm_fast.io.models import load_denoiser

    main = load_denoiser("default")
    guide = perturbed(main)
    engine = Engine(main, device="cpu", backend="reference", batch_sizes=[1, 2, 4], guide=guide)
    assert set(engine.eval_seconds) == set(engine.guide_seconds) == {1, 2, 4}  # no 2N rows
    plain, guided = engine.plan("heun", STEPS, None), engine.plan("heun", STEPS, 2.0)
    assert guided.cost == 2 * plain.cost == 14  # 4 Heun steps: 7 evaluations
    settings = ServeSettings(max_batch=4, default_steps=STEPS, max_cost=100)
    got, health = served_npy(engine, settings, seeds="3-5", guidance=2.0,
                             **{"class": [1, None, 9]})
    assert health["guidance"] == "autoguidance" and health["net_dtype"] == "model"
    sampler = Sampler(main, guide=guide, guidance=2.0, num_steps=STEPS, batch_size=4,
                      device="cpu", backend="reference")
    assert_close(got[[0, 2]], sampler(seeds=[3, 5], class_labels=torch.tensor([1, 9])))
    assert_close(got[1], sampler(seeds=[4])[0])  # no class: zero labels, as the Sampler's
    server = Running(create_app(engine, settings))
    try:  # 8 seeds x 14 rows = 112 > 100; unguided 8 x 7 = 56 fits
        status, _, body = server.generate(seeds="0-7", guidance=2.0, format="npy")
        assert status == 422 and "x 14 denoiser rows" in json.loads(body)["error"]
    finally:
        server.stop()


def test_unconditional_model_is_autoguided():
    """An unconditional model has no classifier-free guidance, but a guide guides it: the
    exact ring mixture guided by a wider ring, served, equals Sampler(guide=)."""
    from edm_fast.nets.toy import ring_mixture_2d

    main, guide = ring_mixture_2d().as_denoiser(), ring_mixture_2d(std=0.15).as_denoiser()
    engine = Engine(main, device="cpu", backend="reference", batch_sizes=[1, 2, 4], guide=guide)
    got, health = served_npy(engine, seeds="0-3", guidance=3.0)
    assert health["guidance"] == "autoguidance"
    want = Sampler(main, guide=guide, guidance=3.0, num_steps=STEPS, batch_size=4,
                   device="cpu", backend="reference")(seeds=range(4))
    assert_close(got, want)
    with pytest.raises(ValueError, match="guidance needs a class-conditional model, or a guide"):
        Engine(main, device="cpu", backend="reference", batch_sizes=[1]).plan("heun", 4, 3.0)


@pytest.mark.parametrize("args, words", [
    (["--ckpt", "toy-gmm", "--net-dtype", "bf16"], "needs an edm_fast Denoiser"),
    (["--backend", "onnx", "--net-dtype", "bf16"], "no bf16 convolutions"),
    (["--guide-ckpt", "toy-gmm"], "guide model takes label_dim=0 but the main model takes 10"),
    (["--ckpt", "toy-gmm", "--guide-ckpt", "toy-gmm1d"], "guide model makes samples of shape"),
])
def test_cli_serve_refuses_a_precision_or_guide_it_cannot_run_in_one_line(args, words, capsys):
    from edm_fast.cli.main import main

    rc = main(["serve", "--device", "cpu", "--port", "0", "--batch-sizes", "1", "--max-batch",
               "1", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err


#----------------------------------------------------------------------------
# The fast evaluator, and the command line.

def test_auto_engine_on_the_cpu_is_onnx_and_equals_the_sampler():
    pytest.importorskip("onnxruntime")
    engine = Engine("default", device="cpu", backend="auto", batch_sizes=[1, 2, 4])
    assert engine.backend_name == "onnx" and set(engine.eval_seconds) == {1, 2, 4, 8}
    # ONNX Runtime takes any batch: no padding to a bucket, only to a multiple of 8 above 8
    assert [engine.rows_for(n) for n in (3, 8, 9, 17, 64)] == [3, 8, 16, 24, 64]
    engine.backend_name = "compiled"  # static shapes: the next bucket (beyond the last: n)
    assert [engine.rows_for(n) for n in (1, 3, 4, 5)] == [1, 4, 4, 5]
    engine.backend_name = "onnx"
    reference = Sampler("default", num_steps=STEPS, batch_size=4, device="cpu",
                        backend="reference")
    seeds, labels = [3, 4, 5], [1, None, 9]
    got = engine.sample(engine.plan("heun", STEPS, None), seeds, labels)
    want = reference(seeds=seeds, class_labels=torch.tensor([1, 0, 9])).clone()
    want[1] = reference(seeds=[4])[0]  # None: zero labels
    # ONNX Runtime's float32 kernels differ from PyTorch's in rounding (export check: 1e-4)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("option, value, words", [
    ("--max-wait-ms", "nan", "must be a finite number"),
    ("--timeout", "inf", "must be a finite number"),
    ("--max-cost", "0", "must be in [1,"),
    ("--max-seeds", "9000", "over max_queue"),
    ("--graceful-timeout", "-1", "graceful_timeout_s must be"),
])
def test_cli_serve_refuses_bad_options_in_one_line(option, value, words, capsys):
    from edm_fast.cli.main import main

    rc = main(["serve", "--ckpt", "toy-gmm", "--device", "cpu", "--port", "0", option, value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err


def test_cli_serve_stops_cleanly_on_sigterm():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edm_fast", "serve", "--ckpt", "toy-gmm",
                             "--port", "0", "--device", "cpu", "--steps", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # "edm-fast serve: toy-gmm on http://127.0.0.1:PORT ..."
        port = int(next(w for w in line.split() if w.startswith("http://")).rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/generate", body=_json({"seeds": [1, 2], "format": "json"}))
        assert len(json.loads(conn.getresponse().read())["samples"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), 2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_failing_batch_is_500_and_a_dead_batcher_makes_healthz_503():
    server = slow_server([], request_timeout_s=10)
    try:
        status, _, body = server.generate(seeds=[13])
        assert status == 500 and "boom" in json.loads(body)["error"]
        assert server.generate(seeds=[1])[0] == 200  # one failed batch, not the server
        assert server.request(path="/healthz")[0] == 200
        server.server.config.app.state.batcher._pending = None  # a bug: the batcher stops
        status, _, body = server.generate(seeds=[2])
        assert status == 500 and "batcher stopped" in json.loads(body)["error"]
        status, _, body = server.request(path="/healthz")
        assert status == 503 and "batcher stopped" in json.loads(body)["error"]
    finally:
        server.stop()


def test_bodies_without_length_or_chunked(digits):
    with socket.create_connection(("127.0.0.1", digits.port), 10) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")  # no body: malformed JSON
    body = b'{"seeds": 3, "format": "npy"}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reply = _raw(digits.port, b"POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
