"""Denoiser networks F of EDM (Karras et al. 2022, App. F): DDPM++/NCSN++, ADM, and a toy MLP.

Module, parameter and buffer names match NVlabs/edm `training/networks.py`, so the official state
dicts (with the `model.` prefix of the preconditioner removed) load with `strict=True`.
Forward signature of every net: `net(x, noise_labels, class_labels=None, augment_labels=None)`.
"""

from .dhariwal_unet import DhariwalUNet
from .layers import set_attention_impl
from .mlp import MLP
from .presets import PRESETS, NetPreset, build_net, get_preset
from .song_unet import SongUNet

__all__ = ['SongUNet', 'DhariwalUNet', 'MLP', 'NetPreset', 'PRESETS', 'get_preset', 'build_net',
           'set_attention_impl']
