"""Official NVlabs/edm and NVlabs/edm2 snapshots, read without running their code.

An official snapshot (``edm-cifar10-32x32-cond-vp.pkl``, ``network-snapshot-*.pkl``) is a pickle
of ``{'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}``; a ``training-state-*.pt`` is a torch
zip archive of ``{'net', 'optimizer_state'}``. Every network object in them is pickled by
``torch_utils.persistence`` as a call ``_reconstruct_persistent_obj(meta)`` with
``meta = {type, version, module_src, class_name, state}``: loading it the usual way ``exec``s
``module_src``. Here the file is read by edm_fast.io.official_pickle's ``RestrictedUnpickler``,
which turns each such object into an inert ``ModuleRecord`` (edm_fast.io.official_records):
nothing from ``torch_utils``, ``dnnlib`` or the file is imported or executed.

The records then give the exact official state dict (``model.*`` keys) and a config: the
precond class + kwargs select ``edm_fast.precond`` (EDM, VP, VE, iDDPM of EDM Table 1) and the
inner network (``SongUNet`` -> 'ddpmpp' | 'ncsnpp', ``DhariwalUNet`` -> 'adm') is rebuilt from
its recorded constructor kwargs and loaded with ``strict=True``. EDM2's ``Precond`` (its
``unet`` and log-variance head) maps to the 'edm2' arch in edm_fast.io.official_edm2.

    read_official(path) -> (state_dict, config)     load_official(path) -> Denoiser
    convert_official(src, dst) -> edm-fast inference checkpoint (ema.* + config metadata)
    read_official_edm2(path) -> (EDM2Net state dict, config), checked
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoints import (DEFAULT_MAX_PARAMS, CheckpointError, build_denoiser, check_config,
                          check_finite, check_weights, save_checkpoint)
from .model_card import ModelCard, record_card
from .official_edm2 import edm2_config
from .official_pickle import (RestrictedUnpickler, cut_text, file_error_message, one_line_error,
                              read_pickle_file, read_state_dict)
from .official_records import (PARSE_ERRORS, ModuleRecord, OfficialFormatError,
                               UnsafePickleError, plain_value, record_arg, short_text)
from ..precond import make_precond

__all__ = [
    "read_official", "load_official", "convert_official", "denoiser_state_dict",
    "read_official_edm2", "read_state_dict",
    "RestrictedUnpickler", "ModuleRecord", "UnsafePickleError", "OfficialFormatError",
]


# ------------------------------------------------------------------------------------------
# From records to edm-fast: precond (EDM Table 1) and network (EDM App. F) configs.

# official precond class -> (edm-fast precond name, {argument: official default})
_PRECONDS = {
    "EDMPrecond": ("edm", {"sigma_data": 0.5, "sigma_min": 0.0, "sigma_max": math.inf}),
    "VPPrecond": ("vp", {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}),
    "VEPrecond": ("ve", {"sigma_min": 0.02, "sigma_max": 100.0}),
    "iDDPMPrecond": ("iddpm", {"C_1": 0.001, "C_2": 0.008, "M": 1000}),
}
_DEFAULT_MODEL = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet",
                  "VEPrecond": "SongUNet", "iDDPMPrecond": "DhariwalUNet"}
_WRAPPER_ARGS = {"img_resolution", "img_channels", "label_dim", "use_fp16", "model_type"}

# official network class -> its keyword arguments with their defaults (training/networks.py)
_MODEL_ARGS = {
    "SongUNet": dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2],
                     channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.10,
                     label_dropout=0, embedding_type="positional", channel_mult_noise=1,
                     encoder_type="standard", decoder_type="standard", resample_filter=[1, 1]),
    "DhariwalUNet": dict(label_dim=0, augment_dim=0, model_channels=192,
                         channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                         attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0),
}
_SHAPE_ARGS = ("img_resolution", "in_channels", "out_channels")


def _select_network(root) -> tuple[ModuleRecord, str]:
    if isinstance(root, ModuleRecord):
        return root, "network"
    if isinstance(root, dict):
        for key in ("ema", "net"):
            if isinstance(root.get(key), ModuleRecord):
                return root[key], key
    raise OfficialFormatError("expected an official EDM snapshot: a dict with 'ema' "
                              "(network-snapshot-*.pkl) or 'net' (training-state-*.pt)")


def _precond_config(wrapper: ModuleRecord) -> dict:
    """edm-fast precond config from an official EDM/VP/VE/iDDPMPrecond (EDM Table 1)."""
    if wrapper.class_name not in _PRECONDS:
        raise OfficialFormatError(f"unsupported network class {short_text(wrapper.class_name)}; "
                                  f"expected one of {', '.join(sorted(_PRECONDS))}")
    name, defaults = _PRECONDS[wrapper.class_name]
    config = {k: float(record_arg(wrapper, k, d)) for k, d in defaults.items()}
    if "M" in config:
        config["M"] = int(config["M"])
    return {"name": name, **config}


def _model_record(wrapper: ModuleRecord) -> ModuleRecord:
    _precond_config(wrapper)  # a supported wrapper class, before anything else is looked up
    model = wrapper.children.get("model")
    if not isinstance(model, ModuleRecord):
        raise OfficialFormatError(f"{wrapper.class_name} has no inner network 'model'")
    expected = record_arg(wrapper, "model_type", _DEFAULT_MODEL[wrapper.class_name])
    if model.class_name != expected or model.class_name not in _MODEL_ARGS:
        raise OfficialFormatError(f"unsupported inner network {short_text(model.class_name)} "
                                  f"(model_type {short_text(expected)}); supported: "
                                  f"{', '.join(sorted(_MODEL_ARGS))}")
    return model


def _model_kwargs(wrapper: ModuleRecord, model: ModuleRecord) -> dict:
    """The inner network's full official constructor kwargs: its recorded ``_init_kwargs``, or
    (when not recorded) the wrapper's extra kwargs, over the official defaults."""
    given = dict(model.init_kwargs)
    if not given:  # rebuild what the wrapper passed: globals()[model_type](...)
        channels = int(record_arg(wrapper, "img_channels"))
        factor = 2 if wrapper.class_name == "iDDPMPrecond" else 1
        given = {k: v for k, v in wrapper.init_kwargs.items()
                 if k not in _WRAPPER_ARGS and k not in _PRECONDS[wrapper.class_name][1]}
        given.update(img_resolution=record_arg(wrapper, "img_resolution"), in_channels=channels,
                     out_channels=channels * factor, label_dim=record_arg(wrapper, "label_dim", 0))
    unknown = sorted(set(given) - set(_MODEL_ARGS[model.class_name]) - set(_SHAPE_ARGS))
    if unknown:
        raise OfficialFormatError(f"{model.class_name} argument(s) {unknown} are not supported")
    missing = [k for k in _SHAPE_ARGS if given.get(k) is None]
    if missing:
        raise OfficialFormatError(f"{model.class_name} kwargs lack {missing}")
    return {**_MODEL_ARGS[model.class_name], **plain_value(given)}


def _net_spec(model_class: str, official: dict, img_channels: int) -> dict:
    """edm-fast network spec (arch + full kwargs); out_channels = img_channels (iDDPM's extra
    variance channels are dropped by ``denoiser_state_dict``)."""
    kwargs = {**official, "out_channels": img_channels}
    if model_class == "DhariwalUNet":
        return {"arch": "adm", "preset": None, "kwargs": {**kwargs, "channels_per_head": 64}}
    arch = "ncsnpp" if kwargs["embedding_type"] == "fourier" else "ddpmpp"
    return {"arch": arch, "preset": None, "kwargs": kwargs}


def _check_u(state: dict, precond: dict) -> None:
    """iDDPM's official ``u`` buffer (float32 recursion) must match edm-fast's float64 table;
    rtol 1e-3 covers float32 cancellation in (u_j^2 + 1) / ratio - 1 near sigma_min."""
    ours = make_precond(precond).u
    theirs = state.pop("u", None)
    if theirs is None or theirs.shape != ours.shape or not torch.allclose(
            theirs.double(), ours, rtol=1e-3, atol=1e-6):
        raise OfficialFormatError("the snapshot's iDDPM u table does not match C_1, C_2, M")


def _config(wrapper: ModuleRecord, model: ModuleRecord, root, path: Path, source: str) -> dict:
    precond = _precond_config(wrapper)
    official = _model_kwargs(wrapper, model)
    channels = int(record_arg(wrapper, "img_channels", official["in_channels"]))
    resolution = int(record_arg(wrapper, "img_resolution", official["img_resolution"]))
    factor = 2 if wrapper.class_name == "iDDPMPrecond" else 1  # iDDPM: mean + variance
    if (official["in_channels"], official["out_channels"]) != (channels, channels * factor):
        raise OfficialFormatError(f"{model.class_name} maps {official['in_channels']} to "
                                  f"{official['out_channels']} channels; {wrapper.class_name} "
                                  f"expects {channels} to {channels * factor}")
    dataset = root.get("dataset_kwargs") if isinstance(root, dict) else None
    return {
        "net": _net_spec(model.class_name, official, channels),
        "precond": precond,
        "sample_shape": [channels, resolution, resolution],
        "official": {
            "file": path.name, "object": source, "precond_class": wrapper.class_name,
            "model_class": model.class_name,
            "use_fp16": bool(record_arg(wrapper, "use_fp16", False)),
            "precond_kwargs": plain_value(wrapper.init_kwargs), "model_kwargs": official,
            "persistence_version": plain_value(wrapper.version),
            "module_src_sha256": wrapper.source_sha256,
            "dataset_kwargs": plain_value(dataset) if isinstance(dataset, dict) else None,
        },
    }


def read_official(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, config) of an official snapshot (.pkl) or training state (.pt).

    state_dict: the official wrapper's tensors under their official keys (``model.*``), minus
    iDDPM's ``u`` buffer (checked against ``precond.iDDPMPrecond``). config: edm-fast checkpoint
    metadata (``net``, ``precond``, ``sample_shape``) plus ``official`` (source classes, their
    kwargs, use_fp16, dataset_kwargs). Nothing in the file is imported or executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no official snapshot at {path}")
    stage = "read"
    try:
        root = read_pickle_file(path)
        stage = "rebuild"
        wrapper, source = _select_network(root)
        state = wrapper.state_dict()
        total = sum(t.numel() * t.element_size() for t in state.values())
        if total > path.stat().st_size:
            raise OfficialFormatError(f"its tensors hold {total:,} bytes, more than the file's "
                                      f"{path.stat().st_size:,} (shared or overlapping views)")
        if _is_edm2(wrapper):
            return state, edm2_config(wrapper, root, path, source)
        model = _model_record(wrapper)
        config = _config(wrapper, model, root, path, source)
        if config["precond"]["name"] == "iddpm":
            _check_u(state, config["precond"])
    except (UnsafePickleError, OfficialFormatError) as exc:
        raise type(exc)(file_error_message(exc, path)) from exc  # name the file, one line
    except (*PARSE_ERRORS, MemoryError, RecursionError) as exc:
        if stage == "read":
            raise CheckpointError(f"{path} is not a valid NVlabs EDM snapshot (.pkl) or "
                                  "training state (.pt): not a readable pickle snapshot "
                                  f"(truncated or corrupt?): {cut_text(one_line_error(exc))}"
                                  ) from exc
        # a look-alike file: e.g. a constructor argument of the wrong type
        raise OfficialFormatError(f"{path} is not a valid NVlabs EDM snapshot: "
                                  f"{cut_text(one_line_error(exc))}") from exc
    return state, config


def _is_edm2(wrapper: ModuleRecord) -> bool:
    """NVlabs/edm2's ``Precond`` (its U-Net is the child ``unet``, not ``model``)."""
    return wrapper.class_name == "Precond" and "unet" in wrapper.children


def denoiser_state_dict(state: dict, config: dict) -> dict[str, torch.Tensor]:
    """The state dict of edm-fast's network F: ``model.`` stripped; for iDDPM, the output rows
    of the learned-variance channels dropped (F[:, :C] is all the official D uses; each output
    channel of the last conv depends only on its own weight rows, so this is exact). EDM2's
    keys are those of edm-fast's EDM2Net already (``unet.*``, ``logvar_*``)."""
    if config["net"]["arch"] == "edm2":
        return dict(state)
    net = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    extra = set(state) - {f"model.{k}" for k in net}
    if extra:
        raise OfficialFormatError(f"unexpected tensors outside the network: {sorted(extra)}")
    channels = config["net"]["kwargs"]["out_channels"]
    if config["official"]["model_kwargs"]["out_channels"] != channels:
        for key, value in net.items():
            if key.startswith("out_conv.") or ("_aux_conv." in key and key.startswith("dec.")):
                net[key] = value[:channels]
    return net


def _checked(path, max_params: int | None) -> tuple[dict[str, torch.Tensor], dict]:
    """(edm-fast network state dict, config) of an official file, checked as
    ``checkpoints.read_inference_weights`` checks an edm-fast file before anything is built:
    the config (size of the network, sample shape), the key set, shapes, floating dtypes and
    finite values of the weights."""
    state, config = read_official(path)
    net = denoiser_state_dict(state, config)
    meta_net = check_config(config, path, max_params=max_params)
    check_weights(meta_net, net, path)
    check_finite(net, path)
    return net, config


def load_official(path, *, device="cpu", use_fp16: bool | None = None,
                  max_params: int | None = None):
    """The official snapshot as an edm-fast ``Denoiser`` in eval mode on ``device``.

    use_fp16=None follows the snapshot: the official wrappers run F in float16 on CUDA when
    their ``use_fp16`` is set, and in float32 otherwise (always on CPU). ``max_params`` bounds
    the network's size (default ``checkpoints.max_params_limit()``).
    """
    net, config = _checked(path, max_params)
    denoiser = build_denoiser(config)
    try:
        denoiser.model.load_state_dict(net, strict=True)
    except RuntimeError as exc:
        raise OfficialFormatError(f"{path}: weights do not match the rebuilt network: "
                                  f"{cut_text(one_line_error(exc))}") from exc
    device = torch.device(device)
    fp16 = config["official"]["use_fp16"] if use_fp16 is None else use_fp16
    denoiser.net_dtype = torch.float16 if fp16 and device.type == "cuda" else None
    denoiser = denoiser.to(device).eval().requires_grad_(False)
    return record_card(denoiser, ModelCard.from_config(config, source=path))


def convert_official(src, dst, *, dtype: torch.dtype | None = None,
                     max_params: int | None = None) -> Path:
    """Write an official snapshot as an edm-fast inference checkpoint: ``ema.*`` weights (cast
    to ``dtype`` when given) and the ``read_official`` config as metadata. The snapshot is
    checked as ``load_official`` checks it; nothing is written unless it passes."""
    net, config = _checked(src, max_params)
    tensors = {f"ema.{k}": (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               .contiguous().clone() for k, v in net.items()}
    config = {**config, "converted_from": Path(src).name}
    return save_checkpoint(dst, tensors, config)


def read_official_edm2(path, *, max_params: int | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    """(EDM2Net state dict, config) of an NVlabs/edm2 snapshot, checked as every official file
    is (config, network size, keys, shapes, dtypes, finite values) before it is returned."""
    state, config = _checked(Path(path), DEFAULT_MAX_PARAMS if max_params is None
                             else max_params)
    if config["net"]["arch"] != "edm2":
        raise OfficialFormatError(f"{path} is an NVlabs/edm (EDM1) snapshot, not an EDM2 one")
    return state, config
