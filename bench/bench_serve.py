"""Load test of ``edm-fast serve``: throughput and latency at 8 / 32 / 128 clients, batching on
vs off, against the previous http.server-based server (from git) in the same run, RSS, and the
latency of a small request while a maximal one runs (fairness).

    OMP_NUM_THREADS=1 python bench/bench_serve.py                   # CPU, bounded (~5 min)
    OMP_NUM_THREADS=1 python bench/bench_serve.py --ray             # also 2 Ray Serve replicas

Each server runs in a subprocess on 127.0.0.1 (an ephemeral port; nothing else is contacted);
its RSS is read from /proc before and after its runs. Each run: ``clients`` threads, each on
its own keep-alive connection, send one-seed PNG requests (seed k, class k mod 10) until
``--requests`` have been sent or ``--time-limit`` seconds have passed. A warm-up round of one
request per client is not counted. Every response is compared with seed k's image from a
reference Sampler; more than one level off counts as a mismatch. The previous server
(``--baseline-rev``, default: the parent of the commit that deleted edm_fast/serve.py) is
loaded from git into the subprocess as it was. Fairness: the latency of a one-seed request
alone (median of 5) and while a request of max_cost ({"seeds": "0-63", "steps": 256}) runs,
against the target "solo + one batch" (the batch time from the server's /metrics).
The tables are appended to bench/RESULTS.md; the exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from results import append_results, command_line

LEGACY = """
import signal, sys, importlib.util, threading, edm_fast
spec = importlib.util.spec_from_file_location("edm_fast._legacy_serve", sys.argv[1])
legacy = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(legacy)
factory = legacy.make_sampler_factory("default", device="cpu", backend="auto")
server = legacy.InferenceServer(factory, max_batch=int(sys.argv[2]), max_wait_ms=10,
                                default_steps=int(sys.argv[3]), request_timeout_s=120)
server.start()
print(f"edm-fast serve: legacy on {server.url}", flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
server.shutdown()
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="Heun steps per image (2N-1 NFE)")
    p.add_argument("--clients", default="8,32,128", help="client counts of the batching runs")
    p.add_argument("--requests", type=int, default=256, help="requests per run (one seed each)")
    p.add_argument("--time-limit", type=float, default=60.0, help="hard limit per run, seconds")
    p.add_argument("--baseline-rev", default=None, help="git revision of the previous server")
    p.add_argument("--ray", action="store_true", help="also run 2 Ray Serve replicas")
    p.add_argument("--no-append", action="store_true", help="do not write bench/RESULTS.md")
    return p.parse_args(argv)


class Server:
    """A server subprocess; ``port`` from its first output line."""

    def __init__(self, argv, env=None):
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env, cwd=ROOT)
        start = time.perf_counter()
        line = ""
        while "edm-fast serve:" not in line:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the server {argv} exited before serving")
        self.startup = time.perf_counter() - start
        url = next(w for w in line.split() if w.startswith("http://"))
        self.port = int(url.rsplit(":", 1)[1])
        self.rss_start = self.rss()

    def rss(self) -> float:
        """RSS in MiB of the server and its children (Ray: the driver only)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def stop(self):
        self.rss_end = self.rss()
        self.proc.terminate()
        self.proc.wait(timeout=120)


def new_server(max_batch, steps, ray=False):
    argv = [sys.executable, "-m", "edm_fast", "serve", "--port", "0", "--device", "cpu",
            "--steps", str(steps), "--max-batch", str(max_batch), "--timeout", "120"]
    if ray:
        argv += ["--ray", "--replicas", "2", "--replica-cpus", "0.5", "--port", "8765"]
    server = Server(argv)
    server.one_engine = not ray  # behind Ray's proxy, /metrics is one replica's
    return server


def legacy_server(rev, max_batch, steps):
    text = subprocess.run(["git", "show", f"{rev}:edm_fast/serve.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "serve.py"
    path.write_text(text)
    return Server([sys.executable, "-c", LEGACY, str(path), str(max_batch), str(steps)])


def post(conn, body):
    conn.request("POST", "/generate", body=json.dumps(body).encode())
    resp = conn.getresponse()
    return resp.status, resp.read()


def load(port, clients, requests, time_limit, seed_base):
    """(records (seed, status, body, seconds), wall seconds)."""
    counter, lock, records = itertools.count(), threading.Lock(), []
    deadline = time.monotonic() + time_limit

    def client():
        conn = None
        while (k := next(counter)) < requests and time.monotonic() < deadline:
            seed = seed_base + k
            start = time.perf_counter()
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=time_limit)
                status, data = post(conn, {"seeds": [seed], "class": seed % 10})
            except (OSError, http.client.HTTPException) as exc:
                status, data, conn = None, repr(exc).encode(), None
            with lock:
                records.append((seed, status, data, time.perf_counter() - start))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=time_limit + 30)
    return records, time.perf_counter() - start


def reference_images(seeds, steps):
    import torch

    from edm_fast.io.samples import to_uint8
    from edm_fast.sampling.sampler import Sampler

    torch.set_grad_enabled(False)
    sampler = Sampler("default", num_steps=steps, batch_size=64, device="cpu",
                      backend="reference")
    out = {}
    for lo in range(0, len(seeds), 64):
        part = seeds[lo:lo + 64]
        out.update(zip(part, to_uint8(sampler(seeds=part, class_labels=[s % 10 for s in part]))))
    return out


def run(name, server, clients, args, refs, seed_base):
    from PIL import Image

    load(server.port, clients, clients, args.time_limit, 0)  # warm-up, not counted
    # (seeds, batches) and (seconds, batches) of the engine; None: no Prometheus /metrics of one
    # engine (the previous server; Ray's replicas)
    sizes = batch_sizes(server.port) if getattr(server, "one_engine", True) else None
    counted = sizes is not None
    before = (sizes, batch_seconds(server.port)) if counted else None
    records, wall = load(server.port, clients, args.requests, args.time_limit, seed_base)
    after = (batch_sizes(server.port), batch_seconds(server.port)) if counted else None
    ok = [r for r in records if r[1] == 200]
    mismatch = 0
    for seed, _, data, _ in ok:
        got = np.asarray(Image.open(io.BytesIO(data))).astype(int)
        mismatch += int(np.abs(got - refs[seed][..., 0].astype(int)).max() > 1)
    lat = np.array([r[3] for r in records] or [0.0]) * 1e3
    row = {"server": name, "clients": clients, "ok": len(ok), "sent": len(records),
           "failed": len(records) - len(ok), "mismatch": mismatch, "img_s": len(ok) / wall,
           "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
           "mean_batch": None, "busy": None}
    if counted:  # seeds per batch, and the share of the wall time the engine was sampling
        seeds, batches = (a - b for a, b in zip(after[0], before[0]))
        row.update(mean_batch=seeds / max(batches, 1), busy=(after[1][0] - before[1][0]) / wall)
    print(row, flush=True)
    return row


def histogram(port, name) -> tuple[float, float] | None:
    """(sum, count) of one of the server's Prometheus histograms; None where the server has no
    Prometheus /metrics (the previous server)."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    if resp.status != 200 or "text/plain" not in (resp.getheader("Content-Type") or ""):
        return None
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values[f"{name}_sum"], values[f"{name}_count"]


def batch_seconds(port) -> tuple[float, float]:
    """(sum, count) of the server's edm_fast_batch_seconds histogram."""
    return histogram(port, "edm_fast_batch_seconds")


def batch_sizes(port) -> tuple[float, float] | None:
    """(seeds, batches) so far, from the edm_fast_batch_size histogram (None: no /metrics)."""
    return histogram(port, "edm_fast_batch_size")


def fairness(server, steps):
    """Latency of a one-seed request alone (median of 5) and while a request of max_cost runs
    (5 in a row), and the mean time of the large request's batches that ran meanwhile."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)

    def small():
        start = time.perf_counter()
        status, _ = post(conn, {"seeds": [7], "class": 7})
        assert status == 200
        return (time.perf_counter() - start) * 1e3

    start = batch_seconds(server.port)
    solo = float(np.median([small() for _ in range(5)]))
    end = batch_seconds(server.port)
    small_batch = (end[0] - start[0]) / max(1.0, end[1] - start[1])
    hostile_conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)

    def hostile():
        try:
            post(hostile_conn, {"seeds": "0-63", "steps": 256, "class": 1, "format": "npy"})
        except (OSError, http.client.HTTPException):
            pass  # closed below: its queued seeds are dropped

    thread = threading.Thread(target=hostile)
    thread.start()
    time.sleep(1.0)
    before = batch_seconds(server.port)
    during = [small() for _ in range(5)]
    after = batch_seconds(server.port)
    hostile_conn.sock.shutdown(2)  # measured: the client leaves
    thread.join(timeout=60)
    # the large request's batches: the window's batches less the 5 small ones
    batch = (after[0] - before[0] - 5 * small_batch) / max(1.0, after[1] - before[1] - 5)
    return {"solo": solo, "during_p50": float(np.median(during)), "during_max": max(during),
            "batch_s": batch}


def main(argv=None) -> int:
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    rev = args.baseline_rev or subprocess.run(
        ["git", "log", "-1", "--format=%H^", "--diff-filter=D", "--", "edm_fast/serve.py"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    rev = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    seed_base = 10_000
    refs = reference_images(list(range(seed_base, seed_base + args.requests)), args.steps)
    rows, rss, startup, fair = [], [], [], None
    for name, make, counts in [
            ("new, batching on", lambda: new_server(64, args.steps), clients),
            ("new, batching off", lambda: new_server(1, args.steps), [32]),
            ("previous, batching on", lambda: legacy_server(rev, 64, args.steps), [32]),
            *([("new, 2 Ray replicas", lambda: new_server(64, args.steps, ray=True), [32])]
              if args.ray else [])]:
        server = make()
        startup.append((name, server.startup))
        try:
            rows += [run(name, server, c, args, refs, seed_base) for c in counts]
            if name == "new, batching on":
                fair = fairness(server, args.steps)
        finally:
            server.stop()
        rss.append((name, server.rss_start, server.rss_end))
    base = next(r["img_s"] for r in rows if r["server"] == "previous, batching on")
    lines = [("| server | clients | ok / sent | failed | >1 level off | img/s | p50 ms | p99 ms "
              "| seeds per batch | engine busy | vs previous (32 clients) |"), "|---" * 11 + "|"]
    for r in rows:
        per_batch = "–" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
        busy = "–" if r["busy"] is None else f"{r['busy']:.0%}"
        lines.append(f"| {r['server']} | {r['clients']} | {r['ok']} / {r['sent']} | "
                     f"{r['failed']} | {r['mismatch']} | {r['img_s']:.1f} | {r['p50']:.0f} | "
                     f"{r['p99']:.0f} | {per_batch} | {busy} | {r['img_s'] / base:.2f}x |")
    lines += ["", ("| server | start-up s (load + warm-up) | RSS before MiB | RSS after MiB | "
                   "growth |"), "|---|---|---|---|---|"]
    for (name, before, after), (_, up) in zip(rss, startup):
        lines.append(f"| {name} | {up:.1f} | {before:.0f} | {after:.0f} | "
                     f"{(after - before) / before * 100:+.1f}% |")
    lines += ["", ("Fairness (new server, batching on): a one-seed request alone "
              f"{fair['solo']:.0f} ms (median of 5); while {{\"seeds\": \"0-63\", \"steps\": "
              f"256}} (cost 32,704 <= max_cost) runs: median {fair['during_p50']:.0f} ms, max "
              f"{fair['during_max']:.0f} ms, against the target solo + one batch = "
              f"{fair['solo'] + fair['batch_s'] * 1e3:.0f} ms (one batch of the large request: "
              f"{fair['batch_s']:.2f} s, --max-batch-cost default). Its client "
              "then left; its queued seeds were dropped."),
              "", (f"Model 'default' (digits UNet) on the CPU, {args.steps} Heun steps, one seed "
              f"per PNG request, max_wait_ms=10, {args.requests} requests per run (time limit "
              f"{args.time_limit:g} s). Previous server: edm_fast/serve.py at {rev[:12]} "
              "(http.server, the reference loop). '>1 level off': responses differing from the "
              "seed's reference image by more than one level.")]
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        cmd = command_line("python bench/bench_serve.py " + " ".join(argv or sys.argv[1:]),
                           ("OMP_NUM_THREADS",))
        append_results("Inference server on FastAPI/uvicorn: clients, batching, previous "
                       "server, RSS, fairness (bench/bench_serve.py)", table, cmd.strip())
    bad = any(r["failed"] or r["mismatch"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
