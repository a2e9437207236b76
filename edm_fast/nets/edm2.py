"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", arXiv 2312.02696, Sec. 2-3, App. B, Fig. 21).

Every layer keeps unit-variance activations at unit variance ("magnitude preservation"):
    * ``MPConv``: convolution / linear layer whose weight rows are normalised to unit RMS at every
      call (Eq. 47 and 66); in training the stored weight itself is re-normalised before each
      use (forced weight normalisation), so the optimiser cannot grow it.
    * ``mp_silu`` (Eq. 81), ``mp_sum`` (Eq. 88), ``mp_cat`` (Eq. 103), ``MPFourier`` (Eq. 75).
    * no biases, no normalisation layers; a learned scalar gain on the embedding of each block and
      on the output layer (both zero at initialisation, so F = 0 at first).

``EDM2Net`` is the raw network F of ``edm_fast.precond.Denoiser`` (forward signature
``net(x, noise_labels, class_labels=None, augment_labels=None)`` like the EDM nets) plus the
learned log-variance head u(sigma) of the EDM2 loss (Eq. 21). Its parameter and buffer names and
shapes are those of NVlabs/edm2's ``Precond`` (``unet.*``, ``logvar_fourier.*``,
``logvar_linear.*``), so an official state dict loads with ``strict=True``. The preconditioning
(c_skip, c_out, c_in, c_noise = ln(sigma)/4) is EDM's, ``EDMPrecond`` with sigma_data = 0.5.

Inference: ``EDM2Net.bake_weights()`` applies the weight normalisation (and the learned gains)
once, in place, and switches every layer to a plain convolution / matmul with the stored result.
Baking renames each ``weight`` to the buffer ``baked_weight``, so the state dict of a baked net
cannot be mistaken for (or loaded as) training weights; a baked net cannot be trained.

Shapes: N batch, C channels, H x W image, E embedding channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import ATTENTION_IMPLS, attention

__all__ = ["normalize", "mp_silu", "mp_sum", "mp_cat", "resample", "resample_kernel",
           "MPFourier", "MPConv", "Block", "UNet", "EDM2Net", "MP_SILU_SCALE"]

# sqrt(E[silu(x)^2]) for x ~ N(0, 1): silu divided by it has unit second moment (Eq. 81).
MP_SILU_SCALE = 0.596


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + RMS(x)) over ``dim`` (default: all but the first), the RMS in float32
    (the unit-magnitude normalisation behind Eq. 47 and 66)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    count = math.prod(x.shape[d] for d in dims)  # the reduced sizes only: static under export
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    return x / (eps + norm / math.sqrt(count)).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (Eq. 81)."""
    return nn.functional.silu(x) / MP_SILU_SCALE


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b scaled back to unit variance for independent unit-variance a, b (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along ``dim`` weighted (1 - t) : t, keeping unit variance overall (Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


def resample_kernel(filter=(1, 1)) -> torch.Tensor:
    """The separable 2-D FIR kernel outer(f, f) / sum(f)^2 of an even-length 1-D ``filter``."""
    f = torch.tensor(filter, dtype=torch.float32)
    if f.ndim != 1 or len(f) % 2:
        raise ValueError(f"resample filter must have an even length, got {list(filter)}")
    f = f / f.sum()
    return torch.outer(f, f)


def resample(x: torch.Tensor, mode: str = "keep", kernel: torch.Tensor | None = None
             ) -> torch.Tensor:
    """2x down- or up-sampling of each channel with ``kernel`` (default: ``resample_kernel()``,
    a 2x2 box), or x itself for mode 'keep'."""
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")
    kernel = resample_kernel() if kernel is None else kernel
    pad = (kernel.shape[-1] - 1) // 2
    w = kernel.to(x.device, x.dtype)[None, None].expand(x.shape[1], 1, *kernel.shape)
    if mode == "down":
        return nn.functional.conv2d(x, w, groups=x.shape[1], stride=2, padding=pad)
    return nn.functional.conv_transpose2d(x, w * 4, groups=x.shape[1], stride=2, padding=pad)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features sqrt(2) cos(2 pi (f y + phi)) (Eq. 75), computed
    in float32; fixed random frequencies f ~ N(0, bandwidth^2) and phases phi ~ U(0, 1)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32))
        y = (y + self.phases.to(torch.float32)).cos() * math.sqrt(2)
        return y.to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or linear layer (kernel ()) without bias,
    with forced weight normalisation (Eq. 47 and 66).

    The effective weight is normalize(weight) * gain / sqrt(fan_in): each output is a unit-norm
    combination of its inputs, so unit-variance inputs give unit-variance outputs (times gain).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @property
    def is_baked(self) -> bool:
        return "baked_weight" in self._buffers

    def effective_weight(self, gain=1.0) -> torch.Tensor:
        """normalize(weight) * gain / sqrt(fan_in) in float32 (what forward applies)."""
        w = normalize(self.weight.to(torch.float32))
        return w * (gain / math.sqrt(w[0].numel()))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        if self.is_baked:
            w = self.baked_weight.to(x.dtype)
        else:
            if self.training:
                with torch.no_grad():  # forced weight normalisation (Sec. 2.5, Eq. 66)
                    self.weight.copy_(normalize(self.weight.to(torch.float32)))
            w = self.effective_weight(gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def bake(self, gain=1.0) -> None:
        """Replace ``weight`` by the buffer ``baked_weight`` = effective_weight(gain), in the
        weight's dtype; forward then uses it as it is (inference only)."""
        if self.is_baked:
            return
        gain = gain.detach().to(torch.float32) if isinstance(gain, torch.Tensor) else gain
        baked = self.effective_weight(gain).to(self.weight.dtype)
        del self.weight
        self.register_buffer("baked_weight", baked)


class Block(nn.Module):
    """U-Net encoder ('enc') or decoder ('dec') block with optional self-attention (Fig. 21).

    x: (N, in_channels, H, W), emb: (N, E) -> (N, out_channels, H', W') with H' = H/2 ('down'),
    2H ('up') or H ('keep'). Residual and attention branches join by ``mp_sum``.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor="enc",
                 resample_mode="keep", resample_filter=(1, 1), attention=False,
                 channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3,
                 clip_act=256):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"Block flavor must be 'enc' or 'dec', got {flavor!r}")
        if attention and out_channels % channels_per_head:
            raise ValueError(f"{out_channels} channels do not split into heads of "
                             f"{channels_per_head}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = tuple(resample_filter)
        self.resample_mode = resample_mode
        if resample_mode != "keep":  # not in the state dict: derived from resample_filter
            self.register_buffer("resample_kernel", resample_kernel(resample_filter),
                                 persistent=False)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.attn_impl = "official"
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels,
                                kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = (MPConv(in_channels, out_channels, kernel=(1, 1))
                          if in_channels != out_channels else None)
        self.attn_qkv = (MPConv(out_channels, out_channels * 3, kernel=(1, 1))
                         if self.num_heads else None)
        self.attn_proj = (MPConv(out_channels, out_channels, kernel=(1, 1))
                          if self.num_heads else None)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Main branch: resample; the encoder projects first and pixel-normalises.
        x = resample(x, self.resample_mode, getattr(self, "resample_kernel", None))
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        # Residual branch, modulated by the embedding (scale 1 + gain * linear(emb)).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attend(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """proj(attention(q, k, v)) with q, k, v pixel-normalised per head; the qkv channels
        are laid out as (head, channel, 3) like the official net."""
        n, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(n * self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = normalize(qkv, dim=1).unbind(2)
        y = attention(q, k, v, impl=self.attn_impl)  # softmax(q^T k / sqrt(c)) v per head
        return self.attn_proj(y.reshape(n, c, h, w))


class UNet(nn.Module):
    """The EDM2 U-Net F(x, c_noise, labels) (Fig. 21): ``model_channels * channel_mult`` channels
    per level, ``num_blocks`` blocks per encoder level and ``num_blocks + 1`` per decoder level,
    attention at ``attn_resolutions``, skip connections joined by ``mp_cat``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0,
                 out_channels: int | None = None, model_channels: int = 192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise=None, channel_mult_emb=None,
                 num_blocks: int = 3, attn_resolutions=(16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb else max(cblock)
        out_channels = img_channels if out_channels is None else out_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb)
        self.emb_label = MPConv(label_dim, cemb) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # the input gets a constant channel of ones
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, kernel=(3, 3))
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc",
                                                      resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cout, channels, cemb, flavor="enc", attention=res in attn_resolutions,
                    **block_kwargs)
                cout = channels

        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec",
                                                     attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec",
                                                     **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec",
                                                    resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cout + skips.pop(), channels, cemb, flavor="dec",
                    attention=res in attn_resolutions, **block_kwargs)
                cout = channels
        self.out_conv = MPConv(cout, out_channels, kernel=(3, 3))

    def forward(self, x, noise_labels, class_labels=None):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device,
                                           dtype=emb.dtype)
            label_emb = self.emb_label(class_labels.to(emb.dtype) * math.sqrt(self.label_dim))
            emb = mp_sum(emb, label_emb, t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

    @torch.no_grad()
    def bake_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, Block):
                module.emb_linear.bake(module.emb_gain)
        self.out_conv.bake(self.out_gain)
        for module in self.modules():
            if isinstance(module, MPConv):
                module.bake()  # the remaining ones have gain 1


class EDM2Net(nn.Module):
    """EDM2's network: the U-Net F and the log-variance head u(c_noise) (Eq. 21), with the
    parameter names of NVlabs/edm2's ``Precond`` (the preconditioning itself is EDM's and lives
    in ``edm_fast.precond.Denoiser``).

    Args (as ``build_net`` passes them): img_resolution, in_channels (image channels),
    out_channels (default in_channels), label_dim (0 = unconditional), augment_dim (must be 0:
    EDM2 trains without augmentation conditioning), then the U-Net's and its blocks' options
    with the official defaults, and logvar_channels (Fourier features of the head).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int | None = None,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise=None, channel_mult_emb=None,
                 num_blocks: int = 3, attn_resolutions=(16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, resample_filter=(1, 1), channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act=256, logvar_channels: int = 128):
        super().__init__()
        if augment_dim:
            raise ValueError(f"EDM2 networks take no augmentation labels (augment_dim="
                             f"{augment_dim}); train them without --augment")
        if num_blocks < 1 or not channel_mult:
            raise ValueError("EDM2 needs num_blocks >= 1 and at least one channel_mult level")
        levels = len(channel_mult)
        if img_resolution % (1 << (levels - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by "
                             f"2^{levels - 1} ({levels} resolution levels)")
        self.img_resolution = img_resolution
        self.img_channels = in_channels
        self.model_channels = model_channels
        self.label_dim = label_dim
        self.unet = UNet(img_resolution, in_channels, label_dim, out_channels=out_channels,
                         model_channels=model_channels, channel_mult=channel_mult,
                         channel_mult_noise=channel_mult_noise, channel_mult_emb=channel_mult_emb,
                         num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                         label_balance=label_balance, concat_balance=concat_balance,
                         resample_filter=resample_filter, channels_per_head=channels_per_head,
                         dropout=dropout, res_balance=res_balance, attn_balance=attn_balance,
                         clip_act=clip_act)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1)

    @property
    def is_baked(self) -> bool:
        return self.logvar_linear.is_baked

    @property
    def data_shape(self):
        """One sample's shape (C, H, W)."""
        return (self.img_channels, self.img_resolution, self.img_resolution)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        if augment_labels is not None:
            raise ValueError("EDM2 networks take no augmentation labels")
        if self.training and self.is_baked:
            raise RuntimeError("this EDM2 net has baked weights (inference only); train a net "
                               "built from the checkpoint's training weights")
        return self.unet(x, noise_labels, class_labels)

    def logvar(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """u(sigma) of Eq. 21 for c_noise = ln(sigma)/4: (N,) -> (N,)."""
        return self.logvar_linear(self.logvar_fourier(noise_labels)).reshape(-1)

    @torch.no_grad()
    def bake_weights(self) -> EDM2Net:
        """Apply the weight normalisation and the learned gains once, for inference (see the
        module docstring); irreversible. Returns self."""
        self.unet.bake_weights()
        self.logvar_linear.bake()
        return self.requires_grad_(False)

    def set_attention_impl(self, impl: str) -> EDM2Net:
        """'official' (float32 softmax, like NVlabs) or 'sdpa' (torch's fused attention)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention impl {impl!r}; expected one of "
                             f"{ATTENTION_IMPLS}")
        for module in self.modules():
            if isinstance(module, Block):
                module.attn_impl = impl
        return self
