"""EDM2 training in `edm-fast train`: the recipe's learning rate, Adam betas and NaN handling,
power-EMA snapshots that `edm-fast phema` reconstructs from, and a bit-for-bit resume."""

import json
import math

import pytest
import torch

from edm_fast.io.checkpoints import latest_checkpoint, load_denoiser_checkpoint, read_checkpoint
from edm_fast.cli.main import main
from edm_fast.train.phema_snapshots import list_snapshots
from edm_fast.nets.edm2_precond import EDM2Denoiser
from edm_fast.train.loop import TrainConfig, train
from edm_fast.train.edm2 import PowerEMATracker, edm2_learning_rate

# tiny-edm2 on the 8x8 digits: a fast real-data run. Snapshots every 2 steps (32 images), a
# ramp-up over 4 steps and a decay time of 3 batches, so that both parts act within 8 steps.
EDM2 = dict(data="digits:8", preset="tiny-edm2", batch=16, sample_every_kimg=0, progress=False,
            log_every=1, snapshot_every_kimg=0.032, ckpt_every_kimg=1e9, lr_rampup_kimg=0.064,
            lr_decay_batches=3)


def _cfg(out, steps, **kw):
    opts = {**EDM2, **kw}
    return TrainConfig(out=str(out), kimg=steps * opts["batch"] / 1000, **opts)


def _no_sample_grid(patch):
    """The end-of-run sample grid (64 images, 35 NFE: most of a short run's time here) is left
    out where a test does not look at it; test_cli_edm2_training_options_... keeps it."""
    import edm_fast.train.loop as train_module

    patch.setattr(train_module, "sample_grid", lambda *args, **kwargs: None)


@pytest.fixture
def no_grid(monkeypatch):
    _no_sample_grid(monkeypatch)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An 8-step run straight, and the same run stopped after 4 steps and resumed."""
    root = tmp_path_factory.mktemp("edm2")
    with pytest.MonkeyPatch.context() as patch:
        _no_sample_grid(patch)
        straight = train(_cfg(root / "a", 8))
        train(_cfg(root / "b", 8, max_steps=4))
        resumed = train(_cfg(root / "b", 8), resume=True)
    return root / "a", root / "b", straight, resumed


def test_edm2_learning_rate_formula():
    """lr = ref / sqrt(max(nimg / (t_ref batch), 1)) * min(nimg / rampup, 1), values worked out
    by hand for ref 0.01, batch 128, t_ref 500 batches (64000 images), ramp-up 10 kimg."""
    lr = lambda nimg, decay=500, rampup=10: edm2_learning_rate(nimg, 128, 0.01, decay, rampup)
    assert lr(0) == 0
    assert lr(5000) == pytest.approx(0.005, rel=1e-12)       # half-way up the ramp
    assert lr(10000) == pytest.approx(0.01, rel=1e-12)       # ramped up, not yet decaying
    assert lr(64000) == pytest.approx(0.01, rel=1e-12)       # t = t_ref
    assert lr(4 * 64000) == pytest.approx(0.005, rel=1e-12)  # t = 4 t_ref: 1/sqrt(4)
    assert lr(9 * 64000) == pytest.approx(0.01 / 3, rel=1e-12)
    assert lr(9 * 64000, decay=0) == pytest.approx(0.01, rel=1e-12)   # no decay
    assert lr(1000, rampup=0) == pytest.approx(0.01, rel=1e-12)       # no ramp-up


def test_edm2_run_logs_the_schedule_and_uses_the_recipe(runs):
    """The logged learning rate of step k is the formula at (k - 1) batches; Adam runs with
    EDM2's betas (0.9, 0.99); the loss is the EDM2 loss with the tiny-edm2 noise levels."""
    a, _, straight, _ = runs
    records = [json.loads(x) for x in (a / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        expected = edm2_learning_rate((r["step"] - 1) * 16, 16, 1e-2, 3, 0.064)
        assert r["lr"] == pytest.approx(expected, rel=1e-12), r
    assert steps[-1]["lr"] < steps[3]["lr"]  # the decay acted (t_ref = 3 batches)
    _, meta = read_checkpoint(latest_checkpoint(a))
    assert meta["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.99]
    assert meta["loss"] == {"name": "edm2", "P_mean": -0.8, "P_std": 1.6}
    assert meta["train"]["lr"] == 1e-2 and meta["train"]["ema_sigma_rels"] == [0.05, 0.1]
    assert math.isfinite(straight["final_loss"]) and straight["steps"] == 8


def test_edm2_resume_is_bit_for_bit(runs):
    """8 steps straight against 4 + 4 resumed: every tensor of the final checkpoint (weights,
    the power-EMA profiles, the EMA, Adam, RNG) and every snapshot both runs wrote are equal."""
    a, b, _, resumed = runs
    assert resumed["steps"] == 8 and resumed["steps_this_run"] == 4
    ta, ma = read_checkpoint(latest_checkpoint(a))
    tb, mb = read_checkpoint(latest_checkpoint(b))
    assert ta.keys() == tb.keys()
    # the first profile is the checkpoint's EMA, the others are stored as phema.<sigma_rel>.*
    assert {k[len("phema."):][:5] for k in ta if k.startswith("phema.")} == {"0.100"}
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    assert ma["stream"] == mb["stream"]
    snaps_a = {s.path.name: s for s in list_snapshots(a)}
    snaps_b = {s.path.name: s for s in list_snapshots(b)}
    assert sorted(s.nimg for s in snaps_a.values()) == [32, 32, 64, 64, 96, 96, 128, 128]
    assert snaps_a.keys() == snaps_b.keys()
    for name, snap in snaps_a.items():
        sa, _ = read_checkpoint(snap.path)
        sb, _ = read_checkpoint(snaps_b[name].path)
        assert [k for k in sa if not torch.equal(sa[k], sb[k])] == [], name


def test_checkpoint_ema_is_the_first_profile_and_samples(runs):
    """The checkpoint's EMA (what `sample --ckpt RUN` loads) is the last snapshot of the first
    tracked profile, and loads as a working denoiser."""
    a = runs[0]
    tensors, _ = read_checkpoint(latest_checkpoint(a))
    snap, _ = read_checkpoint(a / "phema-0000000128-0.050.safetensors")
    for k, v in snap.items():
        assert torch.equal(v, tensors[k]), k
    den = load_denoiser_checkpoint(a)
    x = den(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_phema_cli_reconstructs_from_a_trained_run(runs, tmp_path, capsys):
    """`edm-fast phema --ckpt RUN` on the run: a tracked profile reconstructed from all the
    snapshots equals that profile's own snapshot (Alg. 3 gives the unit coefficient vector up
    to the solve's rounding: 1e-5 of the weights' scale, the weights are O(1) after the forced
    normalisation); an untracked one loads and denoises."""
    a = runs[0]
    out = tmp_path / "rec"
    assert main(["phema", "--ckpt", str(a), "--sigma-rel", "0.05,0.07", "--out", str(out)]) == 0
    assert "sigma_rel 0.070" in capsys.readouterr().out
    rec, meta = read_checkpoint(out / "phema-0000000128-0.050.safetensors")
    tracked, _ = read_checkpoint(a / "phema-0000000128-0.050.safetensors")
    assert meta["phema"]["reconstructed_from"] == 8
    for k, v in tracked.items():
        torch.testing.assert_close(rec[k], v, atol=1e-5, rtol=0, msg=k)
    den = load_denoiser_checkpoint(out / "phema-0000000128-0.070.safetensors")
    assert torch.isfinite(den(torch.randn(2, 1, 8, 8), 1.0)).all()


def test_resume_refuses_other_ema_profiles(runs):
    with pytest.raises(ValueError, match=r"ema_sigma_rels=\[0.05, 0.2\] differs"):
        train(_cfg(runs[1], 10, ema_sigma_rels=(0.05, 0.2)), resume=True)


def test_snapshots_after_the_resumed_step_are_removed(tmp_path, no_grid):
    """A run stopped after its last checkpoint wrote snapshots past it; the resumed run starts
    from the checkpoint and drops them before retaking them."""
    train(_cfg(tmp_path, 4, max_steps=2, ckpt_every_kimg=1e9))  # checkpoint and snapshots at 2
    (tmp_path / "phema-0000000064-0.050.safetensors").write_bytes(b"from a lost step")
    summary = train(_cfg(tmp_path, 3), resume=True)
    assert summary["steps"] == 3
    names = sorted(p.name for p in tmp_path.glob("phema-*"))
    assert names == ["phema-0000000032-0.050.safetensors", "phema-0000000032-0.100.safetensors",
                     "phema-0000000048-0.050.safetensors", "phema-0000000048-0.100.safetensors"]


def test_nonfinite_gradient_entries_are_zeroed_and_the_step_taken(tmp_path, monkeypatch,
                                                                  no_grid):
    """EDM2 (NVlabs' force_finite): a NaN in one parameter's gradient is set to 0 and the step
    still updates the rest; the step counts in nonfinite_total."""
    import edm_fast.train.loop as train_module

    original = train_module.accumulate_gradients
    calls = []

    def with_a_nan(loss_fn, train_den, *args, **kwargs):
        loss = original(loss_fn, train_den, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            train_den.model.unet.out_gain.grad.fill_(math.nan)
        return loss

    monkeypatch.setattr(train_module, "accumulate_gradients", with_a_nan)
    seen = []  # the weights after each optimizer step
    update = PowerEMATracker.update

    def record(self, model, nimg, batch):
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return update(self, model, nimg, batch)

    monkeypatch.setattr(PowerEMATracker, "update", record)
    summary = train(_cfg(tmp_path, 3))
    assert summary["steps"] == 3 and summary["nonfinite_total"] == 1 and len(seen) == 3
    tensors, _ = read_checkpoint(latest_checkpoint(tmp_path))
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    # step 1 ran at lr 0 (the ramp-up starts at 0 images); step 2, the one with the NaN, moved
    # the other weights
    moved = [k for k in seen[0] if k != "unet.out_gain" and not torch.equal(seen[0][k],
                                                                             seen[1][k])]
    assert moved


@pytest.mark.parametrize("change, match", [
    ({"augment": 0.2}, "EDM2 networks take no augmentation labels"),
    ({"label_dropout": 0.1, "cond": True}, "EDM2 networks have no label dropout"),
    ({"loss": "edm"}, "it trains with the EDM2 loss"),
    ({"preset": "tiny", "loss": "edm2"}, "the EDM2 loss needs an EDM2 network"),
    ({"ema_sigma_rels": (0.05, 0.5)}, "ema_sigma_rels must be distinct values in"),
    ({"lr_decay_batches": -1.0}, "lr_decay_batches must be a finite number >= 0"),
    ({"p_std": 0.0}, "p_std must be a finite number > 0"),
    ({"preset": "tiny", "loss": "edm", "lr_decay_batches": 100.0}, "belongs to the EDM2 recipe"),
])
def test_bad_edm2_options_are_refused_up_front(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        train(_cfg(tmp_path / "run", 2, **change))
    assert not (tmp_path / "run").exists()


def test_cli_edm2_training_options_and_a_one_line_refusal(tmp_path, capsys):
    """The NVlabs-named options reach the run; --augment is one line naming the problem."""
    out = tmp_path / "run"
    args = ["train", "--data", "digits:8", "--preset", "tiny-edm2", "--batch", "16", "--kimg",
            "0.032", "--decay", "7", "--P-mean", "-0.5", "--P_std", "1.1", "--ema-sigma-rel",
            "0.1,0.15", "--snapshot-every", "0", "--sample-every", "0", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    _, meta = read_checkpoint(latest_checkpoint(out))
    assert meta["train"]["lr_decay_batches"] == 7 and meta["train"]["ema_sigma_rels"] == [0.1,
                                                                                           0.15]
    assert meta["loss"] == {"name": "edm2", "P_mean": -0.5, "P_std": 1.1}
    assert sorted(p.name for p in out.glob("phema-*")) == [  # --snapshot-every 0: the end only
        "phema-0000000032-0.100.safetensors", "phema-0000000032-0.150.safetensors"]
    capsys.readouterr()
    assert main(["train", "--preset", "tiny-edm2", "--augment", "0.2", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no augmentation labels" in err and "--augment" in err


def test_edm2_denoiser_is_what_trains(tmp_path, monkeypatch, no_grid):
    """The loss sees an EDM2Denoiser (with its log-variance head), not a plain Denoiser."""
    from edm_fast.losses import EDM2Loss

    seen = []
    given = EDM2Loss.given

    def spy(self, denoiser, *args):
        seen.append(type(denoiser))
        return given(self, denoiser, *args)

    monkeypatch.setattr(EDM2Loss, "given", spy)
    train(_cfg(tmp_path, 1, snapshot_every_kimg=0))
    assert seen and all(issubclass(t, EDM2Denoiser) for t in seen)


def test_batch_gpu_accumulation_matches_the_full_batch(tmp_path, no_grid):
    """--batch-gpu 4 of a batch of 16 trains as the full batch: the losses draw sigma and noise
    for the whole batch first. Not to float rounding as for EDM: the forced weight
    normalisation runs in every forward pass, once per slice (as in NVlabs' accumulation
    rounds), and it is not idempotent: w / (eps + rms(w)) with eps = 1e-4 shrinks unit-RMS
    weights by 1e-4 each time. 3 extra passes per step, 3 steps, weights up to ~4 in size:
    below 4e-3; a wrong slice (other noise, labels or sigma) moves Adam's steps of lr = 1e-2."""
    full = train(_cfg(tmp_path / "full", 3, lr_rampup_kimg=0))
    parts = train(_cfg(tmp_path / "parts", 3, lr_rampup_kimg=0, batch_gpu=4))
    assert full["steps"] == parts["steps"] == 3
    ta, _ = read_checkpoint(latest_checkpoint(tmp_path / "full"))
    tb, _ = read_checkpoint(latest_checkpoint(tmp_path / "parts"))
    for k in ta:
        if k.startswith(("model.", "phema.")):
            torch.testing.assert_close(tb[k], ta[k], atol=4e-3, rtol=0, msg=k)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "log.jsonl").read_text()
               .splitlines() if "loss" in x and "summary" not in x] for run in ("full", "parts")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


@pytest.mark.slow
def test_two_process_gloo_edm2_training_keeps_ranks_identical(tmp_path):
    """torchrun with 2 CPU processes: DDP all-reduces the gradients of the log-variance head too
    (it runs outside DDP's forward); the run's end-of-training check compares every weight of
    both ranks bit for bit, and rank 0 alone writes the snapshots."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29533", "-m", "edm_fast", "train", "--data", "digits:8",
         "--preset", "tiny-edm2", "--batch", "16", "--kimg", "0.064", "--lr-rampup-kimg", "0",
         "--snapshot-every", "0.032", "--sample-every", "0", "--no-progress", "--out", str(out),
         "--device", "cpu"], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert sorted(s.nimg for s in list_snapshots(out)) == [32, 32, 64, 64]
