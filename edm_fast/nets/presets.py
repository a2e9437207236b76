"""Named network configurations: the paper's (Karras et al. 2022, App. F, Table 7) and small ones.

A preset fixes the architecture and its hyper-parameters; the data decides the rest at build time
(`build_net(name, img_resolution=..., img_channels=..., label_dim=..., augment_dim=...)`).
Parameter counts (label_dim=0, augment_dim=0 unless stated):

| name          | arch   | data     | parameters                                  |
|---------------|--------|----------|---------------------------------------------|
| cifar10-ddpmpp| ddpmpp | 32×32×3  | 55,735,299 with label_dim=10, augment_dim=9  |
| cifar10-ncsnpp| ncsnpp | 32×32×3  | 56,400,643 with label_dim=10, augment_dim=9  |
| imagenet64-adm| adm    | 64×64×3  | 295,899,267 with label_dim=1000             |
| tiny          | ddpmpp | 16×16×1  | 317,121                                     |
| tiny-ncsnpp   | ncsnpp | 16×16×1  | 322,945                                     |
| tiny-adm      | adm    | 16×16×1  | 345,009                                     |
| small         | ddpmpp | 32×32×3  | 1,754,147                                   |
| 64px-ddpmpp   | ddpmpp | 64×64×3  | 22,169,955                                  |
| 64px-adm      | adm    | 64×64×3  | 24,120,579                                  |
| toy-mlp       | mlp    | (2,)     | 233,090                                     |
| edm2-img512-xs| edm2   | 64×64×4  | 124,713,765 with label_dim=1000 (EDM2 XS)    |
| edm2-img64-s  | edm2   | 64×64×3  | 280,210,021 with label_dim=1000 (EDM2 S)     |
| tiny-edm2     | edm2   | 16×16×1  | 300,512                                     |

EDM2 (Karras et al. 2024, arXiv 2312.02696, Table 2 and NVlabs/edm2 train_edm2.py): img512
xxs/xs/s/m/l/xl/xxl on 64×64×4 Stable Diffusion VAE latents and img64 xs/s/m/l/xl on pixels,
model_channels 64/128/192/256/320/384/448, dropout 0.1 from m up.
"""

import dataclasses
import inspect

from .dhariwal_unet import DhariwalUNet
from .edm2 import EDM2Net
from .mlp import MLP
from .song_unet import SongUNet

ARCHS = {'ddpmpp': SongUNet, 'ncsnpp': SongUNet, 'adm': DhariwalUNet, 'mlp': MLP,
         'edm2': EDM2Net}

# Arguments set by build_net() itself rather than by presets or overrides.
_BUILD_ARGS = {'img_resolution', 'in_channels', 'dim', 'label_dim', 'augment_dim'}


def _freeze(value):
    """Lists -> tuples (recursively), so that presets are hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def freeze_kwargs(**kwargs):
    """Keyword arguments as a hashable tuple of (name, value) pairs, in the given order."""
    return tuple((name, _freeze(value)) for name, value in kwargs.items())


@dataclasses.dataclass(frozen=True)
class NetPreset:
    """A named network configuration; `kwargs` are the model constructor's keyword arguments."""

    name: str
    arch: str                   # 'ddpmpp' | 'ncsnpp' | 'adm' | 'mlp' | 'edm2'
    img_resolution: int | None  # H = W of the images (None for the MLP).
    img_channels: int           # Image channels (data dimension for the MLP).
    kwargs: tuple = ()          # ((name, value), ...) from freeze_kwargs().
    description: str = ''

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f'NetPreset {self.name!r}: arch={self.arch!r}; expected one of '
                             f'{sorted(ARCHS)}')

    @property
    def net_class(self):
        return ARCHS[self.arch]

    def model_kwargs(self):
        """The constructor kwargs as a fresh dict (sequences as lists, like EDM's configs)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs}


def _song(name, res, ch, description, **kwargs):
    ncsn = kwargs.pop('ncsn', False)
    style = (dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                  decoder_type='standard', resample_filter=(1, 3, 3, 1)) if ncsn else
             dict(embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                  decoder_type='standard', resample_filter=(1, 1)))
    arch = 'ncsnpp' if ncsn else 'ddpmpp'
    return NetPreset(name, arch, res, ch, freeze_kwargs(**kwargs, **style), description)


def _adm(name, res, ch, description, **kwargs):
    return NetPreset(name, 'adm', res, ch, freeze_kwargs(**kwargs), description)


_CIFAR = dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
              attn_resolutions=(16,), dropout=0.13, label_dropout=0)
_TINY = dict(model_channels=16, channel_mult=(1, 2, 2), channel_mult_emb=4, num_blocks=1,
             attn_resolutions=(8,), dropout=0.1, label_dropout=0)
_64PX = dict(model_channels=96, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=2,
             attn_resolutions=(16,), label_dropout=0)

_PRESET_LIST = [
    _song('cifar10-ddpmpp', 32, 3, 'Paper CIFAR-10 DDPM++ (config F, App. F); EDM cond-vp with '
          'label_dim=10, augment_dim=9: 55,735,299 params.', **_CIFAR),
    _song('cifar10-ncsnpp', 32, 3, 'Paper CIFAR-10 NCSN++ (config F, App. F); EDM cond-ve with '
          'label_dim=10, augment_dim=9: 56,400,643 params.', **_CIFAR, ncsn=True),
    _adm('imagenet64-adm', 64, 3, 'Paper ImageNet-64 ADM (App. F); EDM cond-adm with '
         'label_dim=1000: 295,899,267 params.', model_channels=192, channel_mult=(1, 2, 3, 4),
         channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10,
         label_dropout=0),
    _song('tiny', 16, 1, 'DDPM++ for 16x16 grayscale digits; ~0.3M params, trains on a 2-core '
          'CPU in minutes.', **_TINY),
    _song('tiny-ncsnpp', 16, 1, 'NCSN++ twin of `tiny`.', **_TINY, ncsn=True),
    _adm('tiny-adm', 16, 1, 'ADM twin of `tiny` (16-channel attention heads).',
         **_TINY, channels_per_head=16),
    _song('small', 32, 3, 'DDPM++ for 32x32 images; ~1.8M params.', model_channels=32,
          channel_mult=(1, 2, 2), channel_mult_emb=4, num_blocks=2, attn_resolutions=(16,),
          dropout=0.1, label_dropout=0),
    _song('64px-ddpmpp', 64, 3, 'DDPM++ for 64x64 image folders, one-GPU size (~22M params), '
          'attention at 16x16.', **_64PX, dropout=0.05),
    _adm('64px-adm', 64, 3, 'ADM for 64x64 image folders, one-GPU size (~24M params), '
         'attention at 16x16.', **_64PX, dropout=0.10),
    NetPreset('toy-mlp', 'mlp', None, 2, freeze_kwargs(hidden=128, depth=4,
              embedding_type='positional', dropout=0.0, label_dropout=0.0),
              'Residual MLP for 2-D toy distributions.'),
]

# EDM2 sizes: (model_channels, dropout) of NVlabs/edm2's train_edm2.py presets.
_EDM2_SIZES = {'xxs': (64, 0.0), 'xs': (128, 0.0), 's': (192, 0.0), 'm': (256, 0.1),
               'l': (320, 0.1), 'xl': (384, 0.1), 'xxl': (448, 0.1)}
_EDM2_IMG512 = ('xxs', 'xs', 's', 'm', 'l', 'xl', 'xxl')
_EDM2_IMG64 = ('xs', 's', 'm', 'l', 'xl')


def _edm2(name, res, ch, description, **kwargs):
    return NetPreset(name, 'edm2', res, ch, freeze_kwargs(**kwargs), description)


_PRESET_LIST += [
    _edm2(f'edm2-img512-{size}', 64, 4, f'EDM2-{size.upper()} for ImageNet-512 (64x64x4 '
          'latents of the Stable Diffusion VAE).', model_channels=_EDM2_SIZES[size][0],
          dropout=_EDM2_SIZES[size][1])
    for size in _EDM2_IMG512
] + [
    _edm2(f'edm2-img64-{size}', 64, 3, f'EDM2-{size.upper()} for ImageNet-64 (pixels).',
          model_channels=_EDM2_SIZES[size][0], dropout=_EDM2_SIZES[size][1])
    for size in _EDM2_IMG64
] + [
    _edm2('tiny-edm2', 16, 1, 'EDM2 magnitude-preserving U-Net for 16x16 grayscale digits; '
          'CPU-sized twin of `tiny`.', model_channels=16, channel_mult=(1, 2, 2), num_blocks=1,
          attn_resolutions=(8,), channels_per_head=16, logvar_channels=32),
]

PRESETS = {preset.name: preset for preset in _PRESET_LIST}


def get_preset(name):
    """The NetPreset called `name`; ValueError listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f'Unknown network preset {name!r}; valid presets: '
                         f'{", ".join(PRESETS)}') from None


def _check_overrides(preset, overrides):
    """ValueError for overrides the net's constructor does not take or that build_net sets."""
    params = set(inspect.signature(preset.net_class.__init__).parameters) - {'self'}
    unknown = sorted(set(overrides) - params)
    if unknown:
        raise ValueError(f'{preset.net_class.__name__} has no argument(s) {unknown}; valid: '
                         f'{sorted(params - _BUILD_ARGS)}')
    reserved = sorted(set(overrides) & _BUILD_ARGS)
    if reserved:
        raise ValueError(f'{reserved}: pass img_resolution / img_channels / label_dim / '
                         'augment_dim as build_net keywords')


def resolve_net_kwargs(preset_or_name, *, img_resolution=None, img_channels=None, label_dim=0,
                       augment_dim=0, **overrides):
    """The full constructor kwargs build_net() passes to the preset's class (JSON-able)."""
    preset = get_preset(preset_or_name) if isinstance(preset_or_name, str) else preset_or_name
    _check_overrides(preset, overrides)
    kwargs = {**preset.model_kwargs(), **overrides}
    channels = preset.img_channels if img_channels is None else img_channels
    kwargs.update(label_dim=label_dim, augment_dim=augment_dim)
    if preset.arch == 'mlp':
        return {'dim': channels, **kwargs}
    resolution = preset.img_resolution if img_resolution is None else img_resolution
    kwargs.setdefault('out_channels', channels)
    return {'img_resolution': resolution, 'in_channels': channels, **kwargs}


def build_net(preset_or_name, *, img_resolution=None, img_channels=None, label_dim=0,
              augment_dim=0, **overrides):
    """Build the network F of a preset (name or NetPreset); overrides replace its kwargs.

    img_resolution / img_channels default to the preset's; out_channels defaults to
    img_channels (pass out_channels=2*C for iDDPM-style outputs). For 'mlp', img_channels is
    the data dimension and img_resolution is ignored.
    """
    preset = get_preset(preset_or_name) if isinstance(preset_or_name, str) else preset_or_name
    kwargs = resolve_net_kwargs(preset, img_resolution=img_resolution, img_channels=img_channels,
                                label_dim=label_dim, augment_dim=augment_dim, **overrides)
    return preset.net_class(**kwargs)
