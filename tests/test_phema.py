"""Power-function EMA and post-hoc reconstruction (edm_fast.train.phema) against closed forms."""

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from edm_fast.errors import EdmFastError
from edm_fast.io.model_card import model_card
from edm_fast.train.phema import (
    MAX_SIGMA_REL,
    PowerEMA,
    Snapshot,
    discrete_profile_weights,
    gamma_to_sigma_rel,
    parse_sigma_rels,
    power_ema_beta,
    profile_inner_products,
    reconstruct,
    sigma_rel_to_gamma,
    solve_posthoc_coefficients,
)


def test_sigma_rel_and_gamma_are_inverse():
    sigma = np.array([0.01, 0.05, 0.10, 0.2, 0.28])
    assert np.allclose(gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)), sigma, rtol=1e-10)
    # the paper's pairs (Sec. 3.1): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    # sigma_rel is the profile's standard deviation relative to t: check by quadrature
    g = float(sigma_rel_to_gamma(0.1))
    p = lambda tau: (g + 1) * tau ** g  # noqa: E731 (the profile at t = 1)
    mean = quad(lambda tau: tau * p(tau), 0, 1)[0]
    var = quad(lambda tau: (tau - mean) ** 2 * p(tau), 0, 1)[0]
    assert math.sqrt(var) == pytest.approx(0.1, rel=1e-8)


@pytest.mark.parametrize("bad", [0.0, -0.1, MAX_SIGMA_REL, 0.5])
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(EdmFastError, match="sigma_rel"):
        sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("t_a,s_a,t_b,s_b", [(1.0, 0.05, 1.0, 0.05), (0.3, 0.05, 1.0, 0.1),
                                             (2.0, 0.1, 0.7, 0.2), (5.0, 0.15, 5.0, 0.03)])
def test_inner_products_match_quadrature(t_a, s_a, t_b, s_b):
    """Eq. 151 against the integral of the two profiles of Eq. 121, to 1e-8 relative."""
    g_a, g_b = float(sigma_rel_to_gamma(s_a)), float(sigma_rel_to_gamma(s_b))

    def profile(tau, t, g):
        return (g + 1) * tau ** g / t ** (g + 1) if tau <= t else 0.0

    exact = quad(lambda tau: profile(tau, t_a, g_a) * profile(tau, t_b, g_b), 0,
                 min(t_a, t_b), epsabs=0, epsrel=1e-12, limit=200)[0]
    assert profile_inner_products(t_a, s_a, t_b, s_b) == pytest.approx(exact, rel=1e-8)
    assert profile_inner_products(t_b, s_b, t_a, s_a) == pytest.approx(exact, rel=1e-8)


def test_a_profile_reconstructed_from_itself():
    """An output that is one of the inputs gets coefficient 1 on it and 0 elsewhere."""
    in_t = [100, 200, 300, 400, 400, 300]
    in_s = [0.05, 0.05, 0.05, 0.05, 0.10, 0.10]
    X = solve_posthoc_coefficients(in_t, in_s, [400, 300, 200], [0.10, 0.10, 0.05])
    expected = np.zeros((6, 3))
    expected[4, 0] = expected[5, 1] = expected[1, 2] = 1
    assert np.allclose(X, expected, atol=1e-8)


def test_exact_ema_of_a_synthetic_weight_sequence():
    """The tracked EMA (updates of Eq. 127) equals the closed-form weighted sum of the weights,
    sum_k (t_k^(g+1) - t_(k-1)^(g+1)) / t_K^(g+1) theta_k, in float64 to 1e-12."""
    gen = torch.Generator().manual_seed(0)
    steps, dt = 200, 32
    thetas = torch.randn(steps, 5, generator=gen, dtype=torch.float64).cumsum(0)
    ema = PowerEMA({"w": thetas[0]}, sigma_rels=(0.05, 0.2))
    for k in range(steps):
        ema.update({"w": thetas[k]}, t=(k + 1) * dt, dt=dt)
    times = dt * np.arange(1, steps + 1)
    for sigma_rel in (0.05, 0.2):
        w = torch.from_numpy(discrete_profile_weights(times, sigma_rel))
        assert w.sum().item() == pytest.approx(1, abs=1e-12)
        assert torch.allclose(ema.averages[sigma_rel]["w"], w @ thetas, rtol=0, atol=1e-12)
    assert power_ema_beta(0.05, t=dt, dt=dt) == 0  # the first update copies the weights


def test_reconstruction_of_a_synthetic_run_matches_the_tracked_ema():
    """A run tracked at sigma_rel 0.05 and 0.10 with snapshots every 10 of 400 steps; the
    post-hoc EMA at 0.07 (and 0.15, outside the tracked pair) against the EMA tracked at that
    sigma_rel directly. The weights drift smoothly plus noise; the error is measured against
    the spread between the EMAs of sigma_rel 0.05 and 0.15 (what choosing sigma_rel changes):
    measured 8e-5 of it, asserted < 1e-3; the profiles' relative L2 misfit (measured 4e-7) < 1e-5.
    """
    gen = torch.Generator().manual_seed(1)
    steps, dt, every = 400, 8, 10
    tau = torch.arange(1, steps + 1, dtype=torch.float64)[:, None]
    drift = torch.sin(tau / 60 * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    thetas = drift + 0.3 * torch.randn(steps, 3, generator=gen, dtype=torch.float64)
    tracked = PowerEMA({"w": thetas[0]}, sigma_rels=(0.05, 0.10, 0.07, 0.15))
    snapshots = []
    for k in range(steps):
        tracked.update({"w": thetas[k]}, t=(k + 1) * dt, dt=dt)
        if (k + 1) % every == 0:
            for s in (0.05, 0.10):
                value = tracked.averages[s]["w"].clone()
                snapshots.append(Snapshot((k + 1) * dt, s, lambda v=value: {"w": v}))
    out = reconstruct(snapshots, [0.07, 0.15], dtype=torch.float64)
    for s in (0.07, 0.15):
        exact = tracked.averages[s]["w"]
        spread = (tracked.averages[0.05]["w"] - tracked.averages[0.15]["w"]).abs().max()
        err = (out[s]["w"] - exact).abs().max()
        assert err <= 1e-3 * spread, (s, err, spread)
    # the profiles themselves: relative L2 error of the fitted combination
    in_t = [snap.t for snap in snapshots]
    in_s = [snap.sigma_rel for snap in snapshots]
    X = solve_posthoc_coefficients(in_t, in_s, steps * dt, 0.07)[:, 0]
    A = profile_inner_products(np.array(in_t)[:, None], np.array(in_s)[:, None],
                               np.array(in_t)[None], np.array(in_s)[None])
    b = profile_inner_products(np.array(in_t), np.array(in_s), steps * dt, 0.07)
    target = profile_inner_products(steps * dt, 0.07, steps * dt, 0.07)
    residual = X @ A @ X - 2 * X @ b + target
    assert residual / target < 1e-5


def test_reconstruct_keeps_integer_tensors_and_checks_names():
    snaps = [Snapshot(t, 0.1, lambda t=t: {"w": torch.full((2,), float(t)),
                                           "n": torch.tensor([int(t)])}) for t in (1, 2, 3)]
    out = reconstruct(snaps, [0.1], t=2)[0.1]
    assert out["n"].item() == 2  # from the latest snapshot used (t <= 2)
    assert out["w"].dtype == torch.float32
    with pytest.raises(EdmFastError, match="other tensors"):
        reconstruct([snaps[0], Snapshot(2, 0.1, lambda: {"v": torch.zeros(2)})], [0.1])
    with pytest.raises(EdmFastError, match="no snapshot"):
        reconstruct(snaps, [0.1], t=0.5)


def test_power_ema_state_roundtrip():
    ema = PowerEMA({"a": torch.zeros(3)}, sigma_rels=(0.05, 0.1))
    ema.update({"a": torch.ones(3)}, t=10, dt=5)
    state = ema.state_dict()
    assert set(state) == {"0.050.a", "0.100.a"}
    other = PowerEMA({"a": torch.zeros(3)}, sigma_rels=(0.05, 0.1))
    other.load_state_dict(state)
    assert torch.equal(other.averages[0.1]["a"], ema.averages[0.1]["a"])
    with pytest.raises(EdmFastError, match="distinct"):
        PowerEMA({"a": torch.zeros(1)}, sigma_rels=(0.1, 0.1))


def test_parse_sigma_rels():
    assert parse_sigma_rels("0.1,0.05") == [0.05, 0.1]
    assert parse_sigma_rels("0.01,0.02,...,0.05") == pytest.approx([0.01, 0.02, 0.03, 0.04,
                                                                    0.05])
    for bad, match in [("", "at least one"), ("x", "not a number"), ("0.3", "sigma_rel"),
                       ("0.01,...,0.05", "two values"), ("0.01,0.02,...,0.045", "evenly")]:
        with pytest.raises(EdmFastError, match=match):
            parse_sigma_rels(bad)


# ------------------------------------------------------------------------------------------
# Snapshot files and `edm-fast phema`.

def _tracked_run(folder, steps=40, dt=64, every=5, label_dim=0, data=None):
    """A synthetic tiny-edm2 run: weights drifting smoothly plus noise, power EMAs tracked at
    0.05 and 0.10 (saved every ``every`` steps) and at 0.07 (the reference, not saved);
    ``data``: the data name its metadata gives (none by default)."""
    from edm_fast.io.checkpoints import net_spec
    from edm_fast.nets import build_net
    from edm_fast.train.phema_snapshots import save_snapshot
    from edm_fast.precond import EDMPrecond

    torch.manual_seed(0)
    base = build_net("tiny-edm2", label_dim=label_dim).state_dict()
    direction = {k: torch.randn_like(v) for k, v in base.items()}
    meta = {"net": net_spec("tiny-edm2", img_resolution=16, img_channels=1, label_dim=label_dim),
            "precond": EDMPrecond().config(), "sample_shape": [1, 16, 16]}
    if data is not None:
        meta["data"] = {"name": data, "spec": data, "num_classes": label_dim}
    ema = PowerEMA(base, sigma_rels=(0.05, 0.10, 0.07))
    for k in range(1, steps + 1):
        theta = {n: v + math.sin(k / 8) * direction[n] + 0.1 * torch.randn_like(v)
                 for n, v in base.items()}
        ema.update(theta, t=k * dt, dt=dt)
        if k % every == 0:
            for s in (0.05, 0.10):
                save_snapshot(folder, ema.averages[s], meta, nimg=k * dt, sigma_rel=s)
    return ema


def test_phema_cli_reconstructs_a_run(tmp_path, capsys):
    from edm_fast.io.checkpoints import read_inference_weights
    from edm_fast.cli.main import main
    from edm_fast.io.models import load_denoiser
    from edm_fast.train.phema_snapshots import list_snapshots

    run = tmp_path / "run"
    ema = _tracked_run(run)
    assert len(list_snapshots(run)) == 16
    out = tmp_path / "phema-0.07.safetensors"
    assert main(["phema", "--ckpt", str(run), "--sigma-rel", "0.07", "--out", str(out)]) == 0
    assert "sigma_rel 0.070" in capsys.readouterr().out
    state, meta = read_inference_weights(out)
    assert meta["phema"]["sigma_rel"] == 0.07 and meta["phema"]["nimg"] == 40 * 64
    assert meta["phema"]["reconstructed_from"] == 16
    # against the EMA tracked at 0.07 during the run: the error is a small part of how far
    # the 0.05 and 0.10 EMAs are apart (a 40-step run with 8 snapshot times per profile;
    # measured 7e-3 of it, asserted < 2e-2)
    err = max((state[k] - ema.averages[0.07][k]).abs().max().item() for k in state)
    spread = max((ema.averages[0.05][k] - ema.averages[0.10][k]).abs().max().item()
                 for k in state)
    assert err <= 0.02 * spread
    assert load_denoiser(out).model.is_baked  # a checkpoint `edm-fast sample` loads
    # a folder output, several values, an earlier time (the latest snapshot within kimg 1:
    # 1920 images), only the 0.05 snapshots (6 of them up to then)
    folder = tmp_path / "sweep"
    assert main(["phema", "--ckpt", str(run), "--sigma-rel", "0.04,0.06,...,0.1", "--out",
                 str(folder), "--kimg", "1", "--in-sigma-rel", "0.05"]) == 0
    written = sorted(p.name for p in folder.iterdir())
    assert written == [f"phema-0000001920-{s:.3f}.safetensors" for s in (0.04, 0.06, 0.08, 0.1)]
    assert read_inference_weights(folder / written[0])[1]["phema"]["reconstructed_from"] == 6


@pytest.mark.parametrize("argv,message", [
    (["--ckpt", "{tmp}/missing", "--sigma-rel", "0.1"], "no snapshot folder"),
    (["--ckpt", "{run}", "--sigma-rel", "0.5"], "must lie in (0, 0.2887)"),
    (["--ckpt", "{run}", "--sigma-rel", "0.1", "--kimg", "7"], "no snapshot at"),
    (["--ckpt", "{run}", "--sigma-rel", "0.1,0.2", "--out", "{tmp}/one.safetensors"],
     "one file"),
    (["--ckpt", "{run}", "--sigma-rel", "0.1", "--out", "{run}"], "snapshot folder"),
    (["--ckpt", "{run}", "--sigma-rel", "0.1", "--sweep"], "needs a run on the digits data"),
    (["--ckpt", "{run}", "--sigma-rel", "0.1", "--sweep", "--sweep-nfe", "4"], "must be odd"),
])
def test_phema_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    from edm_fast.cli.main import main

    run = tmp_path / "run"
    if "{run}" in " ".join(argv):
        _tracked_run(run, steps=10, every=5)
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(["phema", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_phema_sweep_scores_each_reconstruction_and_names_the_lowest_fd(tmp_path, capsys):
    """--sweep on a digits run (synthetic class-conditional tiny-edm2 weights): a score line per
    sigma_rel, and the best named is the one of lowest FD."""
    from edm_fast.cli.main import main

    run = tmp_path / "run"
    _tracked_run(run, steps=10, every=5, label_dim=10, data="digits")
    with warnings.catch_warnings():  # 8 samples per set: the FD's small-sample-bias warning
        warnings.simplefilter("ignore")
        assert main(["phema", "--ckpt", str(run), "--sigma-rel", "0.05,0.1", "--out",
                     str(tmp_path / "out"), "--sweep", "--sweep-samples", "8",
                     "--sweep-repeats", "1", "--sweep-nfe", "3"]) == 0
    out = capsys.readouterr().out
    fds = {float(s): float(fd) for s, fd in re.findall(r"sigma_rel (\S+): FD (\S+),", out)}
    best = float(re.search(r"best sigma_rel \(lowest FD\): (\S+)", out).group(1))
    assert set(fds) == {0.05, 0.1} and all(math.isfinite(v) for v in fds.values())
    assert fds[best] == min(fds.values())


def test_phema_reads_nvlabs_raw_snapshots(tmp_path, monkeypatch):
    """NVlabs' raw snapshot folder (PREFIX-KIMG-SIGMA.pkl, read by the restricted unpickler):
    the reconstruction equals the in-memory one from the same weights."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_edm2 import _official_tiny, _write_official_edm2

    from edm_fast.io.checkpoints import read_inference_weights
    from edm_fast.train.phema_snapshots import kimg_to_nimg, reconstruct_snapshots

    raw = tmp_path / "raw"
    raw.mkdir()
    snaps = []
    for kimg in (2, 4, 6):
        for s in (0.05, 0.1):
            net = _official_tiny()
            with monkeypatch.context() as m:
                _write_official_edm2(raw / f"edm2-tiny-{kimg:07d}-{s:.3f}.pkl", net, m)
            state = {k: v.clone() for k, v in net.state_dict().items()}
            snaps.append(Snapshot(kimg_to_nimg(kimg), s, lambda st=state: st))
    (path,) = reconstruct_snapshots(raw, [0.08], tmp_path / "out.safetensors")
    state, meta = read_inference_weights(path)
    expected = reconstruct(snaps, [0.08])[0.08]
    assert meta["phema"]["source"] == "nvlabs" and meta["phema"]["nimg"] == kimg_to_nimg(6)
    for k, v in expected.items():
        assert torch.allclose(state[k], v, rtol=1e-5, atol=1e-6), k


def test_power_ema_snapshots_of_a_network_load_as_checkpoints(tmp_path):
    """What a training loop does: track the parameters, save every profile with the buffers
    (EDM2's Fourier features), and load a snapshot back as a denoiser."""
    from edm_fast.io.checkpoints import net_spec
    from edm_fast.io.models import load_denoiser
    from edm_fast.nets import build_net
    from edm_fast.train.phema_snapshots import list_snapshots, save_power_ema_snapshots
    from edm_fast.precond import EDMPrecond

    net = build_net("tiny-edm2")
    ema = PowerEMA(dict(net.named_parameters()), sigma_rels=(0.05, 0.10))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(dict(net.named_parameters()), t=128, dt=64)
    meta = {"net": net_spec("tiny-edm2", img_resolution=16, img_channels=1),
            "precond": EDMPrecond().config(), "optimizer": {"lr": 1}}
    paths = save_power_ema_snapshots(ema, tmp_path, meta, nimg=128, state=net.state_dict())
    assert [(s.nimg, s.sigma_rel) for s in list_snapshots(tmp_path)] == [(128, 0.05), (128, 0.1)]
    den = load_denoiser(paths[0])
    beta = power_ema_beta(0.05, t=128, dt=64)  # one update after the copy at t = 0 .. 64
    assert den.model.unet.out_gain.item() == pytest.approx(1 - beta)  # 0 -> 1 averaged
    assert "optimizer" not in model_card(den).config
