"""Training: the loss goes down, resume is bit for bit, checkpoints survive kills, DDP syncs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from data_fixtures import make_image_folder

from edm_fast.io.checkpoints import (
    CheckpointError, latest_checkpoint, load_denoiser_checkpoint, read_checkpoint,
    save_checkpoint,
)
from edm_fast.losses import EDMLoss
from edm_fast.train.loop import EMA, TrainConfig, TrainingDiverged, train

TOY = dict(data="toy:gmm2d", preset="toy-mlp", loss="edm", batch=64, lr=1e-3,
           lr_rampup_kimg=0.2, sample_every_kimg=0, progress=False, log_every=4)


def _toy(out, steps, **kw):
    opts = {**TOY, **kw}
    return TrainConfig(out=str(out), kimg=steps * opts["batch"] / 1000, **opts)


@torch.no_grad()
def _fixed_loss(den, images, labels):
    """The EDM loss on a fixed batch with fixed noise (deterministic, for before/after)."""
    torch.manual_seed(123)
    return EDMLoss()(den, images, labels).mean().item()


def test_short_digits_training_lowers_edm_loss(tmp_path):
    """40 steps of a tiny DDPM++ on the real digits (8x8, class-conditional) lower the EDM loss
    on a fixed batch with fixed noise; bound: at least -25%."""
    from edm_fast.train.data import load_dataset

    ds = load_dataset("digits:8")
    images = torch.stack([ds[i][0] for i in range(0, 1797, 9)])
    labels = torch.tensor([int(ds[i][1]) for i in range(0, 1797, 9)])
    small = {"channel_mult": [1, 2], "attn_resolutions": [4]}
    cfg = TrainConfig(data="digits:8", preset="tiny", loss="edm", cond=True, batch=32, lr=2e-3,
                      lr_rampup_kimg=0.1, kimg=40 * 32 / 1000, out=str(tmp_path),
                      sample_every_kimg=0, progress=False, log_every=10, dropout=0.0,
                      net_overrides=small)
    from edm_fast.io.checkpoints import build_denoiser, net_spec

    spec = net_spec("tiny", img_resolution=8, img_channels=1, label_dim=10, dropout=0.0, **small)
    torch.manual_seed(cfg.seed * 1000)  # the same initial weights train() will draw
    den0 = build_denoiser({"net": spec, "precond": {"name": "edm"}}).eval()
    before = _fixed_loss(den0, images, labels)
    summary = train(cfg)
    den = load_denoiser_checkpoint(tmp_path, ema=False)
    after = _fixed_loss(den, images, labels)
    assert summary["steps"] == 40
    assert after < 0.75 * before, (before, after)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["summary"]["steps"] == 40 and any("img_per_s" in r for r in log)
    assert (tmp_path / "loss.png").exists() and list(tmp_path.glob("samples-*.png"))


def test_ema_half_life_with_ramp_up():
    """beta = 0.5^(batch / min(half-life, nimg * ramp-up ratio)) with nimg the images trained
    on before the batch (as NVlabs' training loop): the first update copies the weights."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, halflife_kimg=0.5, rampup_ratio=0.05)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, nimg=0, batch=10)
    assert torch.equal(ema.model.weight, model.weight)
    for nimg, halflife in ((1000, 50.0), (10**6, 500.0)):
        before = ema.model.weight.clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model, nimg=nimg, batch=10)
        beta = 0.5 ** (10 / halflife)
        torch.testing.assert_close(ema.model.weight, beta * before + (1 - beta) * model.weight)


@pytest.mark.parametrize("extra", [{}, {"data": "digits:8", "preset": "tiny", "augment": 0.5,
                                        "cond": True, "batch": 16, "net_overrides":
                                        {"channel_mult": [1, 2], "attn_resolutions": [4]}}])
def test_resume_equals_uninterrupted_run(tmp_path, extra):
    """Run 12 steps straight vs 6 steps, stop, resume for 6: every tensor of the final
    checkpoint (weights, EMA, Adam state, RNG) is bitwise equal."""
    _assert_resume_is_exact(tmp_path, extra)


def test_fp16_resume_keeps_the_loss_scale(tmp_path):
    """--amp fp16: the GradScaler's loss scale and growth counter are saved and restored (a
    resumed run restarting at scale 65536 skipped steps that the straight run did not)."""
    _assert_resume_is_exact(tmp_path, {"amp": "fp16"})
    _, meta = read_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert meta["grad_scaler"]["_growth_tracker"] > 0


def test_data_set_smaller_than_one_batch_trains_and_resumes(tmp_path):
    """A user's folder of 6 images with batch 16: batches run across epochs (with a warning)
    instead of failing, and resume stays bit for bit."""
    make_image_folder(tmp_path / "pets")
    extra = {"data": str(tmp_path / "pets"), "preset": "tiny", "cond": True, "batch": 16,
             "resolution": 8, "net_overrides": {"channel_mult": [1, 2], "attn_resolutions": [4]}}
    with pytest.warns(UserWarning, match="6 items, fewer than one batch of 16"):
        _assert_resume_is_exact(tmp_path, extra)


def _assert_resume_is_exact(tmp_path, extra):
    straight = train(_toy(tmp_path / "a", 12, ckpt_every_kimg=1e9, **extra))
    train(_toy(tmp_path / "b", 12, max_steps=6, ckpt_every_kimg=1e9, **extra))
    resumed = train(_toy(tmp_path / "b", 12, ckpt_every_kimg=1e9, **extra), resume=True)
    assert straight["steps"] == resumed["steps"] == 12 and resumed["steps_this_run"] == 6
    ta, ma = read_checkpoint(latest_checkpoint(tmp_path / "a"))
    tb, mb = read_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert different == []
    assert ma["stream"] == mb["stream"] and ma["grad_scaler"] == mb["grad_scaler"]


@pytest.mark.parametrize("bad, match", [
    ({"lr": 0.0}, "lr must be a finite number > 0"), ({"lr": math.inf}, "lr must be a finite"),
    ({"max_steps": 0}, "max_steps must be a finite number > 0"),
    ({"lr_rampup_kimg": math.nan}, "lr_rampup_kimg must be a finite number >= 0"),
    ({"workers": -1}, "workers must be a finite number >= 0"),
    ({"grad_clip": -1.0}, "grad_clip must be a finite"), ({"augment": 1.5}, "augment is a prob"),
    ({"label_dropout": 0.1}, "needs a conditional run"), ({"dropout": 1.0}, "dropout is a prob"),
    ({"data": "digits:8"}, "use an image preset"), ({"preset": "tiny"}, "use --preset toy-mlp"),
    ({"resolution": 64}, "toy data have no resolution"),  # was ignored, and recorded
    ({"channels": 3}, "toy data have no resolution, channels"),
    ({"data": "digits", "preset": "tiny", "resolution": 0}, "resolution must be >= 1"),
    ({"data": "digits", "preset": "tiny", "resolution": 12}, "must be 8, 16 or 32"),
])
def test_bad_options_are_refused_up_front(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train(_toy(tmp_path / "run", 4, **bad))
    with pytest.raises(ValueError, match="kimg must be a finite number > 0"):
        train(TrainConfig(**{**TOY, "out": str(tmp_path / "run"), "kimg": 0.0}))
    assert not (tmp_path / "run").exists()  # not even an empty run folder


def test_a_refused_run_leaves_no_folder_and_out_must_name_one(tmp_path, monkeypatch):
    """Missing data, or --resume with nothing to resume, used to leave an empty run folder;
    an empty --out trained into the current folder."""
    with pytest.raises(FileNotFoundError):
        train(_toy(tmp_path / "a", 4, data=str(tmp_path / "no_such_folder"), preset="tiny"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_toy(tmp_path / "b", 4), resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--out is empty"):
        train(TrainConfig(**{**TOY, "out": "", "kimg": 0.256}))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="existing file, not a run folder"):
        train(_toy(tmp_path / "file", 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _global_grad_norms_at_each_step(run):
    """Run ``run()``, returning the global 2-norm of the gradients at every optimizer step."""
    norms = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        run()
    finally:
        handle.remove()
    return norms


def test_train_updates_the_ema_with_the_images_before_each_batch(tmp_path, monkeypatch):
    """train() passes EMA.update the images trained on before the batch, 0, B, 2B (NVlabs'
    cur_nimg), so the first update copies the weights (the class itself is tested above)."""
    from edm_fast.train import loop as training

    calls = []
    update = training.EMA.update

    def spy(self, model, nimg, batch):
        calls.append((nimg, batch))
        return update(self, model, nimg, batch)

    monkeypatch.setattr(training.EMA, "update", spy)
    train(_toy(tmp_path, 3))
    assert calls == [(0, 64), (64, 64), (128, 64)]


def test_grad_clip_bounds_the_gradients_adam_steps_with(tmp_path):
    """--grad-clip C: every optimizer step sees gradients of global 2-norm <= C; without it the
    same run's gradients are far larger (so the bound is not met by accident)."""
    clip = 1e-3
    free = _global_grad_norms_at_each_step(lambda: train(_toy(tmp_path / "a", 6)))
    clipped = _global_grad_norms_at_each_step(
        lambda: train(_toy(tmp_path / "b", 6, grad_clip=clip)))
    assert len(free) == len(clipped) == 6
    assert min(free) > 10 * clip, free
    assert max(clipped) <= clip * (1 + 1e-5), clipped  # clip_grad_norm_ scales by C/(norm+1e-6)


def test_bf16_autocast_trains_in_bf16_and_keeps_float32_weights(tmp_path):
    """--amp bf16: the net's weighted layers run in bfloat16 (CPU autocast), the loss stays finite,
    and the checkpoint's weights stay float32; --amp none runs no layer in bfloat16."""
    dtypes = set()

    def record(module, inputs, output):
        if isinstance(getattr(module, "weight", None), torch.Tensor):  # the nets' own Linear
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        train(_toy(tmp_path / "none", 4))
        assert dtypes == {torch.float32}
        dtypes.clear()
        summary = train(_toy(tmp_path / "bf16", 8, amp="bf16"))
    finally:
        handle.remove()
    assert torch.bfloat16 in dtypes
    assert math.isfinite(summary["final_loss"]) and summary["nonfinite_total"] == 0
    tensors, _ = read_checkpoint(latest_checkpoint(tmp_path / "bf16"))
    assert {t.dtype for k, t in tensors.items() if k.startswith(("model.", "ema."))} == \
        {torch.float32}


def test_progress_bar_shows_loss_and_images_per_second(tmp_path, capsys):
    """The tqdm bar of a training run carries the smoothed loss and the images/s."""
    train(_toy(tmp_path, 8, progress=True))
    err = capsys.readouterr().err
    assert "loss=" in err and "img_s=" in err and "8/8" in err, err[-500:]


def test_log_restarts_with_the_run(tmp_path):
    """log.jsonl (and so loss.png) holds each step once: a resumed run drops the records logged
    after its checkpoint, a fresh run in a folder without checkpoints drops the old log."""
    def logged_steps():
        lines = (tmp_path / "log.jsonl").read_text().splitlines()
        return [json.loads(x).get("step") for x in lines if '"summary"' not in x]

    train(_toy(tmp_path, 12, max_steps=8, ckpt_every_kimg=4 * 64 / 1000))
    assert logged_steps() == [4, 8]
    (tmp_path / "ckpt-00000008.safetensors").unlink()  # as if killed before that checkpoint
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 9, "kimg')  # torn by a kill mid-write
    with pytest.warns(UserWarning, match="dropped an unreadable line"):
        train(_toy(tmp_path, 12), resume=True)
    assert logged_steps() == [4, 8, 12]
    for ckpt in tmp_path.glob("ckpt-*"):
        ckpt.unlink()
    train(_toy(tmp_path, 4))
    assert logged_steps() == [4]


def test_resume_skips_a_torn_latest_checkpoint(tmp_path):
    """A torn newest checkpoint (a copy cut short) is skipped with a warning that names it; the
    run resumes from the one before and still ends bit for bit equal to an uninterrupted run.
    With no readable checkpoint left, resume fails with a clear error."""
    every = {"ckpt_every_kimg": 4 * 64 / 1000, "keep_ckpts": 5}
    train(_toy(tmp_path / "a", 12, **every))
    train(_toy(tmp_path / "b", 12, max_steps=8, **every))
    torn = tmp_path / "b" / "ckpt-00000008.safetensors"
    torn.write_bytes(torn.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="resuming from ckpt-00000004.safetensors: .*ckpt-00000008"):
        summary = train(_toy(tmp_path / "b", 12, **every), resume=True)
    assert summary["steps_this_run"] == 8
    assert torn.with_name(torn.name + ".torn").exists()  # kept for inspection, not counted
    assert summary["checkpoint"].endswith("ckpt-00000012.safetensors")
    ta, _ = read_checkpoint(latest_checkpoint(tmp_path / "a"))
    tb, _ = read_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    for ckpt in (tmp_path / "b").glob("ckpt-*"):
        ckpt.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        train(_toy(tmp_path / "b", 16, **every), resume=True)


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    """Resuming with the length already reached trains nothing, says so, and adds no log line."""
    train(_toy(tmp_path, 4))
    lines = (tmp_path / "log.jsonl").read_text()
    summary = train(_toy(tmp_path, 4), resume=True)
    assert summary["steps"] == 4 and summary["steps_this_run"] == 0
    assert (tmp_path / "log.jsonl").read_text() == lines
    res = subprocess.run([sys.executable, "-m", "edm_fast", "train", "--data", "toy:gmm2d",
                          "--preset", "toy-mlp", "--batch", "64", "--kimg", str(4 * 64 / 1000),
                          "--no-progress", "--out", str(tmp_path), "--resume"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "already at step 4" in res.stdout, res.stderr


def test_resume_refuses_options_that_build_another_network(tmp_path):
    """dropout, resolution, channels... must match the saved network (a silent change trained
    another net than the checkpoint described; a shape change failed with 50 lines)."""
    net = {"data": "digits", "resolution": 8, "preset": "tiny", "batch": 16, "net_overrides":
           {"channel_mult": [1, 2], "attn_resolutions": [4]}}
    train(_toy(tmp_path, 2, **net))
    for change, named in (({"dropout": 0.5}, "dropout"), ({"resolution": 16}, "sample shape"),
                          ({"channels": 3}, "sample shape")):
        with pytest.raises(ValueError, match=f"another network.*{named}"):
            train(_toy(tmp_path, 4, **(net | change)), resume=True)


@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, 0), (signal.SIGTERM, 0),
                                          (signal.SIGINT, 2)])
def test_interrupt_saves_the_last_step_and_resume_is_exact(tmp_path, sig, workers):
    """Ctrl-C (to the whole process group, as a terminal sends it, data-loader workers
    included) or SIGTERM: training stops after the current step, writes it as a checkpoint
    (exit 130, the message names it), and --resume ends bit for bit equal to a straight run."""
    def cmd(out, *extra):
        return [sys.executable, "-m", "edm_fast", "train", "--data", "toy:gmm2d", "--preset",
                "toy-mlp", "--batch", "64", "--kimg", str(64 * 600 / 1000), "--ckpt-every",
                "1e9", "--sample-every", "0", "--no-progress", "--workers", str(workers),
                "--out", str(out), *extra]

    proc = subprocess.Popen(cmd(tmp_path / "b"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log, deadline = tmp_path / "b" / "log.jsonl", time.time() + 120
    while not (log.exists() and log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err  # 130 for Ctrl-C, 143 for SIGTERM
    ckpt = latest_checkpoint(tmp_path / "b")
    step = read_checkpoint(ckpt)[1]["step"]
    assert 0 < step < 600 and f"interrupted at step {step}; saved {ckpt}" in err
    done = subprocess.run(cmd(tmp_path / "b", "--resume"), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert f"trained {600 - step} steps, 600 in all" in done.stdout  # this run's, then the total
    subprocess.run(cmd(tmp_path / "a"), check=True, capture_output=True)
    ta, _ = read_checkpoint(latest_checkpoint(tmp_path / "a"))
    tb, _ = read_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    """Temporaries of a killed process are removed; one of a live process is left alone."""
    train(_toy(tmp_path, 2))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ckpt-00000009.safetensors.tmp{dead.pid}"
    live = tmp_path / f".ckpt-00000010.safetensors.tmp{os.getpid()}"
    for p in (stale, live):
        p.write_bytes(b"\0" * 100)
    with pytest.warns(UserWarning, match=f"removed {stale.name}"):
        train(_toy(tmp_path, 4), resume=True)
    assert not stale.exists() and live.exists()


def test_signals_that_are_ignored_or_come_after_the_last_step_do_not_stop(tmp_path,
                                                                         monkeypatch):
    """A SIGINT that the caller ignores (nohup, `cmd &`) stays ignored; one that arrives during
    the final sample grid, after the last step, does not turn the finished run into an
    interrupted one."""
    from edm_fast import losses
    from edm_fast.train import loop as train_module

    real_loss, calls = losses.EDMLoss.__call__, {"n": 0}

    def loss_with_ctrl_c(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(losses.EDMLoss, "__call__", loss_with_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert train(_toy(tmp_path / "ignored", 6))["steps_this_run"] == 6
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGINT) is previous
    monkeypatch.setattr(losses.EDMLoss, "__call__", real_loss)
    real_grid = train_module.sample_grid

    def grid_with_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_grid(*args, **kwargs)

    monkeypatch.setattr(train_module, "sample_grid", grid_with_ctrl_c)
    summary = train(_toy(tmp_path / "late", 4))
    assert summary["steps"] == 4 and summary["steps_this_run"] == 4
    assert signal.getsignal(signal.SIGINT) is previous


def test_divergence_is_one_line_and_names_what_is_left(tmp_path):
    res = subprocess.run([sys.executable, "-m", "edm_fast", "train", "--data", "toy:gmm2d",
                          "--preset", "toy-mlp", "--batch", "64", "--lr", "1e30",
                          "--lr-rampup-kimg", "0", "--kimg", "3", "--no-progress", "--out",
                          str(tmp_path)], capture_output=True, text=True, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and lines[-1].startswith("edm-fast train: error: "), res.stderr
    assert "NaN/Inf gradients" in lines[-1] and "no checkpoint was written" in lines[-1]
    assert "--amp none" not in lines[-1]


def test_resume_guards(tmp_path):
    train(_toy(tmp_path, 4))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_toy(tmp_path, 8))
    with pytest.raises(ValueError, match="batch"):
        train(_toy(tmp_path, 8, batch=32), resume=True)
    with pytest.raises(ValueError, match="--resume: seed=5 differs from the run's 0"):
        train(_toy(tmp_path, 8, seed=5), resume=True)  # the data order is drawn from the seed
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_toy(tmp_path / "empty", 8), resume=True)


def test_resume_from_an_inference_file_gives_clear_error(tmp_path):
    """A file written by convert/export in place of the latest training checkpoint."""
    from edm_fast.io.checkpoints import export_inference_checkpoint

    train(_toy(tmp_path, 4))
    latest = latest_checkpoint(tmp_path)
    export_inference_checkpoint(latest, tmp_path / "inference.safetensors")
    (tmp_path / "inference.safetensors").replace(latest)
    with pytest.raises(CheckpointError, match="is not a training checkpoint"):
        train(_toy(tmp_path, 8), resume=True)


def test_checkpoints_get_the_mode_of_other_new_files(tmp_path):
    from edm_fast.io.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "c.safetensors", {"w": torch.zeros(2)}, {"note": "x"})
    (tmp_path / "plain.txt").write_text("")
    mode = (tmp_path / "plain.txt").stat().st_mode
    assert (tmp_path / "c.safetensors").stat().st_mode == mode


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    train(_toy(tmp_path, 4))
    ckpt = latest_checkpoint(tmp_path)
    data = ckpt.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_denoiser_checkpoint(bad)
    res = subprocess.run([sys.executable, "-m", "edm_fast", "sample", "--ckpt", str(bad),
                          "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert res.returncode == 2 and "truncated or corrupt" in res.stderr
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        load_denoiser_checkpoint(garbage)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    import edm_fast.losses as losses

    real = losses.EDMLoss.__call__
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        return out * float("nan") if calls["n"] in (3, 4) else out

    monkeypatch.setattr(losses.EDMLoss, "__call__", flaky)
    summary = train(_toy(tmp_path / "a", 6))
    assert summary["steps"] == 6 and summary["nonfinite_total"] == 2
    def broken(self, *args, **kwargs):
        return real(self, *args, **kwargs) * float("inf")

    monkeypatch.setattr(losses.EDMLoss, "__call__", broken)
    with pytest.raises(TrainingDiverged, match="consecutive steps"):
        train(_toy(tmp_path / "b", 50, max_nonfinite=3))


def test_kill_during_training_never_loses_a_checkpoint(tmp_path):
    """SIGKILL the training process at several moments (checkpoints are written every step
    here, so kills land mid-write too): the latest checkpoint always loads, no temporary file is
    mistaken for a checkpoint, and --resume completes the run."""
    out = tmp_path / "run"

    def cmd(steps):
        return [sys.executable, "-m", "edm_fast", "train", "--data", "toy:gmm2d", "--preset",
                "toy-mlp", "--batch", "64", "--kimg", str(64 * steps / 1000), "--ckpt-every",
                str(64 / 1000), "--sample-every", "0", "--no-progress", "--out", str(out)]

    for attempt, delay in enumerate((3.0, 1.3, 2.1)):
        proc = subprocess.Popen(cmd(400) + (["--resume"] if attempt else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while latest_checkpoint(out) is None and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = latest_checkpoint(out)
        assert ckpt is not None
        _, meta = read_checkpoint(ckpt)  # loads: never a torn file
        assert meta["step"] >= 1
    done = subprocess.run(cmd(meta["step"] + 3) + ["--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_checkpoint(latest_checkpoint(out))[1]["step"] == meta["step"] + 3


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    """torchrun with 2 CPU processes (gloo): per-rank shards, DDP gradient averaging, rank-0 I/O;
    the run's own end-of-training check confirms both ranks hold bit-identical weights."""
    out = tmp_path / "ddp"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29517", "-m", "edm_fast", "train", "--data", "toy:gmm2d",
         "--preset", "toy-mlp", "--batch", "64", "--kimg", str(64 * 8 / 1000),
         "--sample-every", "0", "--no-progress", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    summary = records[-1]["summary"]
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert summary["steps"] == 8
    _, meta = read_checkpoint(latest_checkpoint(out))
    assert meta["world_size"] == 2
    tensors, _ = read_checkpoint(latest_checkpoint(out))
    assert "rng.rank1.cpu" in tensors and not torch.equal(tensors["rng.rank0.cpu"],
                                                          tensors["rng.rank1.cpu"])


def test_final_loss_is_the_last_logged_loss(tmp_path):
    """summary['final_loss'] (the closing line of `edm-fast train`) is the last log record's
    loss, the mean over its last final_loss_steps steps, and the summary record says the same."""
    summary = train(_toy(tmp_path, 10, log_every=4))
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [4, 8, 10]
    assert summary["final_loss"] == logged[-1]["loss"] and summary["final_loss_steps"] == 2
    assert records[-1]["summary"]["final_loss"] == logged[-1]["loss"]
    again = train(_toy(tmp_path, 10), resume=True)  # nothing left to train
    assert again["final_loss"] is None and again["final_loss_steps"] == 0


def _damage(ckpt, change):
    """Rewrite a training checkpoint with ``change(tensors, meta)`` applied."""
    tensors, meta = read_checkpoint(ckpt)
    change(tensors, meta)
    meta.pop("format_version", None)
    save_checkpoint(ckpt, tensors, meta)


def _first_key(tensors, prefix):
    return next(k for k in tensors if k.startswith(prefix) and tensors[k].ndim == 2)


RESUME_DAMAGE = {
    "nan model weight": (lambda t, m: t[_first_key(t, "model.")].fill_(float("nan")),
                         "NaN/Inf"),
    "wrong ema shape": (lambda t, m: t.update({_first_key(t, "ema."): torch.zeros(3, 3)}),
                        "shape"),
    "int weights": (lambda t, m: t.update({(k := _first_key(t, "model.")):
                                           t[k].to(torch.int32)}), "int32"),
    "missing weight": (lambda t, m: t.pop(_first_key(t, "model.")), "missing"),
    "step not a count": (lambda t, m: m.update(step="12"), "not a count"),
    "no training options": (lambda t, m: m.update(train=[1]), "damaged metadata"),
    "stream state": (lambda t, m: m.update(stream={"seed": 0}), "damaged training state"),
    "optimizer state": (lambda t, m: m.update(optimizer={"scalars": 3}),
                        "damaged training state"),
    "rng state": (lambda t, m: t.update({"rng.rank0.cpu": torch.zeros(5, dtype=torch.uint8)}),
                  "damaged training state"),
}


@pytest.fixture(scope="module")
def _short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("short")
    train(_toy(out, 2))
    return out


@pytest.mark.parametrize("case", sorted(RESUME_DAMAGE))
def test_resume_refuses_a_damaged_training_state(_short_run, tmp_path, case):
    """--resume checks the checkpoint before loading it (weights against the rebuilt network,
    finite values, counters, then optimizer / data order / RNG state): a damaged or hostile file
    is one CheckpointError naming it, never a traceback from deep inside torch."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(_short_run, out)
    change, expected = RESUME_DAMAGE[case]
    _damage(latest_checkpoint(out), change)
    with pytest.raises(CheckpointError, match=expected) as info:
        train(_toy(out, 4), resume=True)
    assert "\n" not in str(info.value) and str(latest_checkpoint(out).name) in str(info.value)


def test_cli_resume_of_a_damaged_checkpoint_is_one_line(_short_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(_short_run, out)
    _damage(latest_checkpoint(out), RESUME_DAMAGE["nan model weight"][0])
    res = subprocess.run([sys.executable, "-m", "edm_fast", "train", "--resume", "--data",
                          "toy:gmm2d", "--preset", "toy-mlp", "--batch", "64", "--lr", "1e-3",
                          "--kimg", "0.256", "--out", str(out), "--no-progress",
                          "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "NaN/Inf" in res.stderr


@pytest.mark.parametrize("loss_name", ["edm", "ddpm"])
def test_batch_gpu_accumulates_the_full_batch_gradient(loss_name):
    """--batch-gpu: the loss's random numbers are drawn for the whole batch, then slices of at
    most batch_gpu images accumulate their share; the gradient equals the full batch's to
    float32 rounding (bound 1e-5 relative: only the summation order differs)."""
    from edm_fast.io.checkpoints import build_denoiser, net_spec
    from edm_fast.losses import make_loss
    from edm_fast.train.step import accumulate_gradients as _accumulate_gradients

    torch.manual_seed(0)
    spec = net_spec("tiny", img_resolution=8, img_channels=1, label_dim=3)
    den = build_denoiser({"net": spec, "precond": {"name": loss_name}}).train()
    loss_fn = make_loss(loss_name)
    images, labels = torch.randn(10, 1, 8, 8), torch.nn.functional.one_hot(
        torch.arange(10) % 3, 3).float()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads, losses = [], []
    for batch_gpu in (None, 4):  # 10 = 4 + 4 + 2: unequal slices are weighted by their size
        den.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        losses.append(_accumulate_gradients(loss_fn, den, images, labels, None, scaler,
                                            batch_gpu, None, torch.device("cpu")))
        grads.append(torch.cat([p.grad.reshape(-1) for p in den.parameters()]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert (grads[0] - grads[1]).norm() <= 1e-5 * grads[0].norm()
    assert grads[0].norm() > 0


def test_xflip_mirrors_about_half_and_is_reproducible(tmp_path):
    from edm_fast.train.step import mirror_half as _mirror_half

    images = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 6, 4).repeat(400, 1, 1, 1)
    out = _mirror_half(images, seed=0, step=7, rank=0)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert bool((mirrored ^ kept).all())  # each image whole, one or the other
    assert 150 < int(mirrored.sum()) < 250  # Binomial(400, 1/2): mean 200, sd 10
    assert torch.equal(out, _mirror_half(images, seed=0, step=7, rank=0))
    assert not torch.equal(out, _mirror_half(images, seed=0, step=8, rank=0))

    with pytest.raises(ValueError, match="xflip mirrors images"):  # toy data are vectors
        train(_toy(tmp_path, 1, xflip=True))


def test_resume_takes_the_runs_saved_options(_short_run, tmp_path):
    """`train --resume --out RUN` needs no other option: the run's own are read from its
    checkpoint; an explicit option the run fixes (batch) is still refused by name."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(_short_run, out)
    base = [sys.executable, "-m", "edm_fast", "train", "--resume", "--out", str(out),
            "--no-progress", "--device", "cpu"]
    res = subprocess.run(base + ["--kimg", "0.256"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    _, meta = read_checkpoint(latest_checkpoint(out))
    assert meta["step"] == 4 and meta["train"]["lr"] == TOY["lr"]
    assert meta["train"]["data"] == "toy:gmm2d" and meta["train"]["kimg"] == 0.256
    res = subprocess.run(base + ["--batch", "32"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "batch=32 differs from the run's 64" in res.stderr
