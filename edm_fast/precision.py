"""The network's precision (``net_dtype``): one reading of every spelling, the 'auto' rule, and
the check that the device can run the precision asked for.

Only the network F runs in reduced precision; the preconditioning of EDM Eq. 7 around it, the
sampler state and the step math stay in the sampler's dtype (float32 or float64), exactly as
``precond.Denoiser(net_dtype=)`` runs a half network.

    resolve_net_dtype("bf16", device)          -> NetPrecision(torch.bfloat16, None)
    resolve_net_dtype("auto", device, flops)   -> NetPrecision(<chosen>, "net_dtype auto: ...")

Spellings: 'fp32' | 'bf16' | 'fp16' | 'auto', the dtype names 'float32' | 'bfloat16' |
'float16' (also 'torch.float16', 'half'), the torch dtypes themselves, and None (the network's
own dtype: float32 for every checkpoint edm-fast writes, so a seed gives the same image on every
CPU). 'auto' is opt-in and picks reduced precision only where it was measured faster at float32
quality (docs/PRECISION.md):

- a CPU with AMX-BF16, or with AVX512-BF16 (no AMX), for a network of at least
  ``AUTO_CPU_MIN_GFLOP`` GFLOP per image: bfloat16. Below that size bfloat16 was slower on the
  AVX512-BF16 CPU measured (the conversions around each layer cost more than the faster
  products save), so 'auto' keeps float32 there (on AMX CPUs too: a small network is bound by
  memory and overheads, not by the products AMX speeds up);
- CUDA with compute capability >= 8.0 (bfloat16 tensor cores): bfloat16;
- anything else (CPUs without bf16 instructions, older GPUs, MPS): float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .errors import EdmFastError

__all__ = ["AUTO_CPU_MIN_GFLOP", "NET_DTYPE_CHOICES", "NetPrecision", "bf16_hardware",
           "fp16_hardware", "gflop_per_image", "parse_net_dtype",
           "resolve_net_dtype", "short_name"]

NET_DTYPE_CHOICES = ("fp32", "bf16", "fp16", "auto")
_SPELLINGS = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
              "f32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
              "f16": torch.float16}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Per-image GFLOP of the network from which 'auto' takes bfloat16 on a CPU with bf16
# instructions. Measured on an AMD EPYC with AVX512-BF16 and no AMX, 1 thread (docs/PRECISION.md):
# the digits UNet (0.04 GFLOP/image) ran 0.5-0.8x as fast in bfloat16 as in float32 (eager, batch
# 1-64), cifar10-ddpmpp (42 GFLOP/image) 1.75x as fast (eager, batch 8; OpenVINO bf16 2.3x ONNX
# Runtime fp32); 1 GFLOP lies between the two by more than an order of magnitude each way.
AUTO_CPU_MIN_GFLOP = 1.0


def short_name(dtype: torch.dtype | None) -> str:
    """'fp32', 'bf16' or 'fp16' for a network dtype; 'model' for None (the network's own)."""
    return "model" if dtype is None else _SHORT.get(dtype, str(dtype).removeprefix("torch."))


def parse_net_dtype(spec) -> torch.dtype | str | None:
    """torch.float32 / torch.bfloat16 / torch.float16, 'auto', or None, from any spelling of
    the module docstring; ValueError naming the choices for anything else."""
    if spec is None or spec == "auto":
        return spec
    if isinstance(spec, torch.dtype):
        if spec in _SHORT:
            return spec
    elif isinstance(spec, str):
        name = spec.strip().lower().removeprefix("torch.")
        if name in _SPELLINGS:
            return _SPELLINGS[name]
    raise EdmFastError(f"net_dtype must be one of {', '.join(NET_DTYPE_CHOICES)} (or float32, "
                       f"bfloat16, float16, a torch dtype), got {spec!r}")


def bf16_hardware(device: torch.device) -> str | None:
    """What makes bfloat16 fast on ``device`` ('AMX-BF16', 'AVX512-BF16', 'sm_80', ...), or None
    where it would be emulated or cannot run."""
    device = torch.device(device)
    if device.type == "cpu":
        from .device import cpu_flags

        flags = cpu_flags()
        if "amx_bf16" in flags:
            return "AMX-BF16"
        if "avx512_bf16" in flags:
            return "AVX512-BF16"
        return None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}" if major >= 8 else None
    return None


def fp16_hardware(device: torch.device) -> str | None:
    """What makes float16 fast on ``device`` ('AMX-FP16', 'AVX512-FP16', 'sm_70', 'MPS'), or
    None where it would be emulated."""
    device = torch.device(device)
    if device.type == "cpu":
        from .device import cpu_flags

        flags = cpu_flags()
        for flag, name in (("amx_fp16", "AMX-FP16"), ("avx512_fp16", "AVX512-FP16")):
            if flag in flags:
                return name
        return None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return "MPS" if device.type == "mps" else None


@dataclasses.dataclass(frozen=True)
class NetPrecision:
    """The network's dtype (None: as the network is) and a one-line note for the user: what
    'auto' chose and why, or that the precision asked for runs emulated here (slower than
    float32); None when there is nothing to say."""

    dtype: torch.dtype | None
    note: str | None = None


def _check_runnable(dtype: torch.dtype, device: torch.device) -> str | None:
    """EdmFastError when ``device`` cannot run a network in ``dtype``; a note when it runs it
    without hardware support (slower than float32), else None."""
    if dtype == torch.float32:
        return None
    name = short_name(dtype)
    if device.type == "cuda":
        if dtype == torch.bfloat16 and bf16_hardware(device) is None:
            major, minor = torch.cuda.get_device_capability(device)
            raise EdmFastError(f"net_dtype bf16 needs a CUDA GPU of compute capability >= 8.0; "
                               f"{device} is {major}.{minor}: use fp16 or fp32")
        return None
    if device.type == "mps":
        try:
            torch.ones(1, dtype=dtype, device=device) * 2
        except (RuntimeError, TypeError) as exc:
            raise EdmFastError(f"net_dtype {name} is not supported on {device} ({exc}); use "
                               "fp16 or fp32") from None
        return None
    if device.type != "cpu":
        raise EdmFastError(f"net_dtype {name} is not supported on {device.type}")
    fast = bf16_hardware(device) if dtype == torch.bfloat16 else fp16_hardware(device)
    if fast is None:
        flags = "AMX-BF16 nor AVX512-BF16" if dtype == torch.bfloat16 else \
            "AMX-FP16 nor AVX512-FP16"
        return (f"net_dtype {name}: this CPU has neither {flags}, so the network runs "
                f"{name} emulated, slower than fp32 (results stay within the {name} bound)")
    return None


def _auto(device: torch.device, gflop_per_image: Callable[[], float] | None):
    """(dtype, note) of 'auto' on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        hw = bf16_hardware(device)
        if hw is not None:
            return torch.bfloat16, f"net_dtype auto: bf16 (CUDA {hw} has bf16 tensor cores)"
        return torch.float32, f"net_dtype auto: fp32 ({device} has no bf16 tensor cores)"
    if device.type != "cpu":
        return torch.float32, (f"net_dtype auto: fp32 (no reduced precision measured on "
                               f"{device.type})")
    hw = bf16_hardware(device)
    if hw is None:
        return torch.float32, ("net_dtype auto: fp32 (this CPU has neither AMX-BF16 nor "
                               "AVX512-BF16)")
    if gflop_per_image is not None:
        gflop = gflop_per_image()
        if gflop < AUTO_CPU_MIN_GFLOP:
            return torch.float32, (f"net_dtype auto: fp32 (this CPU has {hw}, but the "
                                   f"network's {gflop:.2g} GFLOP per image is below "
                                   f"{AUTO_CPU_MIN_GFLOP:g}, where bf16 was measured slower)")
    return torch.bfloat16, f"net_dtype auto: bf16 (this CPU has {hw})"


def resolve_net_dtype(spec, device, gflop_per_image: Callable[[], float] | None = None
                      ) -> NetPrecision:
    """The network's precision for ``spec`` on ``device``: 'auto' decided (``gflop_per_image``,
    called only when needed, gives the network's size for the CPU rule), an explicit precision
    checked (EdmFastError when the device cannot run it, a note when it runs emulated)."""
    device = torch.device(device)
    spec = parse_net_dtype(spec)
    if spec is None:
        return NetPrecision(None)
    if spec == "auto":
        dtype, note = _auto(device, gflop_per_image)
        return NetPrecision(dtype, note)
    return NetPrecision(spec, _check_runnable(spec, device))


def gflop_per_image(denoiser, shape, device) -> float:
    """GFLOP of one forward of ``denoiser`` for one image of ``shape`` (matmuls and
    convolutions, torch.utils.flop_counter); 0 for a module that is not a network."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, *shape), device=device)
    labels = None
    if getattr(denoiser, "label_dim", 0):
        labels = torch.zeros((1, denoiser.label_dim), device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        denoiser(x, torch.ones(1, device=device), labels)
    return counter.get_total_flops() / 1e9
