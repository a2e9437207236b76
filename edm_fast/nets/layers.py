"""Layers of the EDM networks (Karras et al. 2022, App. F), compatible with NVlabs/edm.

Parameter/buffer names, shapes and registration order follow the official `training/networks.py`,
so official state dicts load with `strict=True`; the random initialisation also draws the same
numbers in the same order, so a given seed gives the official initial weights.

Numerics follow the official code: every layer computes in its input's dtype (weights are cast to
it), GroupNorm calls `F.group_norm` with cast affine parameters, and attention weights
softmax(qᵀk/√c) are computed in float32 and returned in q's dtype. Checked against NVlabs/edm
@ 008a4e5 on CPU: same seeded init, bitwise-equal outputs and gradients for fp32/fp16/bf16 and
channels_last inputs. One deliberate difference: under autocast the attention weights stay in
float32 here, while the official einsum would be lowered to the autocast dtype.
Extensions that do not change official configurations: GroupNorm lowers its group count to a
divisor of C (EDM would fail), class_labels=None means zeros, `attn_impl='sdpa'` per block.

Shapes: N batch, C channels, H×W image, L = H·W tokens, E embedding channels.
"""

import contextlib
import math

import torch
from torch.nn.functional import silu

ATTENTION_IMPLS = ('official', 'sdpa')

# ----------------------------------------------------------------------------
# Weight initialisation (App. F: xavier_uniform for DDPM++/NCSN++, kaiming_uniform for ADM).


def weight_init(shape, mode, fan_in, fan_out):
    """Random tensor of `shape` drawn with the given fan-based init `mode` (official formulas)."""
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode "{mode}"; expected xavier_uniform, xavier_normal, '
                     'kaiming_uniform or kaiming_normal')


def _init_pair(weight_shape, bias_shape, has_bias, init_mode, init_weight, init_bias, fan_in,
               fan_out):
    """(weight, bias-or-None) Parameters; draws the bias even when init_bias=0, as EDM does."""
    fans = dict(mode=init_mode, fan_in=fan_in, fan_out=fan_out)
    weight = torch.nn.Parameter(weight_init(weight_shape, **fans) * init_weight)
    bias = torch.nn.Parameter(weight_init(bias_shape, **fans) * init_bias) if has_bias else None
    return weight, bias


def add_keep_dtype(x, y):
    """x + y computed in the promoted dtype and returned in x's dtype (EDM's in-place x.add_(y)).

    Only differs from x + y under autocast, where operands can have different dtypes.
    """
    return (x + y).to(x.dtype)


# ----------------------------------------------------------------------------
# Fully-connected layer.


class Linear(torch.nn.Module):
    """Fully-connected layer in x's dtype. x: (..., in_features) -> (..., out_features)."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        weight, bias_ = _init_pair([out_features, in_features], [out_features], bias, init_mode,
                                   init_weight, init_bias, in_features, out_features)
        self.weight = weight
        self.register_parameter('bias', bias_)

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = add_keep_dtype(x, self.bias.to(x.dtype))
        return x


# ----------------------------------------------------------------------------
# Convolution with optional 2× up/downsampling by a separable FIR resample filter.


def make_resample_filter(resample_filter):
    """Normalised 2-D FIR filter f fᵀ / (Σf)², shape (1, 1, k, k), from 1-D taps (1, 3, 3, 1)."""
    f = torch.as_tensor(resample_filter, dtype=torch.float32)
    return torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()


def upsample2x(x, f, channels, padding):
    """2× upsampling by the depthwise transposed filter 4·f. x: (N, C, H, W) -> (N, C, 2H, 2W)."""
    weight = f.mul(4).repeat(channels, 1, 1, 1)
    return torch.nn.functional.conv_transpose2d(x, weight, groups=channels, stride=2,
                                                padding=padding)


def downsample2x(x, f, channels, padding):
    """2× downsampling by the depthwise filter f. x: (N, C, H, W) -> (N, C, H/2, W/2)."""
    weight = f.repeat(channels, 1, 1, 1)
    return torch.nn.functional.conv2d(x, weight, groups=channels, stride=2, padding=padding)


class Conv2d(torch.nn.Module):
    """k×k convolution with optional up/down resampling. x: (N, Cin, H, W) -> (N, Cout, H', W').

    `kernel=0` gives a pure resampler without weights (used by the skip paths); the filter buffer
    `resample_filter` exists only when up or down is set, as in the official code.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0):
        if up and down:
            raise ValueError('Conv2d: up and down are mutually exclusive')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        weight, bias_ = None, None
        if kernel:
            fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
            weight, bias_ = _init_pair([out_channels, in_channels, kernel, kernel], [out_channels],
                                       bias, init_mode, init_weight, init_bias, fan_in, fan_out)
        self.register_parameter('weight', weight)
        self.register_parameter('bias', bias_)
        f = make_resample_filter(resample_filter)
        self.register_buffer('resample_filter', f if (up or down) else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None  # input dtype, as in EDM
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and w is not None and (self.up or self.down):
            x = self._fused(x, w, f, w_pad + f_pad)
        else:
            if self.up:
                x = upsample2x(x, f, self.in_channels, f_pad)
            if self.down:
                x = downsample2x(x, f, self.in_channels, f_pad)
            if w is not None:
                x = torch.nn.functional.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = add_keep_dtype(x, b.reshape(1, -1, 1, 1))
        return x

    def _fused(self, x, w, f, pad):
        """Resample and convolve with the padding merged (the NCSN++ `aux_residual` path)."""
        if self.up:
            x = upsample2x(x, f, self.in_channels, pad)
            return torch.nn.functional.conv2d(x, w)
        x = torch.nn.functional.conv2d(x, w, padding=pad)
        return downsample2x(x, f, self.out_channels, 0)


# ----------------------------------------------------------------------------
# Group normalisation.


def num_norm_groups(num_channels, num_groups=32, min_channels_per_group=4):
    """min(num_groups, C // min_channels_per_group) as in EDM, lowered to a divisor of C (>= 1)."""
    groups = max(1, min(num_groups, num_channels // min_channels_per_group))
    while num_channels % groups:
        groups -= 1
    return groups


class GroupNorm(torch.nn.Module):
    """Group normalisation with affine weight/bias cast to x's dtype. x: (N, C, ...) -> same."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = num_norm_groups(num_channels, num_groups, min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups,
                                              weight=self.weight.to(x.dtype),
                                              bias=self.bias.to(x.dtype), eps=self.eps)


# ----------------------------------------------------------------------------
# Attention: weights softmax(qᵀk/√c) in float32, inputs/outputs/gradients in the input dtype.


def _autocast_off(device_type):
    """A context that disables autocast on `device_type` if it is on (so float32 stays float32)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def attention_weights(q, k):
    """softmax_k(qᵀk/√c) in float32, cast to q.dtype. q: (B, c, Lq), k: (B, c, Lk) -> (B, Lq, Lk)"""
    with _autocast_off(q.device.type):
        k = k / math.sqrt(k.shape[1])
        logits = torch.einsum('ncq,nck->nqk', q.to(torch.float32), k.to(torch.float32))
        return logits.softmax(dim=2).to(q.dtype)


def _softmax_vjp(dw, w):
    """Gradient w.r.t. the logits of w = softmax(logits, dim=2), given dL/dw (all float32)."""
    if hasattr(torch, '_softmax_backward_data'):  # the kernel EDM uses: bitwise-equal gradients
        return torch._softmax_backward_data(dw, w, 2, torch.float32)
    return w * (dw - (dw * w).sum(dim=2, keepdim=True))


class AttentionOp(torch.autograd.Function):
    """attention_weights() with a float32 backward that saves only q, k and w (memory as in EDM)."""

    @staticmethod
    def forward(ctx, q, k):
        w = attention_weights(q, k)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw):
        q, k, w = ctx.saved_tensors
        scale = math.sqrt(k.shape[1])
        with _autocast_off(q.device.type):
            ds = _softmax_vjp(dw.to(torch.float32), w.to(torch.float32))
            dq = torch.einsum('nck,nqk->ncq', k.to(torch.float32), ds).to(q.dtype) / scale
            dk = torch.einsum('ncq,nqk->nck', q.to(torch.float32), ds).to(k.dtype) / scale
        return dq, dk


def attention(q, k, v, impl='official'):
    """Single-head attention per batch entry. q: (B, c, Lq), k, v: (B, c, Lk) -> (B, c, Lq).

    'official': float32 softmax weights cast to the input dtype, then w·v in that dtype (EDM).
    'sdpa': torch's scaled_dot_product_attention (same function, different rounding).
    """
    if impl == 'sdpa':
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if impl != 'official':
        raise ValueError(f'Unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}')
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    w = AttentionOp.apply(q, k) if needs_grad else attention_weights(q, k)
    return torch.einsum('nqk,nck->ncq', w, v)


def set_attention_impl(net, impl):
    """Select the attention implementation ('official' | 'sdpa') of every UNetBlock in `net`."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f'Unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}')
    for module in net.modules():
        if isinstance(module, UNetBlock):
            module.attn_impl = impl
    return net


# ----------------------------------------------------------------------------
# U-Net residual block: the union of DDPM++, NCSN++ and ADM blocks (App. F), optional attention.


class UNetBlock(torch.nn.Module):
    """Residual block with embedding conditioning and optional self-attention.

    x: (N, in_channels, H, W), emb: (N, emb_channels) -> (N, out_channels, H', W'), where
    H' = 2H (up), H/2 (down) or H.
    """

    def __init__(self,
        in_channels,                # Input channels.
        out_channels,               # Output channels.
        emb_channels,               # Embedding vector size.
        up=False,                   # 2x upsampling at the start of the block?
        down=False,                 # 2x downsampling at the start of the block?
        attention=False,            # Self-attention at the end of the block?
        num_heads=None,             # Attention heads; None = out_channels // channels_per_head.
        channels_per_head=64,       # Channels per head when num_heads is None.
        dropout=0,                  # Dropout probability before conv1.
        skip_scale=1,               # Scale of the residual sums (1/sqrt(2) for DDPM++/NCSN++).
        eps=1e-5,                   # GroupNorm epsilon.
        resample_filter=(1, 1),     # FIR taps of the up/down resampling.
        resample_proj=False,        # 1x1 conv on the resampled skip path even if channels match?
        adaptive_scale=True,        # Scale-and-shift (ADM) or add-only (DDPM++) conditioning.
        init=None,                  # Init kwargs of ordinary layers.
        init_zero=None,             # Init kwargs of the last conv and of the attention projection.
        init_attn=None,             # Init kwargs of the qkv conv; None = `init`.
    ):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = _num_heads(attention, num_heads, out_channels, channels_per_head)
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f'UNetBlock: {out_channels} channels do not split into '
                             f'{self.num_heads} attention heads')
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        self.attn_impl = 'official'

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(add_keep_dtype(x, params)))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = self._scale(add_keep_dtype(x, self.skip(orig) if self.skip is not None else orig))
        if self.num_heads:
            x = self._scale(add_keep_dtype(self._attend(x), x))
        return x

    def _scale(self, x):
        return x if self.skip_scale == 1 else x * self.skip_scale

    def _attend(self, x):
        """proj(attention(qkv(norm2(x)))); qkv channels are laid out as (head, c, 3) like EDM."""
        n, c = x.shape[0], x.shape[1]
        qkv = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1)
        q, k, v = qkv.unbind(2)
        a = attention(q, k, v, impl=self.attn_impl)
        return self.proj(a.reshape(x.shape))


def _num_heads(attention, num_heads, out_channels, channels_per_head):
    """0 without attention, else num_heads or out_channels // channels_per_head.

    As in EDM, the latter is 0 (attention silently off) when out_channels < channels_per_head.
    """
    if not attention:
        return 0
    if num_heads is not None:
        return num_heads
    return out_channels // channels_per_head


# ----------------------------------------------------------------------------
# Noise-level embeddings.


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding of DDPM++ and ADM. x: (N,) -> (N, num_channels) as [cos, sin]."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x.reshape(-1), freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of NCSN++ (buffer `freqs`). x: (N,) -> (N, num_channels)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x.reshape(-1), (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------
# Class labels and label dropout (classifier-free guidance).


def add_song_mapping(module, *, embedding_type, noise_channels, emb_channels, label_dim,
                     augment_dim, init):
    """Register the mapping network of DDPM++/NCSN++ (and the toy MLP) on ``module``, in the
    official names and order: map_noise, map_label, map_augment, map_layer0, map_layer1
    (noise (+ label + augment) embedding -> emb (N, emb_channels), EDM App. F)."""
    if embedding_type == 'positional':
        module.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
    else:
        module.map_noise = FourierEmbedding(num_channels=noise_channels)
    module.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
    module.map_augment = (Linear(augment_dim, noise_channels, bias=False, **init)
                          if augment_dim else None)
    module.map_layer0 = Linear(noise_channels, emb_channels, **init)
    module.map_layer1 = Linear(emb_channels, emb_channels, **init)


def prepare_labels(class_labels, label_dim, batch_size, training, label_dropout, device):
    """Labels (N or 1, label_dim), None = zeros; in training, rows are zeroed w.p. label_dropout."""
    if class_labels is None:
        class_labels = torch.zeros([1, label_dim], device=device)
    if training and label_dropout:
        keep = torch.rand([batch_size, 1], device=device) >= label_dropout
        class_labels = class_labels * keep.to(class_labels.dtype)
    return class_labels
