"""Official NVlabs/edm2 snapshots (``edm2-img512-*.pkl``, ``edm2-img64-*.pkl``, EMA-reconstructed
or raw ``*-KIMG-SIGMA.pkl``) as edm-fast configs, from the inert records that
edm_fast.io.official_pickle's restricted unpickler reads (it never runs their code);
edm_fast.io.official dispatches here and checks and loads the result
(``official.read_official_edm2``).

A snapshot is a pickle of ``{'ema': Precond, 'encoder': StabilityVAEEncoder |
StandardRGBEncoder, 'dataset_kwargs', 'loss_fn'}``. ``Precond`` (EDM preconditioning, sigma_data
0.5) holds the U-Net ``unet`` and the log-variance head ``logvar_fourier``/``logvar_linear``: its
state dict is that of edm-fast's ``EDM2Net`` key for key, and its recorded constructor kwargs
rebuild one (the 'edm2' arch). The config keeps the encoder: img512 nets generate 64x64x4 latents
of the Stable Diffusion VAE (``vae_name``), scaled by ``scale`` and shifted by ``bias`` per
channel; decoding them to pixels needs that VAE, which edm-fast does not ship (see docs/EDM2.md).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

from .official_records import ModuleRecord, OfficialFormatError, plain_value, record_arg, short_text

__all__ = ["edm2_config", "EDM2_ENCODERS"]

EDM2_ENCODERS = ("StabilityVAEEncoder", "StandardRGBEncoder")
_PRECOND_ARGS = {"img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data",
                 "logvar_channels"}


def _edm2_net_args() -> set[str]:
    from ..nets.edm2 import EDM2Net

    params = set(inspect.signature(EDM2Net.__init__).parameters)
    return params - {"self", "img_resolution", "in_channels", "out_channels", "label_dim",
                     "augment_dim", "logvar_channels"}


def _encoder(root) -> dict | None:
    """The latent encoder of the snapshot: class, VAE name, per-channel scale and bias."""
    record = root.get("encoder") if isinstance(root, dict) else None
    if not isinstance(record, ModuleRecord):
        return None
    if record.class_name not in EDM2_ENCODERS:
        raise OfficialFormatError(f"unsupported encoder class {short_text(record.class_name)}; "
                                  f"expected one of {', '.join(EDM2_ENCODERS)}")
    info = {"class": record.class_name}
    for key in ("vae_name", "scale", "bias", "batch_size"):
        if key in record.attrs:
            info[key] = plain_value(record.attrs[key])
    for key in ("scale", "bias"):
        value = info.get(key)
        if value is not None and not (isinstance(value, list) and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
            raise OfficialFormatError(f"the encoder's {key} is not a list of finite numbers")
    return info


def edm2_config(wrapper: ModuleRecord, root, path: Path, source: str) -> dict:
    """edm-fast checkpoint metadata for an NVlabs/edm2 ``Precond`` record: the 'edm2' network
    spec from its constructor kwargs, EDM preconditioning with its sigma_data, the sample shape
    and the ``official`` block (classes, kwargs, use_fp16, encoder, dataset_kwargs)."""
    kwargs = dict(wrapper.init_kwargs)
    for name in ("img_resolution", "img_channels"):
        value = record_arg(wrapper, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise OfficialFormatError(f"Precond has no integer {name}")
    channels = int(record_arg(wrapper, "img_channels"))
    resolution = int(record_arg(wrapper, "img_resolution"))
    unet_kwargs = {k: v for k, v in kwargs.items() if k not in _PRECOND_ARGS}
    unknown = sorted(set(unet_kwargs) - _edm2_net_args())
    if unknown:
        raise OfficialFormatError(f"EDM2 U-Net argument(s) {[short_text(k) for k in unknown]} are "
                                  "not supported")
    sigma_data = record_arg(wrapper, "sigma_data", 0.5)
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) \
            or not 0 < sigma_data < math.inf:
        raise OfficialFormatError(f"Precond sigma_data {short_text(repr(sigma_data))} is not a "
                                  "positive number")
    net_kwargs = {**plain_value(unet_kwargs), "img_resolution": resolution,
                  "in_channels": channels, "out_channels": channels,
                  "label_dim": plain_value(record_arg(wrapper, "label_dim", 0)),
                  "augment_dim": 0,
                  "logvar_channels": plain_value(record_arg(wrapper, "logvar_channels", 128))}
    dataset = root.get("dataset_kwargs") if isinstance(root, dict) else None
    unet = wrapper.children.get("unet")
    return {
        "net": {"arch": "edm2", "preset": None, "kwargs": net_kwargs},
        "precond": {"name": "edm", "sigma_data": float(sigma_data), "sigma_min": 0.0,
                    "sigma_max": math.inf},
        "sample_shape": [channels, resolution, resolution],
        "official": {
            "file": path.name, "object": source, "precond_class": "Precond",
            "model_class": unet.class_name if isinstance(unet, ModuleRecord) else None,
            "use_fp16": bool(record_arg(wrapper, "use_fp16", True)),
            "precond_kwargs": plain_value(kwargs), "model_kwargs": net_kwargs,
            "persistence_version": plain_value(wrapper.version),
            "module_src_sha256": wrapper.source_sha256,
            "encoder": _encoder(root),
            "dataset_kwargs": plain_value(dataset) if isinstance(dataset, dict) else None,
        },
    }
