"""DDPM++ and NCSN++ U-Nets of Song et al. (2021) as configured in EDM (Karras et al. 2022, App. F).

Compatible with NVlabs/edm `SongUNet`: same constructor arguments, module names (`map_*`, `enc.*`,
`dec.*`), parameter shapes and order, and forward numerics.

DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
        decoder_type='standard', resample_filter=(1, 1).
NCSN++: embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
        decoder_type='standard', resample_filter=(1, 3, 3, 1).
"""

import math

import torch
from torch.nn.functional import silu

from .layers import Conv2d, GroupNorm, UNetBlock, add_song_mapping, prepare_labels

EMBEDDING_TYPES = ('fourier', 'positional')
ENCODER_TYPES = ('standard', 'skip', 'residual')
DECODER_TYPES = ('standard', 'skip')


def check_resolution(img_resolution, num_levels):
    """Raise ValueError unless img_resolution is a positive multiple of 2^(num_levels - 1)."""
    factor = 2 ** (num_levels - 1)
    if img_resolution <= 0 or img_resolution % factor:
        raise ValueError(f'img_resolution={img_resolution} must be a positive multiple of '
                         f'{factor} for {num_levels} resolution levels')


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f'{name}={value!r}; expected one of {choices}')


class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ denoiser network F. x: (N, in_channels, H, H) -> (N, out_channels, H, H).

    noise_labels: (N,) c_noise; class_labels: (N, label_dim) float one-hot (zeros or None =
    unconditional); augment_labels: (N, augment_dim) or None.
    """

    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Color channels at input.
        out_channels,                       # Color channels at output.
        label_dim=0,                        # Number of class labels, 0 = unconditional.
        augment_dim=0,                      # Augmentation label size, 0 = no augmentation.
        model_channels=128,                 # Base multiplier for the number of channels.
        channel_mult=(1, 2, 2, 2),          # Per-resolution channel multipliers.
        channel_mult_emb=4,                 # Embedding size as a multiple of model_channels.
        num_blocks=4,                       # Residual blocks per resolution.
        attn_resolutions=(16,),             # Resolutions with self-attention.
        dropout=0.10,                       # Dropout probability of intermediate activations.
        label_dropout=0,                    # Class-label dropout probability (CFG training).
        embedding_type='positional',        # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise=1,               # Noise embedding size: 1 (DDPM++), 2 (NCSN++).
        encoder_type='standard',            # 'standard' (DDPM++), 'residual' (NCSN++) or 'skip'.
        decoder_type='standard',            # 'standard' (both) or 'skip'.
        resample_filter=(1, 1),             # FIR taps: (1, 1) DDPM++, (1, 3, 3, 1) NCSN++.
    ):
        _check_choice('embedding_type', embedding_type, EMBEDDING_TYPES)
        _check_choice('encoder_type', encoder_type, ENCODER_TYPES)
        _check_choice('decoder_type', decoder_type, DECODER_TYPES)
        check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.model_channels = model_channels
        self.channel_mult = tuple(channel_mult)
        self.num_blocks = num_blocks
        self.attn_resolutions = tuple(attn_resolutions)
        self.encoder_type = encoder_type
        self.decoder_type = decoder_type
        self.resample_filter = tuple(resample_filter)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        self._init = init
        self._init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        self._block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=self._init_zero,
            init_attn=dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2)),
        )

        # Mapping network: noise (+ label + augment) embedding -> emb (N, emb_channels).
        add_song_mapping(self, embedding_type=embedding_type, noise_channels=noise_channels,
                         emb_channels=emb_channels, label_dim=label_dim,
                         augment_dim=augment_dim, init=init)

        self.enc = torch.nn.ModuleDict()
        self.dec = torch.nn.ModuleDict()
        skips = self._build_encoder()
        self._build_decoder(skips)

    @property
    def data_shape(self):
        """(C, H, W) of the input images."""
        return (self.img_channels, self.img_resolution, self.img_resolution)

    def _build_encoder(self):
        """Fill self.enc; returns the channel counts of the skip connections, in order."""
        bk = self._block_kwargs
        cout = caux = self.img_channels
        for level, mult in enumerate(self.channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                cin, cout = cout, self.model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **self._init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **bk)
                caux = self._add_encoder_aux(res, caux, cout)
            for idx in range(self.num_blocks):
                cin, cout = cout, self.model_channels * mult
                attn = res in self.attn_resolutions
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **bk)
        return [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

    def _add_encoder_aux(self, res, caux, cout):
        """Input-pyramid path of the 'skip' / 'residual' encoders; returns the new aux channels."""
        filt = self.resample_filter
        if self.encoder_type == 'skip':
            self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True,
                                                       resample_filter=filt)
            self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **self._init)
        if self.encoder_type == 'residual':
            self.enc[f'{res}x{res}_aux_residual'] = Conv2d(
                caux, cout, kernel=3, down=True, resample_filter=filt, fused_resample=True,
                **self._init)
            return cout
        return caux

    def _build_decoder(self, skips):
        """Fill self.dec, consuming the encoder's skip channel counts from the end."""
        bk = self._block_kwargs
        cout = skips[-1]
        last = len(self.channel_mult) - 1
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = self.img_resolution >> level
            if level == last:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **bk)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **bk)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **bk)
            for idx in range(self.num_blocks + 1):
                cin, cout = cout + skips.pop(), self.model_channels * mult
                attn = idx == self.num_blocks and res in self.attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **bk)
            if self.decoder_type == 'skip' or level == 0:
                self._add_decoder_aux(res, cout, level < last)

    def _add_decoder_aux(self, res, cout, upsample_aux):
        """Output head: GroupNorm, SiLU, 3×3 conv to out_channels (one per level for 'skip')."""
        if self.decoder_type == 'skip' and upsample_aux:
            self.dec[f'{res}x{res}_aux_up'] = Conv2d(
                self.out_channels, self.out_channels, kernel=0, up=True,
                resample_filter=self.resample_filter)
        self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
        self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, self.out_channels, kernel=3,
                                                   **self._init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(x, noise_labels, class_labels, augment_labels)
        x, skips = self._encode(x, emb)
        return self._decode(x, emb, skips)

    def embed(self, x, noise_labels, class_labels=None, augment_labels=None):
        """Mapping network -> emb (N, emb_channels), in noise_labels' dtype."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # -> [sin, cos]
        if self.map_label is not None:
            labels = prepare_labels(class_labels, self.label_dim, x.shape[0], self.training,
                                    self.label_dropout, x.device)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        return silu(self.map_layer1(emb))

    def _encode(self, x, emb):
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        return x, skips

    def _decode(self, x, emb, skips):
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux
