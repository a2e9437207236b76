"""Denoiser networks F of EDM (Karras et al. 2022, App. F): DDPM++/NCSN++, ADM, and a toy MLP;
and EDM2's magnitude-preserving U-Net (Karras et al. 2024, `edm2.EDM2Net`, whose names match
NVlabs/edm2's `Precond`: its official state dicts load as they are).

Module, parameter and buffer names match NVlabs/edm `training/networks.py`, so the official state
dicts (with the `model.` prefix of the preconditioner removed) load with `strict=True`.
Forward signature of every net: `net(x, noise_labels, class_labels=None, augment_labels=None)`.
"""

from .dhariwal_unet import DhariwalUNet
from .edm2 import EDM2Net
from .layers import set_attention_impl
from .mlp import MLP
from .presets import PRESETS, NetPreset, build_net, get_preset
from .song_unet import SongUNet

__all__ = ['SongUNet', 'DhariwalUNet', 'MLP', 'EDM2Net', 'NetPreset', 'PRESETS', 'get_preset',
           'build_net', 'set_attention_impl']
