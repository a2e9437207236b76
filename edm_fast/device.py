"""One ``--device`` option for CPU, CUDA and Apple MPS; never a hard-coded "cuda"."""

from __future__ import annotations

import torch

__all__ = ["resolve_device", "synchronize"]


def resolve_device(spec=None) -> torch.device:
    """'auto' (or None) picks CUDA, then MPS, then CPU; anything else must be usable here."""
    if isinstance(spec, torch.device):
        device = spec
    elif spec in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            device = torch.device(spec)
        except RuntimeError as exc:
            raise ValueError(f"bad device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {spec!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device 'mps' asked for, but MPS is not available here")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (for timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
