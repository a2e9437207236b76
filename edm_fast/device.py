"""One ``--device`` option for CPU, CUDA and Apple MPS; never a hard-coded "cuda"."""

from __future__ import annotations

import os

import torch

__all__ = ["busy_cpu_note", "cpu_flags", "cpu_model", "resolve_device", "set_threads", "setup_note",
           "synchronize"]


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


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them in /proc/cpuinfo (``amx_bf16``,
    ``avx512_bf16``, ``avx512_fp16``, ...); empty where there is no /proc/cpuinfo (macOS,
    Windows): nothing is assumed there."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (for timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def set_threads(threads: int | None) -> int:
    """Apply a ``--threads N`` option (torch's intra-op CPU threads; ONNX Runtime sessions
    default to the same count); None keeps torch's default. Returns the count in effect."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def busy_cpu_note(device=None) -> str | None:
    """A one-line note when the machine is loaded (1-minute load average >= its core count)
    and this process would run on several CPU threads, which then wait on each other: on a
    shared CPU, 1 thread has been 5-6x faster than 2. None otherwise (or off the CPU)."""
    if device is not None and torch.device(device).type != "cpu":
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return None
    cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    if load < cores or threads <= 1:
        return None
    return (f"note: this machine is loaded (load average {load:.1f} on {cores} cores); with "
            f"{threads} threads, --threads 1 can be several times faster")


_SETUP_WHAT = {"compiled": "compile", "onnx": "export", "cpp": "export and compile"}


def setup_note(seconds: float, backend: str, device, limit: float = 10.0) -> str | None:
    """A one-line note when a CPU backend's set-up (export, compile) took over ``limit`` s."""
    if seconds <= limit or torch.device(device).type != "cpu" or backend not in _SETUP_WHAT:
        return None
    return (f"note: set-up took {seconds:.0f} s ({_SETUP_WHAT[backend]}); for small jobs "
            f"--backend reference needs none")
