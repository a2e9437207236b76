"""EDM2's magnitude-preserving U-Net, its preconditioning and loss (edm_fast.nets.edm2,
edm_fast.nets.edm2_precond, edm_fast.losses.EDM2Loss).

The official key/shape lists (tests/data/official_edm2_state_dict_keys.txt, built from
NVlabs/edm2's networks_edm2.py) are matched on the ``meta`` device, so the 1.5e9-parameter
XXL costs no memory.
"""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from edm_fast.losses import EDM2Loss, make_loss
from edm_fast.nets import build_net
from edm_fast.nets.edm2 import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample
from edm_fast.nets.presets import PRESETS
from edm_fast.precond import Denoiser, EDMPrecond
from edm_fast.nets.edm2_precond import EDM2Denoiser, bake_for_inference, make_edm2_denoiser

KEYS_FILE = Path(__file__).parent / "data" / "official_edm2_state_dict_keys.txt"


def official_keys():
    """{preset: {key: shape}} in the file's (= the official state dict's) order."""
    out, current = {}, None
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].split(":")[0]
            out[current] = {}
        elif line and not line.startswith("#"):
            key, shape = line.split("\t")
            out[current][key] = tuple(int(n) for n in shape.strip("[]").split(",") if n.strip())
    return out


OFFICIAL = official_keys()


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_official_state_dict_loads_strictly(preset):
    """Every official preset: the same keys in the same order with the same shapes, and
    load_state_dict(strict=True) of tensors shaped as listed; unconditional nets lack only
    unet.emb_label.weight."""
    assert preset in PRESETS
    expected = OFFICIAL[preset]
    for label_dim in (1000, 0):
        keys = {k: s for k, s in expected.items() if label_dim or k != "unet.emb_label.weight"}
        with torch.device("meta"):
            net = build_net(preset, label_dim=label_dim)
            state = {k: torch.empty(s) for k, s in keys.items()}
        got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert list(got) == list(keys)
        assert got == keys
        net.load_state_dict(state, strict=True, assign=True)


def test_every_edm2_preset_is_listed():
    edm2 = {name for name, p in PRESETS.items() if p.arch == "edm2"}
    assert edm2 - {"tiny-edm2"} == set(OFFICIAL)


# ------------------------------------------------------------------------------------------
# Magnitude preservation, measured on 2^18 standard-normal values: the sample variance of n
# unit-variance values has a standard deviation of about sqrt(2/n) = 0.003, so a tolerance of
# 0.02 on the variance (the second moment where the mean is not 0) is > 6 standard deviations.

N = 1 << 18
TOL = 0.02


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_mp_silu_has_unit_second_moment():
    assert mp_silu(_randn(N)).square().mean().item() == pytest.approx(1, abs=TOL)
    plain = torch.nn.functional.silu(_randn(N)).square().mean().item()
    assert abs(plain - 1) > 0.5  # what the scaling corrects


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum_keeps_unit_variance(t):
    out = mp_sum(_randn(N, seed=1), _randn(N, seed=2), t)
    assert out.var().item() == pytest.approx(1, abs=TOL)
    assert torch.allclose(mp_sum(torch.ones(3), 2 * torch.ones(3), t),
                          torch.full((3,), (1 - t + 2 * t) / math.sqrt((1 - t) ** 2 + t ** 2)))


@pytest.mark.parametrize("t", [0.3, 0.5])
def test_mp_cat_keeps_unit_variance_and_balance(t):
    a, b = _randn(N // 64, 24, seed=3), _randn(N // 64, 40, seed=4)
    out = mp_cat(a, b, dim=1, t=t)
    assert out.shape == (N // 64, 64)
    assert out.var().item() == pytest.approx(1, abs=TOL)
    # the two parts' total energies are in the ratio (1 - t)^2 : t^2 whatever their widths
    ea, eb = out[:, :24].square().sum(1).mean(), out[:, 24:].square().sum(1).mean()
    assert (ea / eb).item() == pytest.approx((1 - t) ** 2 / t ** 2, rel=0.05)


def test_mp_fourier_has_unit_second_moment():
    torch.manual_seed(0)
    emb = MPFourier(256)
    assert emb(_randn(4096)).square().mean().item() == pytest.approx(1, abs=TOL)


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
def test_mp_conv_keeps_unit_variance(kernel):
    """Any weight (here a badly scaled one) is normalised: unit-variance input, unit-variance
    output (interior pixels for 3x3: zero padding lowers the border's)."""
    torch.manual_seed(0)
    conv = MPConv(32, 16, kernel)
    with torch.no_grad():
        conv.weight.mul_(7.0)
    x = _randn(N // 32, 32, seed=5) if not kernel else _randn(16, 32, 32, 32, seed=5)
    y = conv(x)
    y = y if not kernel else y[:, :, 1:-1, 1:-1]
    assert y.var().item() == pytest.approx(1, abs=TOL)
    assert conv(x, gain=3.0).var().item() == pytest.approx(9 * y.var().item(), rel=0.05)


def test_forced_weight_normalisation_in_training():
    """Training forward re-normalises the stored weight (Eq. 66); eval leaves it alone."""
    conv = MPConv(8, 4, (3, 3))
    with torch.no_grad():
        conv.weight.mul_(5.0)
    before = conv.weight.detach().clone()
    conv.eval()(torch.randn(1, 8, 4, 4))
    assert torch.equal(conv.weight, before)
    conv.train()(torch.randn(1, 8, 4, 4))
    rms = conv.weight.detach().square().mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(rms, torch.ones(4), atol=1e-3)  # eps = 1e-4 in normalize


def test_normalize_is_unit_rms_per_row():
    x = _randn(5, 7, 3) * 4
    assert torch.allclose(normalize(x).square().mean(dim=(1, 2)), torch.ones(5), atol=1e-3)


def test_resample_roundtrip_shapes():
    x = _randn(2, 3, 8, 8)
    down = resample(x, "down")
    assert down.shape == (2, 3, 4, 4)
    assert torch.allclose(down[0, 0, 0, 0], x[0, 0, :2, :2].mean())  # [1, 1] box filter
    assert torch.equal(resample(down, "up")[..., ::2, ::2], down)  # nearest neighbour up


# ------------------------------------------------------------------------------------------
# The tiny net: forward, baking, attention, sampling.

def _tiny(label_dim=10, seed=0):
    """tiny-edm2 with random gains (zero at init, which would make F = 0 and hide errors)."""
    torch.manual_seed(seed)
    net = build_net("tiny-edm2", label_dim=label_dim)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.copy_(torch.randn([]))
    return net


def _inputs(label_dim=10, n=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 16, 16, generator=g)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0])[:n]
    labels = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
    return x, sigma, labels


def test_tiny_forward_shape_and_scale():
    net = _tiny().eval()
    x, sigma, labels = _inputs()
    with torch.no_grad():
        out = net(x, sigma.log() / 4, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert 0.05 < out.std().item() < 20  # not zero, not blown up: the gains are ~N(0, 1)
    assert sum(p.numel() for p in build_net("tiny-edm2").parameters()) == 300_512


def test_baked_weights_equal_the_normalised_forward():
    """Baking reorders float32 products only (gain * w / sqrt(fan_in) once instead of per
    call): outputs agree to 1e-5 of their scale. Against the training-mode forward, whose
    in-place normalisation changes the weights by up to eps = 1e-4 relative, to 1e-3."""
    x, sigma, labels = _inputs()
    net = _tiny().eval()
    den = Denoiser(net, EDMPrecond())
    with torch.no_grad():
        ref = den(x, sigma, labels)
    train_net = _tiny().train()
    train_out = Denoiser(train_net, EDMPrecond())(x, sigma, labels).detach()
    net.bake_weights()
    assert net.is_baked and not any(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        baked = den(x, sigma, labels)
    scale = ref.abs().max().item()
    assert (baked - ref).abs().max().item() <= 1e-5 * scale
    assert (baked - train_out).abs().max().item() <= 1e-3 * scale
    keys = net.state_dict().keys()
    assert "unet.out_conv.baked_weight" in keys and "unet.out_conv.weight" not in keys


def test_baked_net_refuses_training_and_training_weights():
    net = _tiny().bake_weights()
    with pytest.raises(RuntimeError, match="baked"):
        net.train()(*_inputs()[:1], torch.zeros(4), None)
    with pytest.raises(RuntimeError, match="baked_weight"):
        net.load_state_dict(_tiny().state_dict(), strict=True)


def test_sdpa_attention_matches_official():
    """Same math, different summation order: 1e-5 of the output scale in float32."""
    x, sigma, labels = _inputs()
    net = _tiny().eval()
    with torch.no_grad():
        ref = net(x, sigma.log() / 4, labels)
        fast = net.set_attention_impl("sdpa")(x, sigma.log() / 4, labels)
    assert (fast - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    with pytest.raises(ValueError, match="attention impl"):
        net.set_attention_impl("flash")


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="augment"):
        build_net("tiny-edm2", augment_dim=9)
    with pytest.raises(ValueError, match="divisible"):
        build_net("tiny-edm2", img_resolution=18)
    with pytest.raises(ValueError, match="EDM2"):
        make_edm2_denoiser("tiny")


def test_unconditional_and_default_labels():
    """label_dim=0 takes no labels; a conditional net given None uses zero labels (as NVlabs)."""
    net = _tiny(label_dim=0).eval()
    x, sigma, _ = _inputs(label_dim=0)
    with torch.no_grad():
        assert net(x, sigma.log() / 4).shape == x.shape
    cond = _tiny().eval()
    with torch.no_grad():
        a = cond(x, sigma.log() / 4, None)
        b = cond(x, sigma.log() / 4, torch.zeros(4, 10))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bake", [False, True])
def test_tiny_samples_through_the_reference_backend(bake):
    """The Sampler runs EDM2 nets like any Denoiser; baked and unbaked give the same images
    (to 1e-4: 8 Heun steps compound the 1e-6 differences of single calls)."""
    from edm_fast.sampling.sampler import Sampler

    def images(bake):
        den = EDM2Denoiser(_tiny())
        if bake:
            bake_for_inference(den)
        sampler = Sampler(den, (1, 16, 16), batch_size=2, num_steps=8, device="cpu",
                          backend="reference")
        return sampler(seeds=[0, 1], class_labels=3)

    out = images(bake)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    if bake:
        assert (out - images(False)).abs().max().item() <= 1e-4 * out.abs().max().item()


def test_checkpoint_roundtrip_loads_baked(tmp_path):
    """An edm2 checkpoint (config in its metadata) loads through load_denoiser, baked, and
    gives the outputs of the network it was saved from."""
    from edm_fast.io.checkpoints import net_spec, save_checkpoint
    from edm_fast.io.models import load_denoiser

    net = _tiny()
    meta = {"net": net_spec("tiny-edm2", img_resolution=16, img_channels=1, label_dim=10),
            "precond": EDMPrecond().config(), "sample_shape": [1, 16, 16]}
    path = save_checkpoint(tmp_path / "edm2.safetensors",
                           {f"ema.{k}": v for k, v in net.state_dict().items()}, meta)
    loaded = load_denoiser(path)
    assert loaded.model.is_baked
    x, sigma, labels = _inputs()
    with torch.no_grad():
        ref = Denoiser(net.eval(), EDMPrecond())(x, sigma, labels)
        got = loaded(x, sigma, labels)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


# ------------------------------------------------------------------------------------------
# Preconditioning with the log-variance head, and the EDM2 loss (Eq. 21).

def test_denoiser_returns_logvar_of_the_head():
    den = EDM2Denoiser(_tiny()).eval()  # eval: training re-normalises the weights per call
    x, sigma, labels = _inputs()
    D, logvar = den(x, sigma, labels, return_logvar=True)
    assert torch.equal(D, den(x, sigma, labels))
    assert logvar.shape == (4, 1, 1, 1)
    assert torch.allclose(logvar.reshape(-1), den.model.logvar(sigma.log() / 4))
    # c_skip x + c_out F with EDM's coefficients (sigma_data = 0.5), F = the U-Net
    sd = 0.5
    F = den.model(x / (sigma ** 2 + sd ** 2).sqrt().reshape(-1, 1, 1, 1), sigma.log() / 4,
                  labels)
    s = sigma.reshape(-1, 1, 1, 1)
    manual = sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * F
    assert torch.allclose(D, manual, atol=1e-5)


def test_edm2_loss_is_eq21():
    """The per-element loss equals lambda/exp(u) (D - y)^2 + u for the same draws (eval mode:
    training re-normalises the weights in place at each call, by up to 1e-4)."""
    den = EDM2Denoiser(_tiny()).eval()
    y, _, labels = _inputs()
    loss_fn = make_loss({"name": "edm2", "P_mean": -0.4, "P_std": 1.0})
    loss = loss_fn(den, y, labels, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = (torch.randn(4, generator=g) * 1.0 - 0.4).exp()
    n = torch.randn(y.shape, generator=g) * sigma.reshape(-1, 1, 1, 1)
    D, u = den(y + n, sigma, labels, return_logvar=True)
    w = ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2).reshape(-1, 1, 1, 1)
    assert torch.allclose(loss, w / u.exp() * (D - y) ** 2 + u, rtol=1e-6)
    loss.mean().backward()
    assert den.model.logvar_linear.weight.grad.abs().sum() > 0


def test_edm2_loss_at_the_optimal_logvar_is_one_plus_log_weighted_error():
    """For one noise level (P_std = 0) and u a free scalar, the mean loss
    E[w e^-u (D-y)^2] + u is minimal at u* = ln E[w (D-y)^2], where it equals 1 + u*
    (Eq. 21 minimised over u). Newton's method on u from 0 reaches it."""
    den = EDM2Denoiser(_tiny()).eval()
    y, _, labels = _inputs()
    loss_fn = EDM2Loss(P_mean=math.log(0.7), P_std=0.0)
    u = torch.zeros([], requires_grad=True)
    den.model.logvar = lambda c_noise: u.expand(c_noise.shape[0])
    for _ in range(30):
        loss = loss_fn(den, y, labels, generator=torch.Generator().manual_seed(5)).mean()
        (grad,) = torch.autograd.grad(loss, u, create_graph=True)
        (hess,) = torch.autograd.grad(grad, u)
        with torch.no_grad():
            u -= grad / hess
    g = torch.Generator().manual_seed(5)
    sigma = torch.full((4,), 0.7)
    torch.randn(4, generator=g)  # the sigma draw (P_std = 0)
    n = torch.randn(y.shape, generator=g) * 0.7
    with torch.no_grad():
        err = (den(y + n, sigma, labels) - y) ** 2
        u_star = math.log((((0.49 + 0.25) / (0.7 * 0.5) ** 2) * err).mean().item())
        final = loss_fn(den, y, labels, generator=torch.Generator().manual_seed(5)).mean()
    assert u.item() == pytest.approx(u_star, abs=1e-5)
    assert final.item() == pytest.approx(1 + u_star, abs=1e-5)


def test_edm2_loss_needs_the_logvar_head():
    with pytest.raises(ValueError, match="EDM2 denoiser"):
        EDM2Loss()(Denoiser(_tiny(), EDMPrecond()), *_inputs()[::2])


# ------------------------------------------------------------------------------------------
# Official NVlabs/edm2 snapshots, synthesised in the official pickle structure (every network
# object reduces to torch_utils.persistence._reconstruct_persistent_obj(meta), the root is a
# dnnlib EasyDict, the encoder keeps numpy arrays) without importing NVlabs' code: the modules
# named in the pickle exist in sys.modules only while it is written.

OFFICIAL_CLASS = {"EDM2Net": "Precond", "UNet": "UNet", "Block": "Block", "MPConv": "MPConv",
                  "MPFourier": "MPFourier"}
TINY_KWARGS = dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
                   attn_resolutions=[8], channels_per_head=16, dropout=0.0)


def _write_official_edm2(path, net, monkeypatch, *, encoder_scale=None, module_src=None):
    import pickle
    import types

    import numpy as np

    def fake_module(name, **attrs):
        module = types.ModuleType(name)
        for key, value in attrs.items():
            value.__module__, value.__qualname__ = name, key
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
        return module

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError("never called")

    class EasyDict(dict):
        pass

    class Encoder:
        pass

    fake_module("torch_utils")
    persistence = fake_module("torch_utils.persistence",
                              _reconstruct_persistent_obj=_reconstruct_persistent_obj)
    fake_module("dnnlib")
    fake_module("dnnlib.util", EasyDict=EasyDict)
    src = module_src or "raise SystemExit('module_src must never run')\n"

    def record(class_name, state):
        meta = dict(type="class", version=6, module_src=src, class_name=class_name,
                    state=state)
        return persistence._reconstruct_persistent_obj, (meta,)

    kwargs = dict(img_resolution=net.img_resolution, img_channels=net.img_channels,
                  label_dim=net.label_dim, use_fp16=True, logvar_channels=32, **TINY_KWARGS)

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            name = OFFICIAL_CLASS.get(type(obj).__name__)
            if name is not None and type(obj).__module__.startswith("edm_fast."):
                state = {k: v for k, v in obj.__dict__.items() if k != "attn_impl"}
                state.update(_init_args=(), _init_kwargs=kwargs if name == "Precond" else {})
                return record(name, state)
            if isinstance(obj, Encoder):
                return record("StabilityVAEEncoder", dict(obj.__dict__))
            return NotImplemented

    encoder = Encoder()
    scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
    encoder.__dict__.update(vae_name="stabilityai/sd-vae-ft-mse",
                            scale=scale if encoder_scale is None else encoder_scale,
                            bias=np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale,
                            batch_size=8, _vae=None, _init_args=(), _init_kwargs={})
    root = EasyDict(ema=net, encoder=encoder, loss_fn=None,
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                        path="datasets/img512-sd.zip"))
    with open(path, "wb") as f:
        Pickler(f, protocol=4).dump(root)


def _official_tiny(label_dim=10):
    """tiny-edm2 with random gains, its weights rounded to float16 (official snapshots store
    float16) and back, so that the float32 reference equals what the file holds."""
    net = _tiny(label_dim).eval().requires_grad_(False)
    return net.half().float()


def test_official_edm2_snapshot_loads_without_running_its_code(tmp_path, monkeypatch):
    from edm_fast.io.models import load_denoiser
    from edm_fast.io.official import read_official

    net = _official_tiny()
    path = tmp_path / "edm2-img16-tiny-0000004-0.050.pkl"
    with monkeypatch.context() as m:
        _write_official_edm2(path, net.half(), m)
    net.float()
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    state, config = read_official(path)
    assert list(state) == list(net.state_dict())
    assert config["net"]["arch"] == "edm2" and config["precond"]["name"] == "edm"
    assert config["net"]["kwargs"]["label_dim"] == 10
    assert config["sample_shape"] == [1, 16, 16]
    encoder = config["official"]["encoder"]
    assert encoder["class"] == "StabilityVAEEncoder" and len(encoder["scale"]) == 4
    assert encoder["scale"][0] == pytest.approx(0.5 / 4.17, rel=1e-6)
    den = load_denoiser(path)
    assert den.model.is_baked
    x, sigma, labels = _inputs()
    with torch.no_grad():
        ref = Denoiser(net, EDMPrecond())(x, sigma, labels)
        got = den(x, sigma, labels)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_official_edm2_convert_roundtrip(tmp_path, monkeypatch):
    from edm_fast.cli.main import main
    from edm_fast.io.models import load_denoiser

    net = _official_tiny(label_dim=0)
    src = tmp_path / "edm2-tiny.pkl"
    with monkeypatch.context() as m:
        _write_official_edm2(src, net, m)
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    den = load_denoiser(out)
    x, sigma, _ = _inputs(label_dim=0)
    with torch.no_grad():
        ref = Denoiser(net, EDMPrecond())(x, sigma)
        assert (den(x, sigma) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_official_edm2_hostile_variants_are_refused(tmp_path, monkeypatch, capsys):
    """An object array where the encoder keeps numbers, and module_src that would write a
    file: refused in one line / never executed."""
    import numpy as np

    from edm_fast.cli.main import main

    evil = tmp_path / "evil.pkl"
    with monkeypatch.context() as m:
        _write_official_edm2(evil, _official_tiny(), m,
                             encoder_scale=np.array([1.0, "x"], dtype=object))
    assert main(["convert", str(evil), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "numpy" in err and len(err.strip().splitlines()) == 1
    marker = tmp_path / "pwned"
    src = tmp_path / "src.pkl"
    with monkeypatch.context() as m:
        _write_official_edm2(src, _official_tiny(), m,
                             module_src=f"open({str(marker)!r}, 'w').write('x')\n")
    from edm_fast.io.models import load_denoiser

    load_denoiser(src)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# Exports and the other backends (slow: export / compilation of the whole net).

@pytest.mark.slow
@pytest.mark.parametrize("bake", [True, False])
def test_onnx_export_of_tiny_edm2(tmp_path, bake):
    """ONNX Runtime against PyTorch on the export's own check cases (tolerance: the exporter's
    float32 default, 1e-4 relative). 'auto' goes straight to the dynamo exporter (the
    TorchScript one cannot export EDM2's convolutions), without a warning."""
    pytest.importorskip("onnxruntime")
    from edm_fast.io.onnx_export import export_onnx

    den = EDM2Denoiser(_tiny()).eval()
    if bake:
        bake_for_inference(den)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = export_onnx(den, tmp_path / "tiny-edm2.onnx", sample_shape=(1, 16, 16))
    assert report.exporter == "dynamo" and report.opset >= 18
    assert report.checks and report.max_rel_err <= report.tolerance


@pytest.mark.slow
def test_compiled_backend_matches_reference_on_tiny_edm2():
    """torch.compile of the baked net against the reference loop: 1e-4 of the image scale
    (fused kernels reorder float32 sums; 8 Heun steps compound them)."""
    from edm_fast.sampling.sampler import Sampler

    den = bake_for_inference(EDM2Denoiser(_tiny()).eval())
    images = {}
    for backend in ("reference", "compiled"):
        sampler = Sampler(den, (1, 16, 16), batch_size=2, num_steps=8, device="cpu",
                          backend=backend)
        images[backend] = sampler(seeds=[0, 1], class_labels=3)
    scale = images["reference"].abs().max().item()
    assert (images["compiled"] - images["reference"]).abs().max().item() <= 1e-4 * scale
