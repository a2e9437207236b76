"""Checkpoints: safetensors files with their config as JSON metadata, written atomically.

One file holds everything a run needs to continue bit for bit:
    model.*   the raw network F (training weights)          ema.*   its exponential moving average
    optim.*   Adam's per-parameter state                    rng.*   torch RNG states (uint8)
and the metadata key ``edm_fast`` holds a JSON document: the network spec (arch + constructor
kwargs), the preconditioning, the loss, the data set and its statistics, the training step, the
optimizer's hyper-parameters and the data stream position. An inference checkpoint (the bundled
models, ``edm-fast convert``) has the same metadata and only ``ema.*``.

Files are written to a temporary name in the same folder, flushed to disk, then renamed, so a
crash or kill at any moment leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

__all__ = [
    "save_checkpoint", "read_checkpoint", "CheckpointError", "latest_checkpoint",
    "list_checkpoints", "remove_stale_temporaries", "UnreadableCheckpointError",
    "build_denoiser", "load_denoiser_checkpoint", "net_spec", "load_official",
    "export_inference_checkpoint",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or of an unknown format."""


class UnreadableCheckpointError(CheckpointError):
    """A file that safetensors cannot read: truncated (a copy cut short) or corrupt."""


def _umask() -> int:
    mask = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # the mode open() gives a new file here (0644 with umask 022)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            write(tmp)
        except Exception as exc:  # safetensors reports a full disk as its own error type
            if type(exc).__name__ != "SafetensorError":
                raise
            raise OSError(f"could not write {path}: {exc}") from exc
        os.chmod(tmp, _FILE_MODE)  # safetensors writes 0600; give the mode of every other output
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write ``tensors`` (CPU copies are made) and ``meta`` (JSON) to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    doc = json.dumps({"format_version": FORMAT_VERSION, **meta}, sort_keys=True)
    _atomic_write(path, lambda p: save_file(cpu, str(p), metadata={"edm_fast": doc}))
    return path


def read_checkpoint(path, *, prefixes: tuple[str, ...] | None = None):
    """(tensors, meta) of a checkpoint; only keys under ``prefixes`` when given."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("edm_fast")
            keys = [k for k in f.keys() if prefixes is None or k.startswith(prefixes)]
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as exc:  # safetensors raises its own error types for torn files
        raise UnreadableCheckpointError(f"{path} is not a readable safetensors checkpoint "
                                        f"(truncated or corrupt?): {exc}") from exc
    if raw is None:
        raise CheckpointError(f"{path} has no edm-fast metadata; convert it with "
                              "`edm-fast convert` or load it with edm_fast.checkpoints APIs")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON: {exc}") from exc
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer edm-fast (format "
                              f"{meta['format_version']} > {FORMAT_VERSION})")
    return tensors, meta


def list_checkpoints(folder) -> list[Path]:
    """The ckpt-<step>.safetensors files in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the hidden .ckpt-*.tmp<pid> files of writes that a killed process (SIGKILL, power
    loss) never finished or cleaned up, when no process <pid> runs; returns them."""
    folder = Path(folder)
    stale = []
    for p in sorted(folder.glob(".ckpt-*.safetensors.tmp*")) if folder.is_dir() else []:
        pid = p.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and _process_exists(int(pid)):
            continue
        p.unlink(missing_ok=True)
        stale.append(p)
    return stale


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def latest_checkpoint(folder) -> Path | None:
    """The highest-numbered ckpt-<step>.safetensors in ``folder``, or None."""
    found = list_checkpoints(folder)
    return found[0] if found else None


def net_spec(preset: str, *, img_resolution, img_channels, label_dim: int = 0,
             augment_dim: int = 0, **overrides) -> dict:
    """The JSON-able description of a network: its arch and full constructor kwargs."""
    from .nets.presets import get_preset, resolve_net_kwargs

    p = get_preset(preset)
    kwargs = resolve_net_kwargs(p, img_resolution=img_resolution, img_channels=img_channels,
                                label_dim=label_dim, augment_dim=augment_dim, **overrides)
    return {"preset": preset, "arch": p.arch, "kwargs": kwargs}


def build_net_from_spec(spec: dict) -> torch.nn.Module:
    from .nets.presets import ARCHS

    if spec.get("arch") not in ARCHS:
        raise CheckpointError(f"unknown network architecture {spec.get('arch')!r}")
    return ARCHS[spec["arch"]](**spec["kwargs"])


def build_denoiser(meta: dict):
    """A Denoiser (raw net + preconditioning) from checkpoint metadata, weights uninitialised."""
    from .precond import Denoiser, make_precond

    net = build_net_from_spec(meta["net"])
    return Denoiser(net, make_precond(meta["precond"]))


def load_denoiser_checkpoint(path, *, device="cpu", ema: bool = True):
    """The Denoiser stored in a checkpoint file (or a run folder's latest), in eval mode.

    ema=True takes the EMA weights (what one samples with); falls back to the training weights
    when the file has no EMA.
    """
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no ckpt-*.safetensors in {path}")
        path = latest
    tensors, meta = read_checkpoint(path, prefixes=("ema.", "model."))
    prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "model."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path} holds no network weights")
    try:
        denoiser = build_denoiser(meta)
        denoiser.model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: weights do not match the network in its config: "
                              f"{exc}") from exc
    denoiser.checkpoint_meta = meta
    if "sample_shape" in meta:
        denoiser.sample_shape = tuple(meta["sample_shape"])
    return denoiser.to(device).eval().requires_grad_(False)


def export_inference_checkpoint(src, dst, *, dtype: torch.dtype | None = None) -> Path:
    """Write only the EMA weights (and the config) of a training checkpoint or run folder.

    The result is what ``edm-fast sample --ckpt`` loads and what the bundled models are; its
    metadata keeps the network, preconditioning, data and training settings, not the optimizer
    or data-stream state. ``dtype`` (e.g. torch.float16) shrinks the file.
    """
    src = Path(src)
    if src.is_dir():
        latest = latest_checkpoint(src)
        if latest is None:
            raise CheckpointError(f"no ckpt-*.safetensors in {src}")
        src = latest
    tensors, meta = read_checkpoint(src, prefixes=("ema.", "model."))
    prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
    keep = {f"ema.{k[len(prefix):]}": (v.to(dtype) if dtype is not None and v.is_floating_point()
                                       else v)
            for k, v in tensors.items() if k.startswith(prefix)}
    meta = {k: v for k, v in meta.items() if k not in ("optimizer", "stream")}
    return save_checkpoint(dst, keep, meta)


def load_official(path, *, device="cpu"):
    """Load an official NVlabs EDM snapshot (.pkl) without executing its embedded code."""
    from .official import load_official as _load

    return _load(path, device=device)
