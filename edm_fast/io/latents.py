"""Latents of official EDM2 img512 models decoded to images with a VAE that the user supplies.

EDM2's img512 networks (Karras et al. 2024, arXiv 2312.02696) work in the latent space of the
Stable Diffusion VAE ``stabilityai/sd-vae-ft-mse``. NVlabs' ``StabilityVAEEncoder``
(NVlabs/edm2 training/encoders.py) feeds the VAE pixels / 255 in [0, 1] and standardises its raw
latents z per channel into the network's latents x = z * scale + bias (scale = 0.5 / raw std,
bias = -raw mean * scale). The model card of a loaded snapshot keeps that record
(``card.config["official"]["encoder"]``); decoding inverts it:

    z = (x - bias) / scale                      per channel
    pixels = vae.decode(z).sample               in [0, 1] (NVlabs clamps, then * 255)
    images = 2 * pixels - 1                     edm-fast's convention: [-1, 1]

The VAE is diffusers' ``AutoencoderKL`` (the ``vae`` extra), read from a local folder only:

    vae = load_vae("sd-vae-ft-mse")             # config.json + diffusion_pytorch_model.safetensors
    sampler = Sampler("edm2-img512-xs.safetensors", batch_size=8)
    images = decode_latents(sampler(seeds=range(8)), vae, sampler.model_card)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..device import resolve_device
from ..errors import BadFileError, EdmFastError
from ..optional import MissingDependency
from .model_card import ModelCard, model_card

__all__ = ["LatentDecodingError", "VaeFolderError", "encoder_record", "latent_encoder",
           "load_vae", "check_vae", "decode_latents", "VAE_ENCODER", "VAE_INSTALL"]

VAE_ENCODER = "StabilityVAEEncoder"  # the official encoder class whose latents a VAE decodes
VAE_INSTALL = 'python -m pip install "edm-fast[vae]"'
DEFAULT_BATCH = 8  # NVlabs' StabilityVAEEncoder batch_size
_EXPECTED = ("expected a local diffusers AutoencoderKL folder (save_pretrained layout: "
             "config.json and diffusion_pytorch_model.safetensors), e.g. a copy of "
             "stabilityai/sd-vae-ft-mse")
_WEIGHTS = "diffusion_pytorch_model.safetensors"


class LatentDecodingError(EdmFastError):
    """Latents that cannot be decoded: a model without a VAE encoder record, or latents, record
    and VAE that disagree (channels, shape, dtype)."""


class VaeFolderError(BadFileError):
    """A VAE folder that is missing or does not hold a diffusers AutoencoderKL."""


def _card(model) -> ModelCard | Mapping:
    """A ModelCard as it is, the card of a denoiser module or of a Sampler (``.model_card``);
    a plain mapping is taken as the encoder record itself."""
    if isinstance(model, (ModelCard, Mapping)):
        return model
    if isinstance(model, nn.Module):
        return model_card(model)
    card = getattr(model, "model_card", None)
    if isinstance(card, ModelCard):
        return card
    raise TypeError(f"expected a ModelCard, a denoiser, a Sampler or an encoder record, got "
                    f"{type(model).__name__}")


def encoder_record(model) -> Mapping | None:
    """The official encoder record of a model (its card, denoiser or Sampler): class,
    ``vae_name``, per-channel ``scale`` and ``bias``; None when its file records none."""
    card = _card(model)
    if not isinstance(card, ModelCard):
        return card
    official = card.config.get("official")
    record = official.get("encoder") if isinstance(official, Mapping) else None
    return record if isinstance(record, Mapping) else None


def latent_encoder(model) -> Mapping:
    """The encoder record of a latent model, checked: a ``StabilityVAEEncoder`` with as many
    finite scales (none zero) as biases; LatentDecodingError for any other model."""
    card = _card(model)
    record = encoder_record(card)
    source = card.source if isinstance(card, ModelCard) and card.source else "the model"
    if record is None:
        raise LatentDecodingError(f"{source} records no VAE encoder: it is not a latent model "
                                  "(only official EDM2 img512 models generate VAE latents)")
    kind = record.get("class")
    if kind != VAE_ENCODER:
        raise LatentDecodingError(f"{source} records the encoder {kind!r}, not {VAE_ENCODER}: "
                                  "its samples are images already, not VAE latents")
    scale, bias = record.get("scale"), record.get("bias")
    if not (_numbers(scale) and _numbers(bias) and len(scale) == len(bias) > 0
            and 0 not in scale):
        raise LatentDecodingError(f"{source}'s encoder record needs per-channel scale and bias "
                                  "lists of one length (scales non-zero)")
    return record


def _numbers(values) -> bool:
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values)


def _diffusers():
    try:
        import diffusers
    except ImportError as exc:
        raise MissingDependency("decoding latents needs diffusers, which is not installed: "
                                f"{VAE_INSTALL}") from exc
    return diffusers


def load_vae(folder, *, device="cpu", dtype: torch.dtype | None = None):
    """A diffusers ``AutoencoderKL`` from a local folder in the ``save_pretrained`` layout
    (config.json and diffusion_pytorch_model.safetensors; never downloaded, no pickled .bin),
    in eval mode without gradients, on ``device`` ('auto' picks one) in ``dtype`` (default:
    as stored). MissingDependency without diffusers; VaeFolderError for a folder that is
    missing or holds no AutoencoderKL."""
    diffusers = _diffusers()
    folder = Path(folder).expanduser()
    hint = ("; for a pipeline folder name its vae/ subfolder"
            if (folder / "vae" / "config.json").is_file() else "")
    if not folder.is_dir():
        raise VaeFolderError(f"VAE folder {folder} does not exist: {_EXPECTED}")
    if not (folder / "config.json").is_file():
        raise VaeFolderError(f"{folder} has no config.json: {_EXPECTED}{hint}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise VaeFolderError(f"{folder}/config.json is not readable JSON: {_EXPECTED}") from exc
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":
        raise VaeFolderError(f"{folder} holds a {kind or 'model of unnamed class'}, not an "
                             f"AutoencoderKL: {_EXPECTED}{hint}")
    if not (folder / _WEIGHTS).is_file():
        raise VaeFolderError(f"{folder} has no {_WEIGHTS}: {_EXPECTED}")
    import importlib.util

    try:
        vae = diffusers.AutoencoderKL.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, torch_dtype=dtype,
            # without accelerate, diffusers would warn at length and load the plain way anyway
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VaeFolderError(f"{folder}: diffusers cannot load it as an AutoencoderKL "
                             f"({first})") from exc
    return vae.eval().requires_grad_(False).to(resolve_device(device))


def _latent_channels(vae) -> int:
    channels = getattr(getattr(vae, "config", None), "latent_channels", None)
    if not callable(getattr(vae, "decode", None)) or not isinstance(channels, int):
        raise TypeError(f"expected a diffusers AutoencoderKL, got {type(vae).__name__}")
    return channels


def check_vae(vae, model, channels: int | None = None) -> Mapping:
    """The checked encoder record of ``model`` (see ``latent_encoder``), after making sure that
    ``vae``'s latent_channels, the record's channels and ``channels`` (the latents', when
    given) agree: LatentDecodingError if not."""
    record = latent_encoder(model)
    vae_channels, record_channels = _latent_channels(vae), len(record["scale"])
    if vae_channels != record_channels or channels not in (None, record_channels):
        given = "" if channels is None else f", the latents {channels}"
        raise LatentDecodingError(f"channel mismatch: the VAE has {vae_channels} latent "
                                  f"channels, the model's encoder record {record_channels}"
                                  f"{given} (is it the VAE {record.get('vae_name', '?')}?)")
    return record


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae, model, *, batch_size: int | None = None
                   ) -> torch.Tensor:
    """Latents (N, C, h, w) of a latent model (its ModelCard, denoiser or Sampler; or the encoder
    record) -> images (N, 3, H, W) in [-1, 1] (not clipped: the image writers clip), decoded by
    ``vae`` in chunks of ``batch_size`` (default: the record's, else 8). Decoding runs on the
    latents' device in their dtype: ``vae`` is moved there (``Module.to``, in place)."""
    if not torch.is_tensor(latents) or latents.ndim != 4 or not latents.is_floating_point():
        raise LatentDecodingError("expected latents as a floating-point tensor (N, C, H, W), got "
                                  f"{getattr(latents, 'dtype', type(latents).__name__)} "
                                  f"{tuple(getattr(latents, 'shape', ()))}")
    if len(latents) == 0:
        raise LatentDecodingError("no latents to decode (the batch is empty)")
    record = check_vae(vae, model, latents.shape[1])
    recorded = record.get("batch_size")
    if batch_size is None:
        batch_size = recorded if isinstance(recorded, int) and recorded > 0 else DEFAULT_BATCH
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LatentDecodingError(f"the VAE batch size must be at least 1, got {batch_size}")
    weight = next(vae.parameters(), None)
    if weight is not None and (weight.device, weight.dtype) != (latents.device, latents.dtype):
        vae.to(device=latents.device, dtype=latents.dtype)  # diffusers warns on a dtype change
    # the affine map in float32 at least, as NVlabs' decode does, then the VAE in the latents'
    # dtype; per channel: z = (x - bias) / scale inverts x = z * scale + bias
    work = torch.promote_types(latents.dtype, torch.float32)
    scale = torch.tensor(record["scale"], dtype=work, device=latents.device).reshape(1, -1, 1, 1)
    bias = torch.tensor(record["bias"], dtype=work, device=latents.device).reshape(1, -1, 1, 1)
    raw = ((latents.to(work) - bias) / scale).to(latents.dtype)
    pixels = torch.cat([vae.decode(chunk).sample for chunk in raw.split(batch_size)])
    return pixels * 2 - 1  # [0, 1], the VAE's pixels in NVlabs' convention -> [-1, 1]
