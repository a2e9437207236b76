"""The server as a Ray Serve deployment: a local Ray instance (loopback only) with 2 replicas
answers seed for seed what a direct Sampler call gives."""

from __future__ import annotations

import http.client
import io
import json
import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from edm_fast.sampling.sampler import Sampler
from edm_fast.serve import ServeSettings

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, body, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/generate", body=json.dumps(body))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_two_ray_replicas_answer_as_a_direct_sampler_call():
    from ray import serve

    from edm_fast.serve.ray_app import deployment

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = {"model": "default", "device": "cpu", "backend": "reference",
                  "batch_sizes": [1, 2, 4]}
        settings = ServeSettings(max_batch=4, default_steps=STEPS, max_cost=100)
        serve.run(deployment(engine, settings, replicas=2, cpus=0.5), name="edm-fast",
                  route_prefix="/")
        status = serve.status().applications["edm-fast"].deployments
        assert sum(d.replica_states.get("RUNNING", 0) for d in status.values()) == 2
        reference = Sampler("default", num_steps=STEPS, batch_size=1, device="cpu",
                            backend="reference")
        for seed in range(6):
            code, data = _post(port, {"seeds": [seed], "class": seed % 10, "format": "npy"})
            assert code == 200, data
            got = np.load(io.BytesIO(data))[0].astype(np.float64)
            want = reference(seeds=[seed], class_labels=seed % 10)[0].numpy()
            # batch-size rounding only (see test_serve.py): 2-norm relative error <= 1e-5
            assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
        code, data = _post(port, {"seeds": "0-29", "steps": 64})  # 30 x 127 NFE > 100
        assert code == 422 and "max_cost" in json.loads(data)["error"]
    finally:
        serve.shutdown()
        ray.shutdown()
