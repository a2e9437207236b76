"""Tests for edm_fast.train.augment: the non-leaking geometric augmentation pipeline."""

import math

import pytest
import torch

from edm_fast.train.augment import AugmentPipe, _rotate, _translate, _warp

ONLY = dict(xflip=0, yflip=0, rotate_int=0, translate_int=0, scale=0, rotate_frac=0, aniso=0,
            translate_frac=0)  # everything off; tests switch on what they need


def _smooth(n=4, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    """Smooth random images in [-1, 1], (n, c, h, w): low frequencies only."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    out = torch.zeros(n, c, h, w)
    for _ in range(4):
        fx, fy, phase = torch.rand(3, n, c, 1, 1, generator=g) * torch.tensor([3, 3, 6])[:, None,
                                                                                   None, None, None]
        out += torch.sin(2 * math.pi * (fx * xx + fy * yy) + phase)
    return out / 4


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_p0_is_identity_with_zero_labels():
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    pipe = AugmentPipe(p=0)
    y, labels = pipe(x, _gen())
    assert torch.equal(x, y)
    assert labels.shape == (8, 9) and pipe.label_dim == 9 and torch.all(labels == 0)


def test_label_layout():
    x = _smooth(6)
    assert AugmentPipe(p=1)(x, _gen())[1].shape == (6, 9)  # EDM CIFAR-10 augment_dim
    full = AugmentPipe(p=1, rotate_int=1, translate_int=1)
    assert full.label_dim == 13 and full(x, _gen())[1].shape == (6, 13)
    assert AugmentPipe(p=1, **ONLY)(x, _gen())[1].shape == (6, 0)
    labels = AugmentPipe(p=1, **{**ONLY, "rotate_frac": 1})(x, _gen())[1]
    assert torch.allclose((labels[:, 0] + 1) ** 2 + labels[:, 1] ** 2, torch.ones(6))  # cos, sin
    assert labels[:, 1].abs().min() > 0


def test_xflip_mirrors_known_image_and_sets_label():
    ramp = torch.linspace(-1, 1, 8).expand(16, 1, 8, 8).clone()  # left -1 ... right +1
    y, labels = AugmentPipe(p=1, **{**ONLY, "xflip": 1e8})(ramp, _gen(3))
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 16 and set(labels[:, 0].tolist()) <= {0.0, 1.0}
    assert torch.all(y[flipped][..., 0] == 1) and torch.all(y[flipped][..., -1] == -1)
    assert torch.equal(y[flipped], ramp[flipped].flip(3))
    assert torch.equal(y[~flipped], ramp[~flipped])


def test_yflip_and_rotate_int_follow_labels():
    x = _smooth(16, h=12, w=12)
    y, labels = AugmentPipe(p=1, **{**ONLY, "yflip": 1, "rotate_int": 1})(x, _gen(1))
    k_from_bits = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    ks = set()
    for i in range(16):
        ref = x[i].flip(1) if labels[i, 0] == 1 else x[i]
        k = k_from_bits[(int(labels[i, 1]), int(labels[i, 2]))]
        ks.add(k)
        assert torch.equal(y[i], ref.rot90(k, dims=(1, 2)))
    assert len(ks) >= 3


def test_translate_int_shifts_with_reflection():
    x = _smooth(8, h=16, w=16)
    pipe = AugmentPipe(p=1, **{**ONLY, "translate_int": 1}, translate_int_max=0.25)
    y, labels = pipe(x, _gen(2))
    tx = (labels[:, 0] * 16 * 0.25).round().long()
    ty = (labels[:, 1] * 16 * 0.25).round().long()
    assert tx.abs().max() > 0 and ty.abs().max() > 0
    for i in range(8):
        # NVlabs' convention: output (x, y) reads source (x - tx, y + ty)
        shifted = torch.roll(x[i], (-int(ty[i]), int(tx[i])), dims=(1, 2))
        inner = (slice(None), slice(4, 12), slice(4, 12))  # |t| <= 4: untouched by the border
        assert torch.equal(y[i][inner], shifted[inner])
        assert set(y[i].flatten().tolist()) <= set(x[i].flatten().tolist())  # values are moved


def test_warp_identity_translation_and_rotation():
    x = _smooth(2, h=24, w=24)
    eye = torch.eye(3).expand(2, 3, 3)
    # float32 resampling of values in [-1, 1]: the identity warp's sampling coordinates round
    # (measured 9e-7 here); 1e-5 is that with margin
    torch.testing.assert_close(_warp(x, eye), x, atol=1e-5, rtol=0)
    t = _translate(torch.tensor([-2.0, 3.0]), torch.tensor([1.0, 0.0]))  # reads p + (tx, ty)
    out = _warp(x, t)
    for i, (dx, dy) in enumerate([(2, -1), (-3, 0)]):
        ref = torch.roll(x[i], (dy, dx), dims=(1, 2))
        torch.testing.assert_close(out[i][:, 4:-4, 4:-4], ref[:, 4:-4, 4:-4], atol=1e-5, rtol=0)
    rot = _warp(x, _rotate(torch.full((2,), math.pi / 2)))  # must land on pixel centres
    err = (rot - x.rot90(1, dims=(2, 3)))[..., 3:-3, 3:-3].abs().max()
    assert err < 0.02, err  # a centre off by a quarter pixel gives ~0.1


def test_untransformed_samples_are_exact_and_ranges_preserved():
    x = _smooth(32, h=16, w=16)
    y, labels = AugmentPipe(p=0.3)(x, _gen(5))
    assert y.shape == x.shape and y.dtype == x.dtype
    plain = (labels[:, 2:] == 0).all(dim=1)  # no geometric transform: at most a flip
    assert 0 < plain.sum() < 32
    for i in plain.nonzero()[:, 0].tolist():
        ref = x[i].flip(2) if labels[i, 0] else x[i]
        ref = ref.flip(1) if labels[i, 1] else ref
        assert torch.equal(y[i], ref)
    assert y.min() >= -1.1 and y.max() <= 1.1  # anti-aliased resampling overshoots slightly
    assert not torch.equal(y[~plain], x[~plain])


def test_same_seed_same_result():
    x = _smooth(8)
    pipe = AugmentPipe(p=0.5, rotate_int=1, translate_int=1)
    a, la = pipe(x, _gen(9))
    b, lb = pipe(x, _gen(9))
    c, lc = pipe(x, _gen(10))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)
    y, labels = pipe(x)  # global RNG on the images' device also works
    assert y.shape == x.shape and labels.shape == (8, 13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_images_with_cpu_generator():
    x = _smooth(4).cuda()
    y, labels = AugmentPipe(p=1)(x, _gen(0))
    y_cpu, labels_cpu = AugmentPipe(p=1)(x.cpu(), _gen(0))
    assert y.device == x.device and labels.device == x.device
    # CUDA and CPU float32 kernels differ in summation order (and TF32 where allowed)
    torch.testing.assert_close(y.cpu(), y_cpu, atol=1e-4, rtol=0)
    torch.testing.assert_close(labels.cpu(), labels_cpu)
