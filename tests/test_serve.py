"""edm_fast.serve: batching through HTTP, bad requests, deadlines, disconnects, shutdown.

Every server here listens on 127.0.0.1 on an ephemeral port and every client call has a timeout.
Images come from the bundled digits model at 4 steps; the deadline and disconnect tests wrap
the exact toy model in a sampler that sleeps, so their timing is under the test's control.
"""

from __future__ import annotations

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
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from edm_fast.images import to_uint8
from edm_fast.sampler import Sampler
from edm_fast.serve import InferenceServer, make_sampler_factory

STEPS = 4
TOL = 1e-4  # batch-size-dependent float rounding is ~1e-5; a wrong seed or class is ~1


def request(url, method="GET", path="/generate", body=None, headers=None, timeout=30):
    """(status, headers dict, body bytes) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def generate(url, **body):
    return request(url, "POST", body=body)


def metrics(url) -> dict:
    return json.loads(request(url, path="/metrics")[2])


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


@pytest.fixture(scope="module")
def digits_server():
    factory = make_sampler_factory("default", device="cpu", backend="reference")
    server = InferenceServer(factory, max_batch=16, max_wait_ms=200, max_seeds=32,
                             default_steps=STEPS, request_timeout_s=60).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def reference():
    """seed, class -> the image of Sampler(...)(seeds=[seed]) run alone (batch size 1)."""
    sampler = Sampler("default", num_steps=STEPS, batch_size=1, device="cpu",
                      backend="reference")
    return lambda seed, c=None: sampler(seeds=[seed], class_labels=c)[0].numpy()


#----------------------------------------------------------------------------
# Batching: concurrent requests form batches, and each gets exactly its seed's image.

def test_concurrent_requests_are_batched_and_match_the_sampler(digits_server, reference):
    before = metrics(digits_server.url)["batches"]
    jobs = [(seed, seed % 10 if seed % 3 else None) for seed in range(12)]
    barrier = threading.Barrier(len(jobs))
    results = {}

    def client(seed, c):
        barrier.wait(timeout=10)
        results[seed] = generate(digits_server.url, seeds=[seed], **{"class": c},
                                 steps=STEPS, format="npy")

    threads = [threading.Thread(target=client, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for seed, c in jobs:
        status, headers, body = results[seed]
        assert status == 200, body
        assert headers["X-Seeds"] == str(seed)
        got = npy(body)
        assert got.shape == (1, 1, 16, 16) and got.dtype == np.float32
        np.testing.assert_allclose(got[0], reference(seed, c), rtol=0, atol=TOL)
    m = metrics(digits_server.url)
    assert m["batches"] - before < len(jobs), m  # fewer sampler calls than requests
    assert max(int(k) for k in m["batch_size_histogram"]) > 1, m
    assert m["queue_depth"] == 0


def test_png_and_multi_seed_formats_match_the_sampler(digits_server, reference):
    status, headers, body = generate(digits_server.url, seeds=5, **{"class": 3})
    assert status == 200 and headers["Content-Type"] == "image/png"
    png = np.asarray(Image.open(io.BytesIO(body)))
    want = to_uint8(torch.from_numpy(reference(5, 3))[None])[0, ..., 0]
    assert png.shape == (16, 16) and np.abs(png.astype(int) - want).max() <= 1

    status, _, body = generate(digits_server.url, seeds="7-9", **{"class": [1, None, "2"]})
    assert status == 200  # "2": a class name the checkpoint stores, as in `sample --class`
    out = json.loads(body)
    assert out["seeds"] == [7, 8, 9] and out["classes"] == [1, None, 2] and out["steps"] == STEPS
    for b64, seed, c in zip(out["images"], out["seeds"], out["classes"]):
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
        want = to_uint8(torch.from_numpy(reference(seed, c))[None])[0, ..., 0]
        assert np.abs(img.astype(int) - want).max() <= 1

    status, _, body = generate(digits_server.url, seeds=[4, 4], format="json")
    samples = np.asarray(json.loads(body)["samples"], dtype=np.float32)
    assert status == 200 and samples.shape == (2, 1, 16, 16)
    np.testing.assert_allclose(samples[1], reference(4), atol=TOL)


def test_healthz_reports_the_model(digits_server):
    status, _, body = request(digits_server.url, path="/healthz")
    info = json.loads(body)
    assert status == 200 and info["status"] == "ok"
    assert info["model"]["shape"] == [1, 16, 16] and info["model"]["label_dim"] == 10
    assert info["model"]["class_names"] == [str(c) for c in range(10)]
    assert info["limits"]["max_batch"] == 16 and info["limits"]["default_steps"] == STEPS
    status, _, body = request(digits_server.url, path="/healthz?probe=1")  # a query is ignored
    assert status == 200 and json.loads(body)["status"] == "ok"


#----------------------------------------------------------------------------
# Bad requests: the right 4xx with a JSON message, and the server keeps serving.

def _json_body(obj):
    return json.dumps(obj).encode()


BAD_REQUESTS = [  # (id, method, path, body bytes, extra headers, status, words in the message)
    ("malformed-json", "POST", "/generate", b'{"seeds": [1,', {}, 400, "malformed JSON"),
    ("not-utf8", "POST", "/generate", b"\xff\xfe\x00{", {}, 400, "malformed JSON"),
    ("deep-nesting", "POST", "/generate", b"[" * 30000 + b"]" * 30000, {}, 400, "malformed"),
    ("not-an-object", "POST", "/generate", _json_body([1, 2]), {}, 400, "JSON object"),
    ("no-seeds", "POST", "/generate", _json_body({"steps": 4}), {}, 400, "missing 'seeds'"),
    ("unknown-field", "POST", "/generate", _json_body({"seeds": 1, "sede": 2}), {}, 400,
     "unknown field"),
    ("seeds-float", "POST", "/generate", _json_body({"seeds": [1.5]}), {}, 400, "'seeds'"),
    ("seeds-bool", "POST", "/generate", _json_body({"seeds": True}), {}, 400, "'seeds'"),
    ("seeds-bad-range", "POST", "/generate", _json_body({"seeds": "9-1"}), {}, 400, "seed"),
    ("steps-string", "POST", "/generate", _json_body({"seeds": 1, "steps": "4"}), {}, 400,
     "'steps'"),
    ("steps-bool", "POST", "/generate", _json_body({"seeds": 1, "steps": True}), {}, 400,
     "'steps'"),
    ("class-float", "POST", "/generate", _json_body({"seeds": 1, "class": 3.0}), {}, 400,
     "'class'"),
    ("class-unknown-name", "POST", "/generate", _json_body({"seeds": 1, "class": "cat"}), {},
     422, "unknown class name 'cat'"),
    ("format-type", "POST", "/generate", _json_body({"seeds": 1, "format": 3}), {}, 400,
     "'format'"),
    ("steps-zero", "POST", "/generate", _json_body({"seeds": 1, "steps": 0}), {}, 422,
     "[1, 256]"),
    ("steps-257", "POST", "/generate", _json_body({"seeds": 1, "steps": 257}), {}, 422,
     "[1, 256]"),
    ("unknown-class", "POST", "/generate", _json_body({"seeds": 1, "class": 10}), {}, 422,
     "unknown class 10"),
    ("negative-class", "POST", "/generate", _json_body({"seeds": 1, "class": -1}), {}, 422,
     "unknown class"),
    ("class-count", "POST", "/generate", _json_body({"seeds": [1, 2], "class": [1]}), {}, 422,
     "entries"),
    ("too-many-seeds", "POST", "/generate", _json_body({"seeds": list(range(33))}), {}, 422,
     "too many seeds"),
    ("huge-seed-range", "POST", "/generate", _json_body({"seeds": "0-999999999999"}), {}, 422,
     "too many seeds"),
    # a decreasing part must not cancel the count of the others ('0-99' is 100 > 32 seeds)
    ("decreasing-range-hides-count", "POST", "/generate", _json_body({"seeds": "0-99,100-0"}),
     {}, 422, "too many seeds"),
    ("empty-seeds", "POST", "/generate", _json_body({"seeds": []}), {}, 422, "empty"),
    ("negative-seed", "POST", "/generate", _json_body({"seeds": [-1]}), {}, 422, "2**64"),
    ("format-gif", "POST", "/generate", _json_body({"seeds": 1, "format": "gif"}), {}, 422,
     "'format'"),
    ("body-too-large", "POST", "/generate", b" " * 70000, {}, 413, "over the limit"),
    ("no-length", "POST", "/generate", None, {}, 411, "Content-Length"),
    ("chunked", "POST", "/generate", None, {"Transfer-Encoding": "chunked"}, 411, "chunked"),
    ("bad-length", "POST", "/generate", None, {"Content-Length": "abc"}, 400, "Content-Length"),
    ("wrong-path", "POST", "/nope", _json_body({"seeds": 1}), {}, 404, "no such endpoint"),
    ("post-healthz", "POST", "/healthz", _json_body({}), {}, 405, "use GET /healthz"),
    ("get-generate", "GET", "/generate", None, {}, 405, "POST"),
    ("unknown-get", "GET", "/nope", None, {}, 404, "no such endpoint"),
    ("put", "PUT", "/generate", _json_body({"seeds": 1}), {}, 405, "use POST /generate"),
    ("delete", "DELETE", "/metrics", None, {}, 405, "use GET /metrics"),
    ("options", "OPTIONS", "/generate", None, {}, 501, "Unsupported method"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_4xx_and_server_keeps_serving(digits_server, case):
    _, method, path, body, headers, want, words = case
    if body is None and method == "POST" and "Content-Length" not in headers:
        status, resp_headers, data = _raw_request(digits_server.url, method, path, headers)
    else:
        status, resp_headers, data = request(digits_server.url, method, path, body, headers)
    assert status == want, data
    assert resp_headers["Content-Type"] == "application/json"
    err = json.loads(data)
    assert err["status"] == want and words in err["error"], err
    if want == 405:
        assert resp_headers["Allow"] in ("GET", "POST")
    status, _, data = generate(digits_server.url, seeds=1, format="npy")
    assert status == 200 and npy(data).shape == (1, 1, 16, 16)


def _raw_request(url, method, path, headers):
    """A request with no Content-Length at all (http.client would add one)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((urlsplit(url).hostname, urlsplit(url).port), 10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()


def test_errors_on_a_keep_alive_connection_do_not_break_it(digits_server):
    url = urlsplit(digits_server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        for body, want in [(b"{bad", 400), (_json_body({"seeds": 2, "format": "npy"}), 200),
                           (_json_body({"seeds": 1, "steps": 999}), 422),
                           (_json_body({"seeds": 3, "format": "npy"}), 200)]:
            conn.request("POST", "/generate", body=body)
            resp = conn.getresponse()
            assert resp.status == want
            resp.read()
    finally:
        conn.close()


#----------------------------------------------------------------------------
# Deadlines and disconnects: a sampler that sleeps when steps >= 100.

class SlowSampler:
    """A real (toy) Sampler that records its calls and sleeps ``delay`` s before each."""

    def __init__(self, inner, delay, calls):
        self.inner, self.delay, self.calls = inner, delay, calls

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, seeds, class_labels=None):
        self.calls.append(list(seeds))
        time.sleep(self.delay)
        return self.inner(seeds=seeds, class_labels=class_labels)


def slow_server(calls, *, delay=1.2, **kwargs):
    toy = make_sampler_factory("toy-gmm", device="cpu", backend="reference")

    def factory(steps, batch_size):
        return SlowSampler(toy(steps, batch_size), delay if steps >= 100 else 0.0, calls)

    return InferenceServer(factory, max_batch=8, max_wait_ms=5, default_steps=STEPS,
                           **kwargs).start()


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_timed_out_request_gets_504_and_its_queued_work_is_dropped():
    calls = []
    server = slow_server(calls, request_timeout_s=0.4, max_queue=16, max_seeds=64)
    try:
        results = {}

        def client(name, **body):
            results[name] = generate(server.url, format="npy", **body)

        running = threading.Thread(target=client, args=("running",),
                                   kwargs={"seeds": [1], "steps": 200})
        running.start()
        assert wait_for(lambda: calls)  # the slow batch has started
        client("queued", seeds="100-109", steps=200)  # waits behind it, then times out
        running.join(timeout=10)
        for name in ("running", "queued"):
            status, _, body = results[name]
            assert status == 504 and "timed out" in json.loads(body)["error"], name
        m = metrics(server.url)
        assert m["timeouts"] == 2 and m["queue_depth"] == 0 and m["dropped_items"] >= 10
        assert wait_for(lambda: metrics(server.url)["batches"] >= 1)  # slow batch finished
        status, _, body = generate(server.url, seeds=[2, 3], format="npy")
        assert status == 200 and npy(body).shape == (2, 2)
        assert all(s < 100 for call in calls for s in call)  # the queued seeds never ran
    finally:
        server.shutdown()


def test_full_queue_is_503_to_retry_and_a_request_over_the_queue_is_422():
    """503 + Retry-After only when the request would fit an emptier queue; max_seeds above
    max_queue is lowered to it, so a request that can never be queued gets 422 at once."""
    calls = []
    server = slow_server(calls, request_timeout_s=30, max_queue=16, max_seeds=64)
    try:
        assert server.max_seeds == 16
        info = json.loads(request(server.url, path="/healthz")[2])
        assert info["limits"]["max_seeds"] == 16 and info["limits"]["max_queue"] == 16
        results = {}

        def client(name, **body):
            results[name] = generate(server.url, format="npy", **body)

        threads = [threading.Thread(target=client, args=("running",),
                                    kwargs={"seeds": [1], "steps": 200})]
        threads[0].start()
        assert wait_for(lambda: calls)  # the slow batch runs; the queue is empty
        threads.append(threading.Thread(target=client, args=("queued",),
                                        kwargs={"seeds": "100-109"}))
        threads[1].start()
        assert wait_for(lambda: metrics(server.url)["queue_depth"] == 10)
        for seeds in ("0-6", "0-15"):  # 10 + 7 > 16, 10 + 16 > 16: busy now, fits later
            status, headers, body = generate(server.url, seeds=seeds)
            assert status == 503 and headers["Retry-After"] == "1", body
            assert "busy" in json.loads(body)["error"]
        status, headers, body = generate(server.url, seeds="0-16")  # 17 > max_queue: never
        assert status == 422 and "Retry-After" not in headers, body
        assert "too many seeds" in json.loads(body)["error"]
        for t in threads:
            t.join(timeout=20)
        assert results["running"][0] == 200 and results["queued"][0] == 200
        assert npy(results["queued"][2]).shape == (10, 2)
    finally:
        server.shutdown()


def test_client_disconnect_mid_request_does_not_block_others():
    calls = []
    server = slow_server(calls, request_timeout_s=30)
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    try:
        body = _json_body({"seeds": [1], "steps": 200})
        running = socket.create_connection((host, port), 10)  # its batch runs, then it leaves
        running.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert wait_for(lambda: calls)
        body = _json_body({"seeds": "100-109", "steps": 200})
        queued = socket.create_connection((host, port), 10)  # queued behind it, then it leaves
        queued.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: "
                       + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert wait_for(lambda: metrics(server.url)["queue_depth"] == 10)
        partial = socket.create_connection((host, port), 10)  # leaves while sending its body
        partial.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        for s in (queued, partial, running):
            s.close()
        status, _, data = generate(server.url, seeds=[5], format="npy")
        assert status == 200 and npy(data).shape == (1, 2)
        assert wait_for(lambda: metrics(server.url)["client_disconnects"] >= 2)
        m = metrics(server.url)
        assert m["queue_depth"] == 0 and m["dropped_items"] >= 10
        assert wait_for(lambda: metrics(server.url)["client_disconnects"] == 3)
        assert all(s < 100 for call in calls for s in call)
    finally:
        server.shutdown()


#----------------------------------------------------------------------------
# Limits checked at start-up, and a dispatcher that dies.

def test_seed_string_is_counted_before_it_is_expanded(monkeypatch):
    """'0-9999999,10000000-0' is 20000001 seeds, not 1: refused (422) without expanding."""
    import edm_fast.noise
    from edm_fast.serve import HTTPError, _seed_spec_count, parse_generate

    def no_expanding(spec):
        raise AssertionError(f"parse_seeds({spec!r}) expanded an over-limit seed string")

    monkeypatch.setattr(edm_fast.noise, "parse_seeds", no_expanding)
    for spec in ("0-9999999,10000000-0", "0-99,100-0", "5--3,0-63", "0-999999999999"):
        with pytest.raises(HTTPError) as info:
            parse_generate({"seeds": spec}, label_dim=0, image=False, max_seeds=64,
                           default_steps=STEPS)
        assert info.value.status == 422 and "too many seeds" in info.value.message, spec
    assert _seed_spec_count("0-9999999,10000000-0") == 20_000_001
    assert _seed_spec_count("9-1") == 9 and _seed_spec_count("0-7,9,,") == 9


@pytest.mark.parametrize("kwargs", [
    {"max_wait_ms": float("inf")}, {"max_wait_ms": float("nan")}, {"max_wait_ms": 9e12},
    {"max_wait_ms": 60001}, {"max_wait_ms": -1},
    {"request_timeout_s": float("nan")}, {"request_timeout_s": float("inf")},
    {"request_timeout_s": 0}, {"socket_timeout_s": float("nan")},
    {"socket_timeout_s": float("inf")},
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_non_finite_or_absurd_limits_are_refused_at_construction(kwargs):
    def factory(steps, batch_size):
        raise AssertionError("the model must not be loaded for a bad limit")

    with pytest.raises(ValueError, match=next(iter(kwargs))):
        InferenceServer(factory, **kwargs)


@pytest.mark.parametrize("option, value", [
    ("--max-wait-ms", "inf"), ("--max-wait-ms", "nan"), ("--max-wait-ms", "9e12"),
    ("--timeout", "nan"), ("--timeout", "inf"), ("--timeout", "-1"),
])
def test_cli_serve_refuses_bad_float_options_in_one_line(option, value, monkeypatch, capsys):
    import edm_fast.serve
    from edm_fast.cli import main

    def started(server):
        raise AssertionError(f"the server started with {option} {value}")

    monkeypatch.setattr(edm_fast.serve, "run_until_signal", started)
    rc = main(["serve", "--ckpt", "toy-gmm", "--device", "cpu", "--port", "0",
               option, value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"edm-fast serve: error: {option} must be"), err
    assert err.endswith(f"got {float(value):g}"), err


def test_dead_dispatcher_fails_pending_requests_and_healthz():
    """A bug that kills the dispatcher thread: the waiting request gets 500 at once (not a 504
    after its deadline), /healthz says 503 with the error, later requests get 500."""
    server = slow_server([], request_timeout_s=8)
    try:
        def broken(steps):
            raise RuntimeError("boom")

        server.dispatcher._take = broken  # raised in the dispatcher thread, under its lock
        start = time.monotonic()
        status, _, body = generate(server.url, seeds=[1, 2], format="npy")
        assert status == 500 and "boom" in json.loads(body)["error"], body
        assert time.monotonic() - start < 4  # answered, not left to time out
        status, _, body = request(server.url, path="/healthz")
        info = json.loads(body)
        assert status == 503 and info["status"] == 503 and "boom" in info["error"], info
        assert info["model"]["shape"] == [2]
        status, _, body = generate(server.url, seeds=3, format="npy")
        assert status == 500 and "dispatcher" in json.loads(body)["error"]
        m = metrics(server.url)
        assert m["queue_depth"] == 0 and m["responses"]["500"] == 2
    finally:
        start = time.monotonic()
        server.shutdown()
        assert time.monotonic() - start < 5


#----------------------------------------------------------------------------
# Shutdown: pending requests are answered, threads joined, the port closed.

def test_shutdown_answers_pending_joins_threads_and_closes_the_port():
    threads_before = set(threading.enumerate())
    calls = []
    server = slow_server(calls, request_timeout_s=30)
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    idle = http.client.HTTPConnection(host, port, timeout=10)  # an idle keep-alive connection
    idle.request("GET", "/healthz")
    assert idle.getresponse().read()
    results = {}

    def client(name, seeds):
        results[name] = generate(server.url, seeds=seeds, steps=200, format="npy")

    clients = [threading.Thread(target=client, args=("running", [1]))]
    clients[0].start()
    assert wait_for(lambda: calls)
    clients.append(threading.Thread(target=client, args=("queued", [2])))
    clients[1].start()
    assert wait_for(lambda: metrics(server.url)["queue_depth"] == 1)
    start = time.monotonic()
    server.shutdown()
    assert time.monotonic() - start < 5  # the idle connection did not hold it up
    for t in clients:
        t.join(timeout=10)
    assert results["running"][0] == 200  # the batch in progress finished
    assert results["queued"][0] == 503 and b"shut down" in results["queued"][2]
    assert set(threading.enumerate()) <= threads_before
    with pytest.raises(OSError):
        socket.create_connection((host, port), 2).close()
    idle.close()


def test_cli_serve_stops_cleanly_on_sigterm():
    script = ("import argparse, sys\n"
              "from edm_fast.cli_serve import add_serve_command\n"
              "p = argparse.ArgumentParser(); sub = p.add_subparsers()\n"
              "add_serve_command(sub, argparse.HelpFormatter)\n"
              "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, "serve", "--ckpt", "toy-gmm",
                             "--port", "0", "--device", "cpu", "--steps", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # "edm-fast serve: toy-gmm on http://127.0.0.1:PORT ..."
        url = next(w for w in line.split() if w.startswith("http://"))
        status, _, body = generate(url, seeds=[1, 2], format="json")
        assert status == 200 and len(json.loads(body)["samples"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
        with pytest.raises(OSError):
            socket.create_connection((urlsplit(url).hostname, urlsplit(url).port), 2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("latencies_ms, want", [
    (list(range(1, 11)), {"p50": 5, "p90": 9, "p99": 10}),   # ceil(q n / 100)-th of 1..10
    (list(range(1, 101)), {"p50": 50, "p90": 90, "p99": 99}),
    ([7], {"p50": 7, "p90": 7, "p99": 7}),
    ([4, 1, 3, 2], {"p50": 2, "p90": 4, "p99": 4}),          # recorded out of order
])
def test_metrics_latency_percentiles_are_nearest_rank(latencies_ms, want):
    """GET /metrics' p50/p90/p99: nearest-rank percentiles of the recorded latencies (the
    values a user would count off a sorted list), and the count."""
    from edm_fast.serve import Metrics

    m = Metrics()
    assert m.snapshot()["latency_ms"] == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "count": 0}
    for ms in latencies_ms:
        m.latency(ms / 1e3)
    got = m.snapshot()["latency_ms"]
    assert got.pop("count") == len(latencies_ms)
    assert got == pytest.approx(want, abs=1e-9)
