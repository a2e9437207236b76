"""Load test of ``edm-fast serve``: batching on (max_batch=64) against off (max_batch=1).

    OMP_NUM_THREADS=1 python bench/bench_serve.py                       # CPU, modest size
    python bench/bench_serve.py --clients 64 --requests 2048 --steps 18 --device cuda

Both servers run in this process on 127.0.0.1 (ephemeral ports) and nothing else is contacted.
Each run: ``--clients`` threads, each on its own keep-alive connection, send one-seed PNG
requests (seed k, class k mod the number of classes) until ``--requests`` have been sent or
``--time-limit`` seconds have passed, whichever is first; a request also gives up at the time
limit. A warm-up round of ``--clients`` requests (not counted) makes the samplers first. Every
response is decoded and compared with seed k's image from one ``Sampler(..., batch_size=64)``
over all the seeds (noise is per seed; only float rounding depends on the batch, ~1e-5, so a
pixel may differ by one level); a difference of more than one level counts as a mismatch.
Columns: img/s and req/s over the run's wall time, latency percentiles per request (client
side), mean batch (images per sampler call, from /metrics), speed-up against batching off.
The table is appended to bench/RESULTS.md; the exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_results, command_line  # noqa: E402

from edm_fast.images import to_uint8  # noqa: E402
from edm_fast.sampler import Sampler  # noqa: E402
from edm_fast.serve import InferenceServer, make_sampler_factory  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="an image model name or checkpoint")
    p.add_argument("--steps", type=int, default=8, help="Heun steps per image (2N-1 NFE)")
    p.add_argument("--clients", type=int, default=32, help="concurrent client threads")
    p.add_argument("--requests", type=int, default=256, help="requests per run (one seed each)")
    p.add_argument("--time-limit", type=float, default=90.0, help="hard limit per run, seconds")
    p.add_argument("--max-batch", type=int, default=64, help="max_batch of the batching run")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="server batching window")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--backend", default="auto", help="sampler backend")
    p.add_argument("--no-append", action="store_true", help="do not write bench/RESULTS.md")
    return p.parse_args(argv)


def seed_class(seed: int, label_dim: int) -> int | None:
    """The class every image of a seed is asked for: cycling through the classes, or None for
    an unconditional model."""
    return seed % label_dim if label_dim else None


def reference_images(args, seeds) -> tuple[dict[int, np.ndarray], int]:
    """(seed -> (H, W, C) uint8 reference image, from a batch-64 Sampler over ``seeds``; the
    model's label_dim)."""
    sampler = Sampler(args.model, num_steps=args.steps, batch_size=64, device=args.device,
                      backend="reference")
    out = {}
    for lo in range(0, len(seeds), 64):
        part = seeds[lo:lo + 64]
        labels = [seed_class(s, sampler.label_dim) for s in part] if sampler.label_dim else None
        out.update(zip(part, to_uint8(sampler(seeds=part, class_labels=labels))))
    return out, sampler.label_dim


def client_loop(url, next_index, deadline, seed_base, label_dim, record) -> None:
    """Send requests on one keep-alive connection until the indices or the time run out."""
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    conn = None
    while True:
        k = next_index()
        if k is None or time.monotonic() >= deadline:
            break
        seed = seed_base + k
        body = json.dumps({"seeds": [seed], "class": seed_class(seed, label_dim)}).encode()
        start = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=max(
                    0.1, deadline - time.monotonic()))
            conn.request("POST", "/generate", body=body)
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            status, data = None, repr(exc).encode()
            conn = None
        record(seed, status, data, time.perf_counter() - start)
    if conn is not None:
        conn.close()


def load(url, *, clients, requests, time_limit, seed_base, label_dim) -> tuple[list, float]:
    """Run the clients; (records (seed, status, body, seconds), wall seconds)."""
    counter, lock, records = itertools.count(), threading.Lock(), []

    def next_index():
        with lock:
            k = next(counter)
        return k if k < requests else None

    def record(*row):
        with lock:
            records.append(row)

    deadline = time.monotonic() + time_limit
    threads = [threading.Thread(target=client_loop,
                                args=(url, next_index, deadline, seed_base, label_dim,
                                      record))
               for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=time_limit + 10)
    return records, time.perf_counter() - start


def check(records, refs) -> dict:
    """Failures, exact matches and mismatches (> 1 level) against the reference images."""
    from PIL import Image

    failed, exact, mismatch, max_diff = 0, 0, 0, 0
    for seed, status, data, _ in records:
        if status != 200:
            failed += 1
            continue
        got = np.asarray(Image.open(io.BytesIO(data)))  # (H, W) greyscale or (H, W, 3) RGB
        want = refs[seed][..., 0] if refs[seed].shape[-1] == 1 else refs[seed]
        diff = int(np.abs(got.astype(int) - want.astype(int)).max())
        max_diff = max(max_diff, diff)
        exact += diff == 0
        mismatch += diff > 1
    return {"failed": failed, "exact": exact, "mismatch": mismatch, "max_diff": max_diff}


def run_config(args, max_batch, refs, label_dim, seed_base) -> dict:
    """Start a server, warm it up, load it, check the responses, shut it down."""
    factory = make_sampler_factory(args.model, device=args.device, backend=args.backend)
    server = InferenceServer(factory, max_batch=max_batch, max_wait_ms=args.max_wait_ms,
                             default_steps=args.steps, request_timeout_s=args.time_limit)
    server.start()
    try:
        load(server.url, clients=args.clients, requests=args.clients, time_limit=args.time_limit,
             seed_base=0, label_dim=label_dim)  # warm-up: makes the samplers; not counted
        before = _metrics(server.url)
        records, wall = load(server.url, clients=args.clients, requests=args.requests,
                             time_limit=args.time_limit, seed_base=seed_base,
                             label_dim=label_dim)
        after = _metrics(server.url)
    finally:
        server.shutdown()
    ok = [r for r in records if r[1] == 200]
    lat = np.array([r[3] for r in records]) * 1e3 if records else np.zeros(1)
    batches = after["batches"] - before["batches"]
    images = after["images"] - before["images"]
    return {"max_batch": max_batch, "sent": len(records), "ok": len(ok), "wall": wall,
            "img_s": len(ok) / wall, "req_s": len(ok) / wall,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "mean_batch": images / batches if batches else 0.0, **check(records, refs)}


def _metrics(url) -> dict:
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def format_table(rows, args) -> str:
    base = next((r for r in rows if r["max_batch"] == 1), rows[-1])
    head = ("| batching | max_batch | clients | ok / sent | failed | img/s | req/s | p50 ms | "
            "p99 ms | mean batch | exact | >1 level off | speed-up |\n" + "|---" * 13 + "|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {'on' if r['max_batch'] > 1 else 'off'} | {r['max_batch']} | {args.clients} | "
            f"{r['ok']} / {r['sent']} | {r['failed']} | {r['img_s']:.1f} | {r['req_s']:.1f} | "
            f"{r['p50']:.0f} | {r['p99']:.0f} | {r['mean_batch']:.1f} | {r['exact']} | "
            f"{r['mismatch']} | {r['img_s'] / base['img_s']:.2f}x |")
    note = (f"\n\nModel '{args.model}' on {args.device}, {args.steps} Heun steps, one seed per "
            f"PNG request, max_wait_ms={args.max_wait_ms:g}, {args.requests} requests per run "
            f"(time limit {args.time_limit:g} s). 'exact': PNG responses bit-identical to the "
            "seed's image from a batch-64 Sampler call; '>1 level off': differing by more than "
            "one level (0 = every response is its seed's image up to float rounding).")
    return "\n".join(lines) + note


def main(argv=None) -> int:
    args = parse_args(argv)
    seed_base = 10_000
    t0 = time.perf_counter()
    refs, label_dim = reference_images(args, list(range(seed_base, seed_base + args.requests)))
    print(f"reference images: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for max_batch in (args.max_batch, 1):
        rows.append(run_config(args, max_batch, refs, label_dim, seed_base))
        print(rows[-1], flush=True)
    table = format_table(rows, args)
    print(table)
    if not args.no_append:
        cmd = command_line("python bench/bench_serve.py " + " ".join(argv or sys.argv[1:]),
                           ("OMP_NUM_THREADS",))
        append_results("Inference server: batching on vs off (bench/bench_serve.py)", table,
                       cmd.strip())
    bad = any(r["failed"] or r["mismatch"] or r["ok"] < args.requests for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
