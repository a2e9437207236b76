"""Non-leaking geometric augmentation (EDM App. F.2, after ADA: Karras et al. 2020).

Each transform is applied to a sample with probability p * multiplier. The network is told what
was done through ``augment_labels`` and is sampled with zero labels (no augmentation), so the
augmentations do not leak into generated images. Implemented (geometric only, no colour):

    pixel blitting   xflip, yflip, rotate_int (multiples of 90 deg), translate_int (reflect)
    general affine   scale (isotropic), rotate_frac (any angle), aniso (anisotropic scaling),
                     translate_frac (sub-pixel) -- one combined resampling per image

Label layout, one column group per *enabled* transform, in this order (the official EDM
AugmentPipe layout): xflip [1], yflip [1], rotate_int [2], translate_int [2], scale [1],
rotate_frac [2: cos a - 1, sin a], aniso [2: w cos r, w sin r], translate_frac [2].
The defaults are EDM's CIFAR-10 setting (xflip=1e8, yflip=scale=rotate_frac=aniso=
translate_frac=1, p=0.12), which gives 9 columns: augment_dim=9 as in the official networks.

The affine part maps output pixels to source pixels with a 3x3 matrix G_inv in pixel units
about the image centre (x right, y down), upsamples the reflect-padded image 2x with the
orthonormal sym6 wavelet filter, samples it bilinearly and filters back down, which limits
aliasing. That resampling can overshoot [-1, 1] slightly at sharp edges, as in the official code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AugmentPipe"]

# sym6 (least-asymmetric Daubechies, 12 taps) scaling filter: sum = sqrt(2), orthonormal to
# its even shifts, so 2x upsampling followed by 2x downsampling with it is the identity.
_SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)
# Its centre of mass (~5.10 taps, not the midpoint 5.5): placing pixels there keeps rotations
# centred (a 90 degree rotate_frac then matches rot90 to ~1e-3 instead of ~1e-1).
_SYM6_CENTRE = sum(k * v for k, v in enumerate(_SYM6)) / sum(_SYM6)

#----------------------------------------------------------------------------
# Batched 3x3 homogeneous 2-D transforms; every argument is a (N,) tensor.


def _matrix(a, b, tx, c, d, ty) -> torch.Tensor:
    """[[a, b, tx], [c, d, ty], [0, 0, 1]] per sample -> (N, 3, 3)."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=-1).reshape(-1, 3, 3)


def _rotate(theta):
    cos, sin = theta.cos(), theta.sin()
    return _matrix(cos, -sin, torch.zeros_like(theta), sin, cos, torch.zeros_like(theta))


def _scale(sx, sy):
    zero = torch.zeros_like(sx)
    return _matrix(sx, zero, zero, zero, sy, zero)


def _translate(tx, ty):
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    return _matrix(one, zero, tx, zero, one, ty)

#----------------------------------------------------------------------------
# Executing transforms.


def _reflect_index(i: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror integer coordinates into [0, size) without repeating the edge pixel."""
    period = max(2 * size - 2, 1)
    i = i % period
    return torch.where(i >= size, period - i, i)


def _translate_int(images: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Shift each image by integer (tx, ty) pixels, (N,) each, filling with its reflection.
    NVlabs' convention, which the augment label encodes: output pixel (x, y) reads source pixel
    (x - tx, y + ty), so content moves right by tx and up by ty."""
    N, C, H, W = images.shape
    dev = images.device
    xs = _reflect_index(torch.arange(W, device=dev)[None] - tx[:, None], W)  # (N, W)
    ys = _reflect_index(torch.arange(H, device=dev)[None] + ty[:, None], H)  # (N, H)
    n = torch.arange(N, device=dev)[:, None, None]
    return images[n, :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)  # (N,H,W,C) -> NCHW


def _rotate_int(images: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each image by k[i] * 90 degrees (torch.rot90 over (H, W)); k: (N,) in 0..3."""
    if images.shape[2] != images.shape[3]:
        raise ValueError("rotate_int needs square images")
    out = images
    for j in (1, 2, 3):
        out = torch.where((k == j).view(-1, 1, 1, 1), images.rot90(j, dims=(2, 3)), out)
    return out


def _upsample2x_w(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Zero-insertion 2x upsampling along W filtered with f, (N, C, H, L) -> (N, C, H, 2L+K-2).

    Equals conv_transpose with stride 2 (out[2j + k] += x[j] f[k]), computed as two polyphase
    convolutions (even taps, odd taps) that are interleaved.
    """
    N, C, H, L = x.shape
    taps = len(f) // 2
    w = torch.stack([f[0::2], f[1::2]]).flip(1).view(2, 1, 1, taps).repeat(C, 1, 1, 1)
    y = F.conv2d(x, w, padding=(0, taps - 1), groups=C)  # (N, 2C, H, L+taps-1)
    return y.view(N, C, 2, H, L + taps - 1).permute(0, 1, 3, 4, 2).reshape(N, C, H, -1)


def _warp(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Resample images (N, C, H, W): output pixel p reads source point G_inv p, (N, 3, 3).

    Coordinates are in pixels about the image centre. Steps: reflect-pad by the margin the
    transform needs, upsample 2x with sym6 (polyphase conv), bilinear sampling on the 2x
    output grid, downsample 2x with sym6 (strided conv). Syncs with the host once (margins).
    """
    N, C, H, W = images.shape
    dev, dtype = images.device, images.dtype
    x = images.to(torch.float32)
    f = torch.tensor(_SYM6, dtype=torch.float32, device=dev)
    K = len(f)
    half = _SYM6_CENTRE
    cx, cy = (W - 1) / 2, (H - 1) / 2
    g_inv = g_inv.to(device=dev, dtype=torch.float32)

    # Margin: where the corners of the 2x grid read by the down-filter land in the source,
    # plus the up-filter's support (K/4 source pixels) and one bilinear tap.
    ex, ey = cx + half / 2, cy + half / 2
    corners = torch.tensor([[-ex, ex, ex, -ex], [-ey, -ey, ey, ey], [1.0] * 4], device=dev)
    src = g_inv @ corners  # (N, 3, 4)
    support = K // 4 + 1
    lo_x, hi_x, lo_y, hi_y = torch.stack([src[:, 0].min(), src[:, 0].max(),
                                          src[:, 1].min(), src[:, 1].max()]).tolist()

    def margin(v: float, size: int) -> int:
        return int(min(max(math.ceil(v + support), 0), size - 1))
    mx0, mx1 = margin(-lo_x - cx, W), margin(hi_x - cx, W)
    my0, my1 = margin(-lo_y - cy, H), margin(hi_y - cy, H)
    x = F.pad(x, (mx0, mx1, my0, my1), mode="reflect")

    # Upsample 2x: source pixel j lands at up-index 2j + half.
    x = _upsample2x_w(_upsample2x_w(x, f).transpose(2, 3), f).transpose(2, 3)

    # 2x output grid r (the down-filter reads r = 2q + k) in centred coordinates, then G_inv.
    c_x = (torch.arange(2 * W + K - 2, device=dev) - half) / 2 - cx  # (Lw,)
    c_y = (torch.arange(2 * H + K - 2, device=dev) - half) / 2 - cy  # (Lh,)
    g = g_inv[:, :2, :, None, None]  # (N, 2, 3, 1, 1)
    s = g[:, :, 0] * c_x[None, :] + g[:, :, 1] * c_y[:, None] + g[:, :, 2]  # (N, 2, Lh, Lw)
    n_x = 2 * (s[:, 0] + mx0 + cx) + half  # up-sampled pixel index
    n_y = 2 * (s[:, 1] + my0 + cy) + half
    grid = torch.stack([(2 * n_x + 1) / x.shape[3] - 1, (2 * n_y + 1) / x.shape[2] - 1], -1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Downsample 2x with the same filter: output q reads 2q .. 2q + K - 1.
    x = F.conv2d(x, f.view(1, 1, 1, K).repeat(C, 1, 1, 1), stride=(1, 2), groups=C)
    x = F.conv2d(x, f.view(1, 1, K, 1).repeat(C, 1, 1, 1), stride=(2, 1), groups=C)  # (N, C, H, W)
    return x.to(dtype)

#----------------------------------------------------------------------------
# The pipeline.


class AugmentPipe:
    """Geometric augmentations with probability p each; returns (images, augment_labels (N, L))."""

    def __init__(
        self,
        p: float = 0.12,                   # Overall probability multiplier (EDM CIFAR-10: 0.12).
        xflip: float = 1e8,                # Multiplier for x-flip (1e8: always "decided", 50 %).
        yflip: float = 1,                  # Multiplier for y-flip.
        rotate_int: float = 0,             # Multiplier for rotation by a multiple of 90 degrees.
        translate_int: float = 0,          # Multiplier for integer translation.
        translate_int_max: float = 0.125,  # Range of integer translation, fraction of size.
        scale: float = 1,                  # Multiplier for isotropic scaling.
        rotate_frac: float = 1,            # Multiplier for rotation by any angle.
        aniso: float = 1,                  # Multiplier for anisotropic scaling.
        translate_frac: float = 1,         # Multiplier for fractional translation.
        scale_std: float = 0.2,            # Std of log2 isotropic scale.
        rotate_frac_max: float = 1,        # Range of rotation, 1 = full circle.
        aniso_std: float = 0.2,            # Std of log2 anisotropic scale.
        aniso_rotate_prob: float = 0.5,    # Probability of a rotated frame for anisotropy.
        translate_frac_std: float = 0.125, # Std of fractional translation, fraction of size.
    ):
        self.p = float(p)
        self.xflip, self.yflip = float(xflip), float(yflip)
        self.rotate_int, self.translate_int = float(rotate_int), float(translate_int)
        self.translate_int_max = float(translate_int_max)
        self.scale, self.rotate_frac = float(scale), float(rotate_frac)
        self.aniso, self.translate_frac = float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max = float(scale_std), float(rotate_frac_max)
        self.aniso_std, self.aniso_rotate_prob = float(aniso_std), float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    @property
    def label_dim(self) -> int:
        """Columns of augment_labels (the network's augment_dim)."""
        widths = [(self.xflip, 1), (self.yflip, 1), (self.rotate_int, 2),
                  (self.translate_int, 2), (self.scale, 1), (self.rotate_frac, 2),
                  (self.aniso, 2), (self.translate_frac, 2)]
        return sum(width for mult, width in widths if mult > 0)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment images (N, C, H, W) -> (images (N, C, H, W), labels (N, label_dim) float32).

        Random parameters come from `generator` (drawn on its device, then moved), or from the
        global RNG on the images' device.
        """
        N, C, H, W = images.shape
        dev = images.device
        gen_dev = generator.device if generator is not None else dev

        def rand(*shape):
            return torch.rand(shape, generator=generator, device=gen_dev).to(dev)

        def randn(*shape):
            return torch.randn(shape, generator=generator, device=gen_dev).to(dev)

        def gated(w, multiplier):  # keep w with probability p * multiplier, else 0
            return torch.where(rand(N) < multiplier * self.p, w, torch.zeros_like(w))

        labels = []
        # Pixel blitting.
        if self.xflip > 0:
            w = gated((rand(N) < 0.5).float(), self.xflip)
            images = torch.where(w.view(N, 1, 1, 1) > 0, images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = gated((rand(N) < 0.5).float(), self.yflip)
            images = torch.where(w.view(N, 1, 1, 1) > 0, images.flip(2), images)
            labels.append(w)
        if self.rotate_int > 0:
            k = gated(torch.floor(rand(N) * 4).clamp(max=3), self.rotate_int)
            images = _rotate_int(images, k)
            labels += [((k == 1) | (k == 2)).float(), ((k == 2) | (k == 3)).float()]
        if self.translate_int > 0:
            w = gated((rand(2, N) * 2 - 1), self.translate_int)  # one gate for x and y
            tx = (w[0] * (W * self.translate_int_max)).round()
            ty = (w[1] * (H * self.translate_int_max)).round()
            images = _translate_int(images, tx.long(), ty.long())
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]

        # General affine: compose G_inv (output -> source), then resample once.
        g_inv = torch.eye(3, device=dev).expand(N, 3, 3)
        if self.scale > 0:
            w = gated(randn(N), self.scale)
            s = torch.exp2(w * self.scale_std)
            g_inv = g_inv @ _scale(1 / s, 1 / s)
            labels.append(w)
        if self.rotate_frac > 0:
            w = gated((rand(N) * 2 - 1) * (math.pi * self.rotate_frac_max), self.rotate_frac)
            g_inv = g_inv @ _rotate(w)
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = gated(randn(N), self.aniso)
            r = (rand(N) * 2 - 1) * math.pi
            r = torch.where(rand(N) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            r = torch.where(w != 0, r, torch.zeros_like(r))  # exact identity when not applied
            s = torch.exp2(w * self.aniso_std)
            g_inv = g_inv @ _rotate(-r) @ _scale(1 / s, s) @ _rotate(r)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = gated(randn(2, N), self.translate_frac)
            g_inv = g_inv @ _translate(-w[0] * (W * self.translate_frac_std),
                                       -w[1] * (H * self.translate_frac_std))
            labels += [w[0], w[1]]

        active = (g_inv != torch.eye(3, device=dev)).any(dim=2).any(dim=1).nonzero()[:, 0]
        if len(active) > 0:  # resample only the samples whose transform is not the identity
            images = images.clone()
            images[active] = _warp(images[active], g_inv[active])

        if not labels:
            return images, torch.zeros(N, 0, device=dev)
        return images, torch.stack([v.to(torch.float32) for v in labels], dim=1)
