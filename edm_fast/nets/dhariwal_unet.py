"""ADM U-Net of Dhariwal & Nichol (2021) as configured in EDM (Karras et al. 2022, App. F, Table 7).

Compatible with NVlabs/edm `DhariwalUNet`: same constructor arguments, module names, parameter
shapes and order, and forward numerics.
"""

import math

import torch
from torch.nn.functional import silu

from .layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, prepare_labels
from .song_unet import check_resolution


class DhariwalUNet(torch.nn.Module):
    """ADM denoiser network F. x: (N, in_channels, H, H) -> (N, out_channels, H, H).

    noise_labels: (N,) c_noise; class_labels: (N, label_dim) float one-hot (zeros or None =
    unconditional); augment_labels: (N, augment_dim) or None. As in EDM, a block whose width is
    below channels_per_head gets no attention (0 heads).
    """

    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Color channels at input.
        out_channels,                       # Color channels at output.
        label_dim=0,                        # Number of class labels, 0 = unconditional.
        augment_dim=0,                      # Augmentation label size, 0 = no augmentation.
        model_channels=192,                 # Base multiplier for the number of channels.
        channel_mult=(1, 2, 3, 4),          # Per-resolution channel multipliers.
        channel_mult_emb=4,                 # Embedding size as a multiple of model_channels.
        num_blocks=3,                       # Residual blocks per resolution.
        attn_resolutions=(32, 16, 8),       # Resolutions with self-attention.
        dropout=0.10,                       # Dropout probability of intermediate activations.
        label_dropout=0,                    # Class-label dropout probability (CFG training).
        channels_per_head=64,               # Attention head width (edm-fast extension; EDM: 64).
    ):
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
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3),
                    init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        self._block_kwargs = dict(emb_channels=emb_channels, channels_per_head=channels_per_head,
                                  dropout=dropout, init=init, init_zero=init_zero)

        # Mapping network: noise (+ augment) embedding -> emb (N, emb_channels); label added last.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = torch.nn.ModuleDict()
        self.dec = torch.nn.ModuleDict()
        cout = self._build_encoder(init)
        skips = [block.out_channels for block in self.enc.values()]
        cout = self._build_decoder(cout, skips)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    @property
    def data_shape(self):
        """(C, H, W) of the input images."""
        return (self.img_channels, self.img_resolution, self.img_resolution)

    def _build_encoder(self, init):
        """Fill self.enc; returns the channel count at its output."""
        bk = self._block_kwargs
        cout = self.img_channels
        for level, mult in enumerate(self.channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                cin, cout = cout, self.model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **bk)
            for idx in range(self.num_blocks):
                cin, cout = cout, self.model_channels * mult
                attn = res in self.attn_resolutions
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **bk)
        return cout

    def _build_decoder(self, cout, skips):
        """Fill self.dec, consuming skip channel counts from the end; returns its out channels."""
        bk = self._block_kwargs
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = self.img_resolution >> level
            if level == len(self.channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **bk)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **bk)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **bk)
            for idx in range(self.num_blocks + 1):
                cin, cout = cout + skips.pop(), self.model_channels * mult
                attn = res in self.attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **bk)
        return cout

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(x, noise_labels, class_labels, augment_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))

    def embed(self, x, noise_labels, class_labels=None, augment_labels=None):
        """Mapping network -> emb (N, emb_channels), in noise_labels' dtype."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = prepare_labels(class_labels, self.label_dim, x.shape[0], self.training,
                                    self.label_dropout, x.device)
            emb = emb + self.map_label(labels)
        return silu(emb)
