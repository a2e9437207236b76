"""Offline FID / FD_DINOv2 / precision-recall (edm_fast.eval.fid, edm_fast.eval.feature_nets,
edm_fast.eval.metric_images, ``edm-fast metrics``).

The real weights cannot be downloaded here, so the networks are checked against the published
architectures (state-dict key names and shapes, the input resizing) and the pipeline runs with
random weights saved in the accepted file formats; the Frechet math is checked against
scipy.linalg.sqrtm (the formula NVlabs' fid.py uses) and closed forms.
"""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from edm_fast.cli.main import main
from edm_fast.errors import BadFileError
from edm_fast.eval.feature_nets import (
    DinoV2ViT,
    InceptionV3Features,
    MissingWeightsError,
    load_dinov2,
    load_inception,
    tf1_bilinear_resize,
)
from edm_fast.eval.fid import (
    feature_statistics,
    frechet_distance_from_stats,
    frechet_distance_to_stats,
    knn_radii,
    load_reference_stats,
    precision_recall,
    save_reference_stats,
)
from edm_fast.eval.metric_images import compute_features, image_batches

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=4)  # test-sized DINOv2 variant, same key names


def scipy_frechet(mu1, s1, mu2, s2):
    """The formula of NVlabs' fid.py / edm2's calculate_metrics.py: a general sqrtm of S1 S2."""
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * root.real))


def random_gaussian(rng, d, n):
    a = rng.standard_normal((n, d)) * rng.uniform(0.2, 3.0, size=d)
    return feature_statistics(torch.from_numpy(a + rng.standard_normal(d)))


# ---------------------------------------------------------------------------------------------
# Frechet distance


@pytest.mark.parametrize("d,n1,n2", [(4, 50, 80), (32, 400, 300), (64, 30, 500), (64, 20, 40)])
def test_frechet_matches_scipy_sqrtm(d, n1, n2):
    """Full-rank and rank-deficient (n < d, as FID on few images) covariances. Tolerance:
    relative 1e-7 of Tr(S1) + Tr(S2); both sides are float64, but scipy's sqrtm of the
    non-symmetric, possibly singular S1 S2 loses digits (round-off about cond * 1e-16)."""
    rng = np.random.default_rng(d + n1)
    mu1, s1 = random_gaussian(rng, d, n1)
    mu2, s2 = random_gaussian(rng, d, n2)
    expected = scipy_frechet(mu1, s1, mu2, s2)
    scale = np.trace(s1) + np.trace(s2)
    for value in (frechet_distance_from_stats(mu1, s1, mu2, s2),
                  frechet_distance_from_stats(mu2, s2, mu1, s1)):
        assert value == pytest.approx(expected, abs=1e-7 * scale)


@pytest.mark.parametrize("n", [10, 65, 200])
def test_frechet_from_features_equals_from_stats(n):
    """The low-rank route (n - 1 < D: an n x n eigenproblem) and the D x D one agree."""
    rng = np.random.default_rng(n)
    features = torch.from_numpy(rng.standard_normal((n, 64)) * 2 + 0.3)
    mu2, s2 = random_gaussian(rng, 64, 300)
    mu1, s1 = feature_statistics(features)
    scale = np.trace(s1) + np.trace(s2)
    assert frechet_distance_to_stats(features, mu2, s2) == pytest.approx(
        frechet_distance_from_stats(mu1, s1, mu2, s2), abs=1e-9 * scale)  # float64 round-off


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    mu, s = random_gaussian(rng, 16, 100)
    # identical Gaussians: 0 (round-off of Tr(S) - Tr((S S)^1/2) only)
    assert frechet_distance_from_stats(mu, s, mu, s) == pytest.approx(0, abs=1e-10 * np.trace(s))
    # same covariance, shifted mean: ||d||^2
    shift = rng.standard_normal(16)
    assert frechet_distance_from_stats(mu, s, mu + shift, s) == pytest.approx(
        np.square(shift).sum(), rel=1e-9)
    # commuting (diagonal) covariances: sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    assert frechet_distance_from_stats(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(
        np.square(np.sqrt(a) - np.sqrt(b)).sum(), rel=1e-9)


def test_feature_statistics_match_numpy():
    f = np.random.default_rng(1).standard_normal((40, 7))
    mu, sigma = feature_statistics(torch.from_numpy(f))
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-14)
    assert mu.dtype == sigma.dtype == np.float64


def test_mismatched_statistics_are_refused():
    with pytest.raises(ValueError, match="statistics do not match"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------
# Precision / recall (Kynkaanniemi et al. 2019)


def test_knn_radii_against_brute_force():
    x = torch.tensor([[float(i)] for i in range(10)], dtype=torch.float64)
    # on the line 0..9 the third nearest other point of 0 is at 3, of 5 at 2 (4, 6, then 3 or 7)
    radii = knn_radii(x, 3, batch=4)
    assert radii[0] == 3 and radii[5] == 2 and radii[9] == 3
    from sklearn.neighbors import NearestNeighbors

    cloud = torch.randn(57, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dist, _ = NearestNeighbors(n_neighbors=4).fit(cloud.numpy()).kneighbors(cloud.numpy())
    np.testing.assert_allclose(knn_radii(cloud, 3, batch=10).numpy(), dist[:, 3], rtol=1e-12)


def test_precision_recall_known_answers():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g, dtype=torch.float64)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)  # identical clouds
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)  # disjoint clouds
    precision, recall = precision_recall(real, real[:20], batch=7)  # a subset
    assert precision == 1.0 and recall < 1.0
    # by hand on a line: real 0..9 (k = 3 radius 3 at 9); 11.9 and 4.5 inside, 12.5 outside
    line = torch.arange(10, dtype=torch.float64)[:, None]
    gen = torch.tensor([[11.9], [12.5], [4.5], [3.0]], dtype=torch.float64)
    precision, _ = precision_recall(line, gen)
    assert precision == pytest.approx(3 / 4)


def test_precision_recall_needs_more_points_than_k():
    with pytest.raises(ValueError, match="nearest neighbours"):
        precision_recall(torch.zeros(3, 2), torch.zeros(5, 2), k=3)


# ---------------------------------------------------------------------------------------------
# The networks against the published architectures


def _inception_spec():
    """{key: shape} of pytorch-fid's FID Inception (torchvision's Inception3, 1008 classes,
    no auxiliary head), written from torchvision's layer table."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
             ("Conv2d_2b_3x3", 32, 64, 3, 3), ("Conv2d_3b_1x1", 64, 80, 1, 1),
             ("Conv2d_4a_3x3", 80, 192, 3, 3)]

    def a(name, cin, pool):
        convs.extend([(f"{name}.branch1x1", cin, 64, 1, 1), (f"{name}.branch5x5_1", cin, 48, 1, 1),
                      (f"{name}.branch5x5_2", 48, 64, 5, 5),
                      (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
                      (f"{name}.branch3x3dbl_2", 64, 96, 3, 3),
                      (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
                      (f"{name}.branch_pool", cin, pool, 1, 1)])

    def c(name, c7):
        convs.extend([(f"{name}.branch1x1", 768, 192, 1, 1), (f"{name}.branch7x7_1", 768, c7, 1, 1),
                      (f"{name}.branch7x7_2", c7, c7, 1, 7), (f"{name}.branch7x7_3", c7, 192, 7, 1),
                      (f"{name}.branch7x7dbl_1", 768, c7, 1, 1),
                      (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
                      (f"{name}.branch7x7dbl_3", c7, c7, 1, 7),
                      (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
                      (f"{name}.branch7x7dbl_5", c7, 192, 1, 7),
                      (f"{name}.branch_pool", 768, 192, 1, 1)])

    def e(name, cin):
        convs.extend([(f"{name}.branch1x1", cin, 320, 1, 1),
                      (f"{name}.branch3x3_1", cin, 384, 1, 1),
                      (f"{name}.branch3x3_2a", 384, 384, 1, 3),
                      (f"{name}.branch3x3_2b", 384, 384, 3, 1),
                      (f"{name}.branch3x3dbl_1", cin, 448, 1, 1),
                      (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
                      (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
                      (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
                      (f"{name}.branch_pool", cin, 192, 1, 1)])

    a("Mixed_5b", 192, 32), a("Mixed_5c", 256, 64), a("Mixed_5d", 288, 64)
    convs.extend([("Mixed_6a.branch3x3", 288, 384, 3, 3),
                  ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
                  ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
                  ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)])
    c("Mixed_6b", 128), c("Mixed_6c", 160), c("Mixed_6d", 160), c("Mixed_6e", 192)
    convs.extend([("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
                  ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
                  ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
                  ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
                  ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
                  ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)])
    e("Mixed_7b", 1280), e("Mixed_7c", 2048)
    spec = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for name, cin, cout, kh, kw in convs:
        spec[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for buf in ("weight", "bias", "running_mean", "running_var"):
            spec[f"{name}.bn.{buf}"] = (cout,)
        spec[f"{name}.bn.num_batches_tracked"] = ()
    return spec


def _dinov2_vitl14_spec():
    """{key: shape} of dinov2_vitl14_pretrain.pth: DINOv2's ViT-L/14 backbone (embed 1024,
    24 unchunked blocks, MLP 4096, layer scale, 518 px training size: 37 x 37 + 1 positions)."""
    d, h = 1024, 4096
    spec = {"cls_token": (1, 1, d), "pos_embed": (1, 37 * 37 + 1, d), "mask_token": (1, d),
            "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(24):
        p = f"blocks.{i}."
        spec.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,),
                     p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                     p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                     p + "ls1.gamma": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                     p + "mlp.fc1.weight": (h, d), p + "mlp.fc1.bias": (h,),
                     p + "mlp.fc2.weight": (d, h), p + "mlp.fc2.bias": (d,),
                     p + "ls2.gamma": (d,)})
    return spec


def test_inception_keys_match_pytorch_fid_layout():
    with torch.device("meta"):
        net = InceptionV3Features()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == _inception_spec()


def test_dinov2_default_is_vitl14_with_the_checkpoint_keys():
    with torch.device("meta"):
        net = DinoV2ViT()
    state = net.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == _dinov2_vitl14_spec()
    assert sum(v.numel() for v in state.values()) == 304_368_640  # ViT-L/14: "304M" parameters


def test_tf1_resize_matches_the_legacy_formula():
    """Output pixel i samples the input at i * in / out (TensorFlow 1 resize_bilinear, no half
    pixel centres), bilinear, clamped at the far edge; float32 round-off only (1e-4 of 255)."""
    x = torch.rand(2, 3, 7, 5, generator=torch.Generator().manual_seed(0)) * 255
    out = 11

    def taps(n_in):
        src = np.arange(out) * n_in / out
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = taps(7)
    x0, x1, fx = taps(5)
    a = x.numpy()
    top = a[:, :, y0][:, :, :, x0] * (1 - fx) + a[:, :, y0][:, :, :, x1] * fx
    bottom = a[:, :, y1][:, :, :, x0] * (1 - fx) + a[:, :, y1][:, :, :, x1] * fx
    expected = top * (1 - fy[:, None]) + bottom * fy[:, None]
    np.testing.assert_allclose(tf1_bilinear_resize(x, out).numpy(), expected, atol=1e-4)
    # 299 -> 299 is the identity up to the float32 grid coordinates (as NVlabs computes them)
    same = torch.rand(1, 3, 299, 299) * 255
    torch.testing.assert_close(tf1_bilinear_resize(same, 299), same, atol=0.02, rtol=0)
    torch.testing.assert_close(tf1_bilinear_resize(same.double(), 299), same.double(),
                               atol=1e-8, rtol=0)


def test_vit_attention_and_position_embedding():
    torch.manual_seed(0)
    net = DinoV2ViT(**TINY_VIT).eval()
    torch.nn.init.normal_(net.pos_embed)
    attn = net.blocks[0].attn
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)  # float32 matmul order
    assert net.position_embedding(37, 37) is net.pos_embed  # the trained grid: unchanged
    pos = net.position_embedding(16, 16)  # 224 px input
    assert pos.shape == (1, 16 * 16 + 1, 32)
    torch.testing.assert_close(pos[:, 0], net.pos_embed[:, 0])  # class position untouched
    with torch.no_grad():  # a constant grid stays constant under bicubic resizing
        net.pos_embed[:, 1:] = 0.5
    torch.testing.assert_close(net.position_embedding(16, 16)[:, 1:],
                               torch.full((1, 256, 32), 0.5), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Weight files: accepted formats, strict keys, refusals


class Program:
    """A pickled object beyond tensors: weights_only loading refuses to build it."""


def _random_inception() -> InceptionV3Features:
    """Random weights that keep activations O(1) through the depth (He init, unit batch norm)."""
    torch.manual_seed(0)
    net = InceptionV3Features()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    inception = _random_inception()
    torch.save(inception.state_dict(), folder / "pt_inception-2015-12-05-test.pth")
    torch.manual_seed(1)
    vit = DinoV2ViT(**TINY_VIT)
    torch.nn.init.normal_(vit.pos_embed, std=0.02)
    torch.nn.init.normal_(vit.cls_token, std=0.02)
    torch.save(vit.state_dict(), folder / "dinov2_tiny_pretrain.pth")
    return {"inception": folder / "pt_inception-2015-12-05-test.pth",
            "dinov2": folder / "dinov2_tiny_pretrain.pth", "inception_net": inception,
            "vit_net": vit.eval(), "folder": folder}


def test_weight_files_load_strictly(weights, tmp_path):
    from safetensors.torch import save_file

    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 255
    net = load_inception(weights["inception"])
    torch.testing.assert_close(net.features(images), weights["inception_net"].features(images))
    vit_state = torch.load(weights["dinov2"], weights_only=True)
    save_file(vit_state, str(tmp_path / "vit.safetensors"))
    vit = load_dinov2(tmp_path / "vit.safetensors", **TINY_VIT)
    torch.testing.assert_close(vit.features(images), weights["vit_net"].features(images))
    # num_batches_tracked counters may be absent, as in files converted from TensorFlow
    state = torch.load(weights["inception"], weights_only=True)
    trimmed = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(trimmed, tmp_path / "trimmed.pth")
    load_inception(tmp_path / "trimmed.pth")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_bad_weight_files_are_refused_in_one_line(weights, tmp_path):
    state = torch.load(weights["dinov2"], weights_only=True)
    broken = dict(state)
    del broken["blocks.1.ls2.gamma"]
    broken["head.weight"] = torch.zeros(3)
    broken["pos_embed"] = torch.zeros(1, 5, 32)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(BadFileError) as info:
        load_dinov2(tmp_path / "broken.pth", **TINY_VIT)
    message = str(info.value)
    assert "\n" not in message and "missing: blocks.1.ls2.gamma" in message
    assert "unexpected: head.weight" in message and "wrong shape: pos_embed" in message
    # the full ViT-L/14 refuses the tiny file (wrong shapes) before building anything big
    with pytest.raises(BadFileError, match="is not a DINOv2 ViT-L/14 state dict"):
        load_dinov2(weights["dinov2"])

    torch.save({"net": Program()}, tmp_path / "program.pth")
    with pytest.raises(BadFileError, match="not a plain state dict") as info:
        load_inception(tmp_path / "program.pth")
    assert "\n" not in str(info.value)
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "inception-2015-12-05.pt"))
    with pytest.raises(BadFileError, match="TorchScript program"):  # stylegan2-ada's detector
        load_inception(tmp_path / "inception-2015-12-05.pt")
    (tmp_path / "inception-2015-12-05.pkl").write_bytes(b"not opened")
    with pytest.raises(BadFileError, match="run code"):
        load_inception(tmp_path / "inception-2015-12-05.pkl")
    with pytest.raises(MissingWeightsError, match="pytorch-fid/releases"):
        load_inception(None)


# ---------------------------------------------------------------------------------------------
# Image sets and the command line


def _write_images(folder, images):
    from edm_fast.io.samples import save_per_seed

    save_per_seed(images, range(len(images)), folder)


def _images(seed, n=6, channels=3, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def test_npz_and_folder_give_the_same_images(tmp_path):
    from edm_fast.io.samples import save_npz

    samples = _images(0, n=5, channels=1)
    _write_images(tmp_path / "png", samples)
    save_npz(samples, tmp_path / "s.npz")
    np.savez(tmp_path / "adm.npz", arr_0=((samples.permute(0, 2, 3, 1) + 1) * 127.5).round()
             .clamp(0, 255).to(torch.uint8).numpy())
    folder = torch.cat(list(image_batches(tmp_path / "png", 2)))
    _write_images(tmp_path / "png" / "big", _images(5, n=3, size=10))  # sizes may be mixed
    mixed = [b.shape for b in image_batches(tmp_path / "png", 4)]
    assert mixed == [(3, 3, 10, 10), (4, 3, 8, 8), (1, 3, 8, 8)]  # sorted paths: big/ first
    assert folder.shape == (5, 3, 8, 8) and folder.min() >= 0 and folder.max() <= 255
    torch.testing.assert_close(torch.cat(list(image_batches(tmp_path / "s.npz", 3))), folder)
    torch.testing.assert_close(torch.cat(list(image_batches(tmp_path / "adm.npz", 4))), folder)


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _write_images(root / "real", _images(1))
    _write_images(root / "fake", _images(2) * 0.5)
    return root


@pytest.fixture
def tiny_dinov2(monkeypatch):
    """The CLI builds the full ViT-L/14; here it builds the test-sized variant."""
    from edm_fast.eval import feature_nets

    full = feature_nets.load_dinov2
    monkeypatch.setattr(feature_nets, "load_dinov2",
                        lambda path, device="cpu": full(path, device, **TINY_VIT))


def _run(capsys, *args):
    code = main(["metrics", *map(str, args)])
    out, err = capsys.readouterr()
    values = {}
    for line in out.splitlines():
        name, _, value = line.partition(" ")
        if name in ("fid", "fd_dinov2", "precision", "recall"):
            values[name] = float(value)
    return code, values, err


def test_cli_pipeline(weights, image_sets, tmp_path, capsys, tiny_dinov2):
    real, fake, stats = image_sets / "real", image_sets / "fake", tmp_path / "ref.npz"
    common = ["--inception-weights", weights["inception"], "--dinov2-weights", weights["dinov2"],
              "--batch", 4, "--device", "cpu"]
    all_metrics = ["--metrics", "fid,fd_dinov2,pr"]
    code, by_folder, err = _run(capsys, "--images", fake, "--ref", real, "--write-ref", stats,
                                *all_metrics, *common)
    assert code == 0, err
    # NVlabs/edm's format: mu (2048,) and sigma (2048, 2048), float64, read back as they do
    with np.load(stats) as data:
        nvlabs = dict(data)
    assert nvlabs["mu"].shape == (2048,) and nvlabs["sigma"].shape == (2048, 2048)
    assert nvlabs["mu"].dtype == np.float64 and nvlabs["dinov2_mu"].shape == (32,)
    nets = {"inception": weights["inception_net"]}
    real_features = compute_features(real, nets, batch=5)["inception"]
    mu, sigma = feature_statistics(real_features)
    np.testing.assert_allclose(nvlabs["mu"], mu, rtol=1e-6, atol=1e-9)  # float32 nets
    np.testing.assert_allclose(nvlabs["sigma"], sigma, rtol=1e-5, atol=1e-9)
    assert np.abs(mu).max() > 1e-3  # features that carry signal, not a vanished activation

    code, by_stats, err = _run(capsys, "--images", fake, "--ref", stats, *all_metrics, *common)
    assert code == 0, err
    assert by_stats == by_folder and set(by_stats) == {"fid", "fd_dinov2", "precision", "recall"}
    fake_features = compute_features(fake, nets, batch=3)["inception"]
    fid = frechet_distance_from_stats(*feature_statistics(fake_features), mu, sigma)
    assert by_stats["fid"] == pytest.approx(fid, abs=1e-3, rel=1e-5)  # printed to 4 decimals
    assert by_stats["fid"] > 0.01 and by_stats["fd_dinov2"] > 0.0001
    precision, recall = precision_recall(real_features, fake_features)
    assert (by_stats["precision"], by_stats["recall"]) == (round(precision, 4), round(recall, 4))

    # a file with mu and sigma only, as NVlabs' fid.py writes it: FID (0 for the same images)
    np.savez(tmp_path / "nvlabs.npz", mu=mu, sigma=sigma)
    code, itself, err = _run(capsys, "--images", real, "--ref", tmp_path / "nvlabs.npz",
                             *common)
    assert code == 0 and itself == {"fid": 0.0}, err
    # NVlabs/edm2's .pkl layout of the same statistics: the same FID and FD_DINOv2
    import pickle

    with open(tmp_path / "img.pkl", "wb") as f:
        pickle.dump({"fid": {"mu": mu, "sigma": sigma},
                     "fd_dinov2": {"mu": nvlabs["dinov2_mu"], "sigma": nvlabs["dinov2_sigma"]}}, f)
    code, by_pkl, err = _run(capsys, "--images", fake, "--ref", tmp_path / "img.pkl",
                             "--metrics", "fid,fd_dinov2", *common)
    assert code == 0 and by_pkl == {k: by_stats[k] for k in ("fid", "fd_dinov2")}, err
    # ... but precision/recall needs the reference features: one line, before any work
    code, _, err = _run(capsys, "--images", fake, "--ref", tmp_path / "nvlabs.npz",
                        "--metrics", "pr", *common)
    assert code == 2 and "inception_features" in err and err.count("\n") == 1


def test_cli_missing_weights_is_one_line(image_sets, capsys):
    code, _, err = _run(capsys, "--images", image_sets / "fake", "--ref", image_sets / "real",
                        "--metrics", "fid")
    assert code == 2 and err.count("\n") == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "--inception-weights" in err
    code, _, err = _run(capsys, "--images", image_sets / "fake", "--ref", image_sets / "real",
                        "--metrics", "fd_dinov2", "--dinov2-weights", image_sets / "none.pth")
    assert code == 2 and err.count("\n") == 1
    assert "dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in err


@pytest.mark.parametrize("args,message", [
    (["--metrics", "is"], "choose from"),
    (["--write-ref", "x.npz", "--ref", "{stats}"], "give --ref a folder"),
    (["--ref", "{nowhere}"], "no such file"),
])
def test_cli_bad_options(args, message, image_sets, tmp_path, capsys):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    values = {"stats": tmp_path / "stats.npz", "nowhere": tmp_path / "nowhere"}
    args = [a.format(**values) for a in args]
    if "--ref" not in args:
        args += ["--ref", str(image_sets / "real")]
    code, _, err = _run(capsys, "--images", image_sets / "fake", *args)
    assert code == 2 and message in err and err.count("\n") == 1


def test_reference_stats_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = random_gaussian(rng, 5, 20)
    save_reference_stats(tmp_path / "r.npz", mu, sigma)
    back = load_reference_stats(tmp_path / "r.npz")
    np.testing.assert_array_equal(back["mu"], mu)
    np.testing.assert_array_equal(back["sigma"], sigma)
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(BadFileError, match="'sigma' \\(D, D\\)"):
        load_reference_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=sigma)
    with pytest.raises(BadFileError, match="not a readable .npz"):  # no pickles
        load_reference_stats(tmp_path / "obj.npz")


# ---------------------------------------------------------------------------------------------
# Against the reference implementations themselves, where a developer has them (not installed
# by the test extra: pytorch-fid needs torchvision; DINOv2 is a source checkout on PYTHONPATH)


def _import_or_skip(name):
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as exc:  # a broken torchvision raises RuntimeError, not ImportError
        pytest.skip(f"{name} not importable: {type(exc).__name__}")


@pytest.mark.slow
def test_inception_equals_pytorch_fid():
    """pytorch-fid's FID Inception with random weights: its state dict loads strictly here and
    the pool3 features agree exactly (same float32 operations; tolerance 1e-5 for BLAS order)."""
    pfi = _import_or_skip("pytorch_fid.inception")
    reference = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in [("Mixed_5b", pfi.FIDInceptionA(192, pool_features=32)),
                        ("Mixed_5c", pfi.FIDInceptionA(256, pool_features=64)),
                        ("Mixed_5d", pfi.FIDInceptionA(288, pool_features=64)),
                        ("Mixed_6b", pfi.FIDInceptionC(768, channels_7x7=128)),
                        ("Mixed_6c", pfi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6d", pfi.FIDInceptionC(768, channels_7x7=160)),
                        ("Mixed_6e", pfi.FIDInceptionC(768, channels_7x7=192)),
                        ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                        ("Mixed_7c", pfi.FIDInceptionE_2(2048))]:
        setattr(reference, name, block)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in reference.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("conv.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * (2 / t[0].numel()) ** 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    ours = InceptionV3Features().eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    pfi_fid = pfi.fid_inception_v3
    try:
        pfi.fid_inception_v3 = lambda: reference  # pytorch-fid's wrapper, without its download
        wrapper = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    finally:
        pfi.fid_inception_v3 = pfi_fid
    x = torch.rand(2, 3, 299, 299, generator=g) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x), wrapper(x)[0].flatten(1), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dinov2_equals_the_official_backbone():
    """facebookresearch/dinov2's dinov2_vitl14 with random weights: its state dict loads
    strictly here and the class tokens agree at 224 px (interpolated positions) and 518 px."""
    backbones = _import_or_skip("dinov2.hub.backbones")
    reference = backbones.dinov2_vitl14(pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            if name.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight")):
                p.add_(1)
    ours = DinoV2ViT().eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.rand(2, 3, 64, 64, generator=g) * 255
    with torch.no_grad():
        for x in (ours.preprocess(images), torch.randn(1, 3, 518, 518, generator=g)):
            torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def test_edm2_pickle_statistics_are_read_without_running_code(tmp_path):
    """NVlabs/edm2's img512.pkl layout: a pickle of {'fid': {mu, sigma}, 'fd_dinov2': {mu, sigma},
    'num_images': N}. A pickle that names any other global is refused in one line."""
    import os
    import pickle

    rng = np.random.default_rng(0)
    mu, sigma = random_gaussian(rng, 6, 20)
    dmu, dsigma = random_gaussian(rng, 4, 20)
    stats = {"num_images": 20, "fid": {"mu": mu, "sigma": sigma},
             "fd_dinov2": {"mu": dmu.astype(np.float32), "sigma": dsigma}}
    with open(tmp_path / "img.pkl", "wb") as f:
        pickle.dump(stats, f)
    back = load_reference_stats(tmp_path / "img.pkl")
    np.testing.assert_array_equal(back["mu"], mu)
    np.testing.assert_array_equal(back["sigma"], sigma)
    np.testing.assert_array_equal(back["dinov2_mu"], dmu.astype(np.float32))
    np.testing.assert_array_equal(back["dinov2_sigma"], dsigma)

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "hostile.pkl", "wb") as f:
        pickle.dump({"fid": {"mu": Hostile()}}, f)
    with pytest.raises(BadFileError, match="refusing to load global") as info:
        load_reference_stats(tmp_path / "hostile.pkl")
    assert "\n" not in str(info.value)
