"""The fast paths behind one Sampler interface, and the rule that picks one.

Each backend is a class ``Backend(denoiser, plan, batch_shape, *, dtype, device, label_dim,
**options)`` (options are backend-specific: ``compile``/``step_impl`` for compiled, ``kind``/
``model_path`` for cpp, ``opset`` for onnx, ...; ``Sampler(backend_options=)``) and
``net_dtype`` (None: the network as it is, or torch.float32 / bfloat16 / float16: the network's
precision, which every backend honours or refuses with an EdmFastError; edm_fast.precision)
and ``guide`` (autoguidance's guide denoiser, evaluated with the same machinery as the main
net, on every backend) with ``run(latents (N, ...), churn_noise
(K, N, ...) | None, class_labels (N, L) | None)`` and a
``warmup_seconds`` attribute. ``reference`` (sampling/reference.py) is always available and is the
ground truth; the others are imported lazily so that a missing compiler, extension or
onnxruntime or openvino never breaks ``import edm_fast``.

Environment switches: ``EDM_FAST_BACKEND=<name>`` forces that backend for every Sampler, 'auto'
or not (``reference`` thus switches every fast path off); ``EDM_FAST_DISABLE_<NAME>=1`` (COMPILED,
CPP, ONNX, OPENVINO) takes one out of 'auto', and ``EDM_FAST_DISABLE_TRITON=1`` keeps the compiled
backend's step math in PyTorch instead of the Triton kernels.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

__all__ = ["AUTO_ORDER", "BACKENDS", "auto_candidates", "available_backends", "is_auto",
           "load_backend", "resolve_backend", "warn_fallback"]

# name -> (module, class name)
BACKENDS = {
    "reference": ("edm_fast.sampling.backends.reference", "ReferenceBackend"),
    "compiled": ("edm_fast.sampling.backends.compiled", "CompiledBackend"),
    "cpp": ("edm_fast.sampling.backends.cpp", "CppBackend"),
    "onnx": ("edm_fast.sampling.backends.onnx", "OnnxBackend"),
    "openvino": ("edm_fast.sampling.backends.openvino", "OpenVinoBackend"),
}

# what 'auto' tries, best first, per device type. On the CPU ONNX Runtime comes first: in
# bench/RESULTS.md (2-core CPU, 18 Heun steps) it was the fastest backend for the UNets at batch
# 1 and 16 and for cifar10-ddpmpp at batch 1, within 15% of the best elsewhere, and it has the
# shortest warm-up (0.1-10 s of export, against 4-50 s of Inductor and 10-60 s of AOTInductor).
# It is not tried on CUDA, where the CUDA-graph loop is the measured fast path. OpenVINO in
# float32 was mostly slower than ONNX Runtime (0.53-0.85x on the digits UNet and on
# cifar10-ddpmpp at batch 1, 1.24x only on cifar10-ddpmpp at batch 8; docs/PRECISION.md), so it
# comes last there; with a bf16 network on the CPU (which ONNX Runtime cannot run) it comes
# first: on cifar10-ddpmpp at batch 8, 2.3x ONNX Runtime float32 and 1.6x eager PyTorch bf16
# (AVX512-BF16, no AMX).
AUTO_ORDER = {"cuda": ["compiled", "cpp", "reference"],
              "cpu": ["onnx", "cpp", "compiled", "openvino", "reference"]}
AUTO_ORDER_REDUCED = {"cpu": ["openvino", "cpp", "compiled", "reference"]}


def _auto_order(device: torch.device, net_dtype: torch.dtype | None = None) -> list[str]:
    """AUTO_ORDER for this device type (MPS and others: compiled, then the reference); on the
    CPU with a bf16/fp16 network, AUTO_ORDER_REDUCED."""
    if net_dtype in (torch.bfloat16, torch.float16) and device.type in AUTO_ORDER_REDUCED:
        return AUTO_ORDER_REDUCED[device.type]
    return AUTO_ORDER.get(device.type, ["compiled", "reference"])


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


# Below this many images per Sampler on the CPU, 'auto' keeps the reference loop: the one-off
# export/compile (1-10 s for ONNX, 30-150 s for AOTInductor or Inductor on 2 cores) costs more
# than it saves (measured: 64 images of the bundled model take 1.3 s with the reference loop,
# 1.6 s + 34 s export with the C++ loop; ONNX Runtime saves ~6% per batch of 64 for 1.3 s of
# export, so it pays only after a few thousand images).
SMALL_CPU_JOB = 4096


def _unsuitable(name: str, device: torch.device, dtype: torch.dtype,
                guide: bool = False) -> str | None:
    """Why 'auto' must not pick ``name`` for this job even though it loads, or None."""
    if name in ("onnx", "openvino") and dtype != torch.float32:
        return f"{name}: runs the network in float32, and dtype {dtype} was asked for"
    return None


def auto_candidates(device: torch.device, expected_images: int | None = None,
                    dtype: torch.dtype = torch.float32, net_dtype: torch.dtype | None = None,
                    guide: bool = False) -> tuple[list, list[tuple[str, str]]]:
    """The backend classes 'auto' may use here, best first (always ending with the reference),
    and (name, reason) for each backend it skipped, in AUTO_ORDER (AUTO_ORDER_REDUCED for a
    bf16/fp16 network on the CPU); ``guide``: the run is autoguided (a guide network too)."""
    if device.type == "cpu" and expected_images is not None and expected_images < SMALL_CPU_JOB:
        return [load_backend("reference")], []
    classes, skipped = [], []
    for name in _auto_order(device, net_dtype):
        if name != "reference" and _disabled(name):
            skipped.append((name, f"{name}: disabled by EDM_FAST_DISABLE_{name.upper()}=1"))
            continue
        why = _unsuitable(name, device, dtype, guide)
        if why is not None:
            skipped.append((name, why))
            continue
        try:
            classes.append(load_backend(name))
        except Exception as exc:
            skipped.append((name, f"{name}: {exc}"))
    return classes, skipped


def resolve_backend(requested: str, device: torch.device, expected_images: int | None = None,
                    dtype: torch.dtype = torch.float32, net_dtype: torch.dtype | None = None):
    """Pick the backend class: the requested one, or for 'auto' the best that loads here.

    An explicit request (or ``EDM_FAST_BACKEND``) that cannot load raises. 'auto' falls back
    down AUTO_ORDER and warns once, naming the reasons, if it ends below its first choice.
    ``expected_images`` (when the caller knows its workload) lets 'auto' keep the reference
    loop for small CPU jobs. ``Sampler`` goes one step further: it also falls back when the
    chosen backend fails to build for the model (``auto_candidates``).
    """
    forced = os.environ.get("EDM_FAST_BACKEND")
    if forced:
        requested = forced
    if requested != "auto":
        return load_backend(requested)
    classes, skipped = auto_candidates(device, expected_images, dtype, net_dtype)
    warn_fallback(classes[0].name, skipped, device, stacklevel=3, net_dtype=net_dtype)
    return classes[0]


def is_auto(requested: str) -> bool:
    """True when the backend choice is left to 'auto' (not forced by EDM_FAST_BACKEND)."""
    return requested == "auto" and not os.environ.get("EDM_FAST_BACKEND")


def warn_fallback(name: str, skipped: list[tuple[str, str]], device: torch.device,
                  stacklevel: int = 2, net_dtype: torch.dtype | None = None) -> None:
    """The one warning of an 'auto' choice that ended below its first choice, naming why each
    better backend was skipped; nothing when ``name`` is the best one usable here (a skipped
    backend ranked below the chosen one costs the user nothing)."""
    rank = _auto_order(device, net_dtype).index
    reasons = [why for skipped_name, why in sorted(skipped, key=lambda item: rank(item[0]))
               if rank(skipped_name) < rank(name)]
    if reasons:
        warnings.warn(f"edm-fast: using the '{name}' backend; " + "; ".join(reasons),
                      RuntimeWarning, stacklevel=stacklevel + 1)
