"""The fast paths behind one Sampler interface, and the rule that picks one.

Each backend is a class ``Backend(denoiser, plan, batch_shape, *, dtype, device, label_dim)``
with ``run(latents (N, ...), churn_noise (K, N, ...) | None, class_labels (N, L) | None)`` and a
``warmup_seconds`` attribute. ``reference`` (samplers.py) is always available and is the
ground truth; the others are imported lazily so that a missing compiler, extension or
onnxruntime never breaks ``import edm_fast``.

Environment switches: ``EDM_FAST_BACKEND=<name>`` forces a backend (``reference`` forces every
fallback); ``EDM_FAST_DISABLE_<NAME>=1`` (COMPILED, CPP, ONNX, TRITON) takes one out of 'auto'.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "load_backend"]

# name -> (module, class name)
BACKENDS = {
    "reference": ("edm_fast.backends.reference", "ReferenceBackend"),
    "compiled": ("edm_fast.backends.compiled", "CompiledBackend"),
    "cpp": ("edm_fast.backends.cpp", "CppBackend"),
    "onnx": ("edm_fast.backends.onnx", "OnnxBackend"),
}

# what 'auto' tries, best first, per device type
# (onnx is never picked by 'auto': it is for deployments that ask for it by name)
AUTO_ORDER = {"cuda": ["compiled", "cpp", "reference"], "cpu": ["cpp", "compiled", "reference"]}


def _disabled(name: str) -> bool:
    return os.environ.get(f"EDM_FAST_DISABLE_{name.upper()}", "0") == "1"


def load_backend(name: str):
    """The backend class for ``name``; raises ImportError with the reason if it cannot load."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)} or 'auto'")
    module, cls = BACKENDS[name]
    backend = getattr(importlib.import_module(module), cls)
    check = getattr(backend, "unavailable_reason", None)
    reason = check() if check is not None else None
    if reason:
        raise ImportError(reason)
    return backend


def available_backends() -> dict[str, str | None]:
    """Every backend with None when it can load here, or the reason it cannot."""
    out = {}
    for name in BACKENDS:
        try:
            load_backend(name)
            out[name] = None
        except Exception as exc:  # ImportError, missing build, ...
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


# Below this many images per Sampler on the CPU, 'auto' skips the compiling backends: their
# one-off compile/export (30-150 s on 2 cores) costs more than it saves (measured: 64 images of
# the bundled model take 1.3 s with the reference loop, 1.6 s + 34 s export with the C++ loop).
SMALL_CPU_JOB = 4096


def resolve_backend(requested: str, device: torch.device, expected_images: int | None = None):
    """Pick the backend class: the requested one, or for 'auto' the best that loads here.

    An explicit request that cannot load raises. 'auto' falls back down AUTO_ORDER and warns
    once, naming the reason, if it ends below its first choice. ``expected_images`` (when the
    caller knows its workload) lets 'auto' keep the reference loop for small CPU jobs.
    """
    forced = os.environ.get("EDM_FAST_BACKEND")
    if forced:
        requested = forced
    if requested != "auto":
        return load_backend(requested)
    if device.type == "cpu" and expected_images is not None and expected_images < SMALL_CPU_JOB:
        return load_backend("reference")
    reasons = []
    order = AUTO_ORDER.get(device.type, ["compiled", "reference"])
    for name in order:
        if name != "reference" and _disabled(name):
            reasons.append(f"{name}: disabled by EDM_FAST_DISABLE_{name.upper()}=1")
            continue
        try:
            backend = load_backend(name)
        except Exception as exc:
            reasons.append(f"{name}: {exc}")
            continue
        if reasons:
            warnings.warn(f"edm-fast: using the '{name}' backend; " + "; ".join(reasons),
                          RuntimeWarning, stacklevel=3)
        return backend
    raise RuntimeError("no sampler backend could be loaded")  # reference always loads
