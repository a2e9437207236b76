"""Response bodies: rows (N, *shape) about [-1, 1] -> png, npy or json bytes."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import torch

__all__ = ["render"]


def render(rows: torch.Tensor, meta: dict, fmt: str) -> tuple[str, bytes, dict]:
    """(content type, body, extra headers). ``meta``: seeds, classes, steps, solver, guidance.

    png, one seed: image/png; png, several: JSON with base64 PNGs under "images"; npy: float32
    (N, *shape), not clipped, rows in seed order (also in X-Seeds); json: meta + "shape" and
    "samples"."""
    seeds_header = {"X-Seeds": ",".join(map(str, meta["seeds"]))}
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, rows.float().numpy())
        return "application/x-npy", buf.getvalue(), seeds_header
    if fmt == "json":
        body = {**meta, "shape": list(rows.shape[1:]), "samples": rows.float().tolist()}
        return "application/json", json.dumps(body).encode(), {}
    from ..io.samples import png_bytes, to_uint8

    pngs = [png_bytes(a) for a in to_uint8(rows)]
    if len(pngs) == 1:
        return "image/png", pngs[0], seeds_header
    body = {**meta, "images": [base64.b64encode(p).decode("ascii") for p in pngs]}
    return "application/json", json.dumps(body).encode(), {}

