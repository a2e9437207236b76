"""Model names and paths -> ready denoisers D(x, sigma, class_labels).

    toy-gmm, toy-gmm2d   the exact denoiser of the 2-D ring mixture (edm_fast.nets.toy)
    toy-gmm1d            the exact denoiser of the 1-D bimodal mixture
    default              the bundled class-conditional EDM model trained on the digits
    default-ddpm         the bundled DDPM model (same net and data) for comparisons
    PATH.safetensors     an edm-fast checkpoint (config in its metadata); an EDM2 network's
                         weight normalisation is applied once at load (inference only)
    PATH (folder)        a training run folder: its latest checkpoint
    PATH.pkl, PATH.pt    an official NVlabs EDM snapshot or training-state archive (loaded
                         without executing the code it embeds)
"""

from __future__ import annotations

from pathlib import Path

from .checkpoints import class_names
from .model_card import model_card, record_card
from ..nets.toy import MIXTURES

__all__ = ["load_denoiser", "load_model", "MODEL_NAMES", "ASSETS", "bundled_path", "model_mixture",
           "class_names", "exported_format"]

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUNDLED = {"default": "edm-digits.safetensors", "default-ddpm": "ddpm-digits.safetensors"}
TOYS = {"toy-gmm": "gmm2d", "toy-gmm2d": "gmm2d", "toy-gmm1d": "gmm1d"}
MODEL_NAMES = sorted([*BUNDLED, *TOYS])


def bundled_path(name: str) -> Path:
    return ASSETS / BUNDLED[name]


def model_mixture(spec: str):
    """The GaussianMixture behind a toy model name, else None."""
    return MIXTURES[TOYS[spec]]() if spec in TOYS else None


EXPORT_SUFFIXES = {".onnx": "ONNX", ".pt2": "AOTInductor", ".ts": "TorchScript",
                   ".torchscript": "TorchScript", ".xml": "OpenVINO"}


def exported_format(path) -> str | None:
    """'ONNX', 'AOTInductor' or 'TorchScript' for a file an export wrote (by its suffix), else
    None: such a file is for deployment, not a checkpoint to sample, convert or re-export."""
    return EXPORT_SUFFIXES.get(Path(path).suffix.lower())


def load_model(spec, *, device="cpu", ema: bool = True):
    """(denoiser, model card) of a name or path (see the module docstring): the module on
    ``device`` in eval mode, and what its file says about it (``edm_fast.io.model_card``)."""
    denoiser = load_denoiser(spec, device=device, ema=ema)
    return denoiser, model_card(denoiser)


def load_denoiser(spec, *, device="cpu", ema: bool = True):
    """Load a denoiser by name or path (see the module docstring) onto ``device``, eval mode;
    ``model_card(denoiser)`` (or ``load_model``) gives its card."""
    spec_str = str(spec)
    if spec_str in TOYS:
        return model_mixture(spec_str).as_denoiser()
    if spec_str in BUNDLED:
        path = bundled_path(spec_str)
        if not path.exists():
            raise FileNotFoundError(f"the bundled model {spec_str!r} is missing from this install "
                                    f"({path}); reinstall edm-fast or pass --ckpt PATH")
    else:
        path = Path(spec_str).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no model or checkpoint at {spec_str!r}; use a path or one "
                                    f"of {', '.join(MODEL_NAMES)}")
    if exported_format(path):
        from .exported import LOADABLE_SUFFIXES, ExportedDenoiser

        if path.suffix.lower() in LOADABLE_SUFFIXES:  # AOTInductor / TorchScript: D itself
            return ExportedDenoiser(path)
        raise ValueError(f"{path} is an exported model ({exported_format(path)}), "
                         "for deployment (ONNX Runtime, OpenVINO, the C++ tool "
                         "edm_fast_sample); sample "
                         "with the .safetensors checkpoint it was exported from, or an "
                         "AOTInductor (.pt2) or TorchScript (.ts) export")
    if path.suffix in (".pkl", ".pt"):  # official snapshot / training-state archive
        from .official import load_official

        return _for_inference(load_official(path, device=device))
    from .checkpoints import load_denoiser_checkpoint

    return _for_inference(load_denoiser_checkpoint(path, device=device, ema=ema))


def _for_inference(denoiser):
    """An EDM2 network gets its weight normalisation applied once here (edm_fast.nets.edm2);
    the card stays with the module that is returned."""
    from ..nets.edm2_precond import bake_for_inference

    baked = bake_for_inference(denoiser)
    return baked if baked is denoiser else record_card(baked, model_card(denoiser))
