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
import math
import os
import re
from pathlib import Path

import torch

from ..errors import BadFileError
from .files import atomic_write
from .model_card import ModelCard, model_card, record_card

__all__ = [
    "save_checkpoint", "read_checkpoint", "CheckpointError", "latest_checkpoint", "class_names",
    "list_checkpoints", "remove_stale_temporaries", "checkpoint_file", "UnreadableCheckpointError",
    "build_denoiser", "load_denoiser_checkpoint", "net_spec",
    "export_inference_checkpoint", "check_config", "check_weights", "read_inference_weights",
    "FORMAT_VERSION", "DEFAULT_MAX_PARAMS", "MAX_SAMPLE_VALUES", "max_params_limit",
]

FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.safetensors$")


class CheckpointError(BadFileError):
    """A checkpoint that is missing, truncated, corrupt, hostile or of an unknown format."""


class UnreadableCheckpointError(CheckpointError):
    """A file that safetensors cannot read: truncated (a copy cut short) or corrupt."""


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write ``tensors`` (CPU copies are made) and ``meta`` (JSON) to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    doc = json.dumps({"format_version": FORMAT_VERSION, **meta}, sort_keys=True)
    atomic_write(path, lambda p: save_file(cpu, str(p), metadata={"edm_fast": doc}),
                 durable=True)
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
    return tensors, _parse_meta(raw, path)


def list_checkpoints(folder) -> list[Path]:
    """The ckpt-<step>.safetensors files in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the hidden .ckpt-*.tmp<pid>[.safetensors] files (io/files.py) of writes that a
    killed process (SIGKILL, power loss) never finished or cleaned up, when no process <pid>
    runs; returns them."""
    folder = Path(folder)
    stale = []
    for p in sorted(folder.glob(".ckpt-*.safetensors.tmp*")) if folder.is_dir() else []:
        pid = re.search(r"\.tmp(\d+)", p.name)
        if pid and _process_exists(int(pid.group(1))):
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
    from ..nets.presets import get_preset, resolve_net_kwargs

    p = get_preset(preset)
    kwargs = resolve_net_kwargs(p, img_resolution=img_resolution, img_channels=img_channels,
                                label_dim=label_dim, augment_dim=augment_dim, **overrides)
    return {"preset": preset, "arch": p.arch, "kwargs": kwargs}


def build_net_from_spec(spec: dict) -> torch.nn.Module:
    from ..nets.presets import ARCHS

    if spec.get("arch") not in ARCHS:
        raise CheckpointError(f"unknown network architecture {spec.get('arch')!r}")
    return ARCHS[spec["arch"]](**spec["kwargs"])


# ------------------------------------------------------------------------------------------
# Checks before anything is allocated: a downloaded file's metadata decides what gets built.

DEFAULT_MAX_PARAMS = 1_600_000_000  # parameters a network may have (EDM2-XXL has ~1.5B)
MAX_PARAMS_ENV = "EDM_FAST_MAX_PARAMS"  # raises (or lowers) the limit for every command


def max_params_limit(max_params: int | None = None) -> int:
    """The network-size limit: ``max_params`` when given, else $EDM_FAST_MAX_PARAMS, else
    DEFAULT_MAX_PARAMS."""
    if max_params is not None:
        return int(max_params)
    raw = os.environ.get(MAX_PARAMS_ENV)
    if raw is None:
        return DEFAULT_MAX_PARAMS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_PARAMS_ENV}={raw!r} is not a positive parameter count")
    return value
MAX_SAMPLE_VALUES = 1 << 24         # values in one sample (e.g. 4 x 2048 x 2048)
_MAX_INT_KWARG = 1 << 16            # any integer network argument (channels, resolution ...)
_MAX_BLOCKS = 64                    # num_blocks, and the length of any list argument
_MAX_PRECOND_STEPS = 100_000        # M of the VP / iDDPM preconditionings (iDDPM tabulates M)
_FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _bad(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}".replace("\n", "\\n").replace("\r", "\\r"))


def _cut(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_net_kwargs(path, kwargs, where="net.kwargs") -> None:
    """Plain JSON values of bounded size: they decide how many modules get built."""
    if isinstance(kwargs, dict):
        for key, value in kwargs.items():
            if key == "num_blocks" and isinstance(value, int) and value > _MAX_BLOCKS:
                raise _bad(path, f"{where}.num_blocks = {value} (at most {_MAX_BLOCKS})")
            _check_net_kwargs(path, value, f"{where}.{key}")
    elif isinstance(kwargs, (list, tuple)):
        if len(kwargs) > _MAX_BLOCKS:
            raise _bad(path, f"{where} lists {len(kwargs)} values (at most {_MAX_BLOCKS})")
        for i, value in enumerate(kwargs):
            _check_net_kwargs(path, value, f"{where}[{i}]")
    elif isinstance(kwargs, bool) or kwargs is None or isinstance(kwargs, str):
        return
    elif isinstance(kwargs, int):
        if not 0 <= kwargs <= _MAX_INT_KWARG:
            raise _bad(path, f"{where} = {kwargs} (expected 0 .. {_MAX_INT_KWARG})")
    elif isinstance(kwargs, float):
        if not math.isfinite(kwargs):
            raise _bad(path, f"{where} = {kwargs} is not finite")
    else:
        raise _bad(path, f"{where} is a {type(kwargs).__name__}")


def _check_sample_shape(path, shape) -> None:
    if not (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 4
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise _bad(path, f"sample_shape {_cut(shape)} is not 1 to 4 positive integers")
    if math.prod(shape) > MAX_SAMPLE_VALUES:
        raise _bad(path, f"sample_shape {list(shape)} holds {math.prod(shape):,} values per "
                   f"sample (at most {MAX_SAMPLE_VALUES:,})")


def _check_precond(path, precond) -> None:
    from ..precond import PRECONDS, make_precond

    name = precond if isinstance(precond, str) else (
        precond.get("name") if isinstance(precond, dict) else None)
    if name not in PRECONDS:
        raise _bad(path, f"unknown preconditioning {_cut(name)}; expected one of "
                   f"{', '.join(sorted(PRECONDS))}")
    if isinstance(precond, dict):
        for key, value in precond.items():
            if key == "name":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise _bad(path, f"precond.{key} = {_cut(value)} is not a number")
            if key in ("M", "num_timesteps") and not 1 <= value <= _MAX_PRECOND_STEPS:
                raise _bad(path, f"precond.{key} = {value} (expected 1 .. "
                           f"{_MAX_PRECOND_STEPS:,})")
    try:
        make_precond(precond)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, IndexError,
            RuntimeError) as exc:
        raise _bad(path, f"precond {_cut(precond)} is invalid: {exc}") from exc


def check_config(meta, path, *, max_params: int | None = None) -> torch.nn.Module:
    """Check a checkpoint's metadata before anything is allocated and return its network built
    on the ``meta`` device (no memory for weights): a known arch with bounded plain kwargs, at
    most ``max_params`` parameters (default: max_params_limit()), a known precond with
    finite values, a positive ``sample_shape`` of at most MAX_SAMPLE_VALUES values.
    CheckpointError (a BadFileError) naming ``path`` otherwise."""
    from ..nets.presets import ARCHS

    if not isinstance(meta, dict):
        raise _bad(path, "its metadata is not a JSON object")
    spec = meta.get("net")
    if not isinstance(spec, dict):
        raise _bad(path, "its metadata has no network spec 'net' (not an edm-fast checkpoint?)")
    if spec.get("arch") not in ARCHS:
        raise _bad(path, f"unknown network architecture {_cut(spec.get('arch'))}; expected one "
                   f"of {', '.join(sorted(ARCHS))}")
    kwargs = spec.get("kwargs")
    if not isinstance(kwargs, dict):
        raise _bad(path, "its network spec has no kwargs")
    _check_net_kwargs(path, kwargs)
    if "precond" not in meta:
        raise _bad(path, "its metadata has no preconditioning 'precond'")
    _check_precond(path, meta["precond"])
    if "sample_shape" in meta:
        _check_sample_shape(path, meta["sample_shape"])
    try:
        with torch.device("meta"):
            net = ARCHS[spec["arch"]](**kwargs)
    except (TypeError, ValueError, KeyError, IndexError, AssertionError, ZeroDivisionError,
            RuntimeError, OverflowError, AttributeError) as exc:
        raise _bad(path, f"its {spec['arch']} network config cannot be built: "
                   f"{type(exc).__name__}: {_cut(str(exc), 200)}") from exc
    count = sum(p.numel() for p in net.parameters())
    limit = max_params_limit(max_params)
    if count > limit:
        raise _bad(path, f"its network would have {count:,} parameters, more than the limit "
                   f"of {limit:,} (set {MAX_PARAMS_ENV}=N or pass max_params=N to allow more)")
    return net


def check_weights(net: torch.nn.Module, weights: dict, path) -> None:
    """``weights`` (name -> tensor, or name -> (shape, dtype)) must match ``net``'s state dict
    exactly: the same keys, shapes, and a floating dtype where the net has one."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''})")
        if extra:
            names = ", ".join(str(k) for k in extra[:3])
            names = names if len(names) <= 200 and names.isprintable() else _cut(names, 200)
            parts.append(f"{len(extra)} unexpected ({names}{', ...' if len(extra) > 3 else ''})")
        raise _bad(path, f"weights do not match the network in its config: "
                   f"{' and '.join(parts)} tensors")
    for key, want in expected.items():
        got = weights[key]
        shape, dtype = ((tuple(got.shape), got.dtype) if isinstance(got, torch.Tensor)
                        else (tuple(got[0]), got[1]))
        if shape != tuple(want.shape):
            raise _bad(path, f"weight {key} has shape {list(shape)}, the network expects "
                       f"{list(want.shape)}")
        ok = dtype in _FLOAT_DTYPES if want.dtype in _FLOAT_DTYPES else dtype == want.dtype
        if not ok:
            raise _bad(path, f"weight {key} is {str(dtype).replace('torch.', '')}, the "
                       f"network expects {str(want.dtype).replace('torch.', '')}")


def check_finite(weights: dict[str, torch.Tensor], path) -> None:
    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _bad(path, f"weight {key} holds NaN/Inf values (a corrupt or hostile file)")


def build_denoiser(meta: dict):
    """A Denoiser (raw net + preconditioning) from checkpoint metadata, weights uninitialised."""
    from ..precond import Denoiser, make_precond

    net = build_net_from_spec(meta["net"])
    return Denoiser(net, make_precond(meta["precond"]))


def _parse_meta(raw, path) -> dict:
    if raw is None:
        raise CheckpointError(f"{path} has no edm-fast metadata; convert it with "
                              "`edm-fast convert` or load it with edm_fast.io.checkpoints APIs")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata is not a JSON object")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer edm-fast (format "
                              f"{_cut(version)} > {FORMAT_VERSION})")
    return meta


def read_inference_weights(path, *, ema: bool = True, max_params: int | None = None):
    """(state, meta): the network weights of a checkpoint (``ema.*``, else ``model.*``; the
    prefix stripped) and its metadata, all checked before the weights are read: the config by
    ``check_config``, the key set, shapes and dtypes from the safetensors header against the
    network built on the meta device, then every value finite."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _parse_meta((f.metadata() or {}).get("edm_fast"), path)
            keys = list(f.keys())
            has_ema = any(k.startswith("ema.") for k in keys)
            prefix = "ema." if ema and has_ema else "model."
            names = [k for k in keys if k.startswith(prefix)]
            if not names:
                raise CheckpointError(f"{path} holds no network weights")
            net = check_config(meta, path, max_params=max_params)
            infos = {}
            for k in names:
                part = f.get_slice(k)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype())
                if dtype is None:
                    raise _bad(path, f"weight {k} has the unsupported dtype {part.get_dtype()}")
                infos[k[len(prefix):]] = (part.get_shape(), dtype)
            check_weights(net, infos, path)
            state = {k[len(prefix):]: f.get_tensor(k) for k in names}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for torn files
        raise UnreadableCheckpointError(f"{path} is not a readable safetensors checkpoint "
                                        f"(truncated or corrupt?): "
                                        f"{_cut(str(exc), 300)}") from exc
    check_finite(state, path)
    return state, meta


def class_names(denoiser) -> list[str]:
    """The class names a checkpoint stores (its data's folder names; '0'..'9' for the digits),
    index i naming label i; [] when it stores none."""
    return list(model_card(denoiser).class_names)


def checkpoint_file(path) -> Path:
    """``path`` itself, or for a run folder its latest checkpoint (CheckpointError if none)."""
    path = Path(path)
    if not path.is_dir():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no ckpt-*.safetensors in {path}")
    return latest


def load_denoiser_checkpoint(path, *, device="cpu", ema: bool = True,
                             max_params: int | None = None):
    """The Denoiser stored in a checkpoint file (or a run folder's latest), in eval mode.

    ema=True takes the EMA weights (what one samples with); falls back to the training weights
    when the file has no EMA. Everything is checked before the network is built (see
    ``read_inference_weights``); ``max_params`` bounds the network's size.
    """
    path = checkpoint_file(path)
    state, meta = read_inference_weights(path, ema=ema, max_params=max_params)
    try:
        denoiser = build_denoiser(meta)
        denoiser.model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: weights do not match the network in its config: "
                              f"{_cut(str(exc), 300)}") from exc
    denoiser = denoiser.to(device).eval().requires_grad_(False)
    return record_card(denoiser, ModelCard.from_config(meta, source=path))


def export_inference_checkpoint(src, dst, *, dtype: torch.dtype | None = None,
                                max_params: int | None = None) -> Path:
    """Write only the EMA weights (and the config) of a training checkpoint or run folder.

    The result is what ``edm-fast sample --ckpt`` loads and what the bundled models are; its
    metadata keeps the network, preconditioning, data and training settings, not the optimizer
    or data-stream state. ``dtype`` (e.g. torch.float16) shrinks the file. The source is
    checked as ``load_denoiser_checkpoint`` checks it; nothing is written unless it passes.
    """
    src = checkpoint_file(src)
    state, meta = read_inference_weights(src, ema=True, max_params=max_params)
    keep = {f"ema.{k}": (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
            for k, v in state.items()}
    meta = {k: v for k, v in meta.items() if k not in ("optimizer", "stream")}
    return save_checkpoint(dst, keep, meta)
