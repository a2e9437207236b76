"""Small residual MLP denoiser network for 1-D/2-D toy data, conditioned like EDM's U-Nets (App. F).

Not part of the paper: a toy-scale stand-in for F with the same forward signature as SongUNet, the
same noise embeddings, label dropout and 1e-5-scaled output init.
"""

import math

import torch
from torch.nn.functional import silu

from .layers import GroupNorm, Linear, add_song_mapping, prepare_labels


class MLPBlock(torch.nn.Module):
    """Pre-norm residual block with additive embedding. x: (N, C), emb: (N, E) -> (N, C)."""

    def __init__(self, channels, emb_channels, dropout=0.0, init=None, init_zero=None):
        super().__init__()
        self.dropout = dropout
        self.norm0 = GroupNorm(num_channels=channels, num_groups=1)
        self.fc0 = Linear(channels, channels, **(init or {}))
        self.affine = Linear(emb_channels, channels, **(init or {}))
        self.fc1 = Linear(channels, channels, **(init_zero or {}))

    def forward(self, x, emb):
        h = self.fc0(silu(self.norm0(x)))
        h = silu(h + self.affine(emb).to(h.dtype))
        h = self.fc1(torch.nn.functional.dropout(h, p=self.dropout, training=self.training))
        return (x + h) * math.sqrt(0.5)


class MLP(torch.nn.Module):
    """Residual MLP denoiser network F for toy data. x: (N, dim) -> (N, out_dim).

    noise_labels: (N,) c_noise; class_labels: (N, label_dim) float one-hot (zeros or None =
    unconditional); augment_labels: (N, augment_dim) or None.
    """

    def __init__(self,
        dim,                            # Data dimensionality (1 or 2 for toy data).
        hidden=128,                     # Hidden width.
        depth=4,                        # Number of residual blocks.
        label_dim=0,                    # Number of class labels, 0 = unconditional.
        augment_dim=0,                  # Augmentation label size, 0 = no augmentation.
        embedding_type='positional',    # Noise embedding: 'positional' or 'fourier'.
        noise_channels=None,            # Noise embedding size; None = hidden.
        emb_channels=None,              # Embedding vector size; None = hidden.
        dropout=0.0,                    # Dropout probability inside the blocks.
        label_dropout=0.0,              # Class-label dropout probability (CFG training).
        out_dim=None,                   # Output size; None = dim.
    ):
        if embedding_type not in ('positional', 'fourier'):
            raise ValueError(f"embedding_type={embedding_type!r}; expected 'positional' or "
                             "'fourier'")
        super().__init__()
        self.dim = dim
        self.img_resolution = None
        self.img_channels = dim
        self.out_channels = dim if out_dim is None else out_dim
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        noise_channels = noise_channels or hidden
        emb_channels = emb_channels or hidden
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)

        add_song_mapping(self, embedding_type=embedding_type, noise_channels=noise_channels,
                         emb_channels=emb_channels, label_dim=label_dim,
                         augment_dim=augment_dim, init=init)
        self.inp = Linear(dim, hidden, **init)
        self.blocks = torch.nn.ModuleList(
            MLPBlock(hidden, emb_channels, dropout, init, init_zero) for _ in range(depth))
        self.out_norm = GroupNorm(num_channels=hidden, num_groups=1)
        self.out = Linear(hidden, self.out_channels, **init_zero)

    @property
    def data_shape(self):
        """(dim,) of one input sample."""
        return (self.dim,)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(x, noise_labels, class_labels, augment_labels)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(silu(self.out_norm(h)))

    def embed(self, x, noise_labels, class_labels=None, augment_labels=None):
        """Mapping network -> emb (N, emb_channels), in noise_labels' dtype."""
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            labels = prepare_labels(class_labels, self.label_dim, x.shape[0], self.training,
                                    self.label_dropout, x.device)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        return silu(self.map_layer1(emb))
