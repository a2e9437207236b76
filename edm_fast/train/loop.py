"""Training loop for EDM (and the VP, VE and DDPM baselines on the same nets and data), and for
EDM2 on its magnitude-preserving nets (the recipe's differences: edm_fast.train.edm2).

What it does (EDM App. F.3 habits): Adam with a learning-rate ramp-up, an EMA of the weights
with a half-life measured in images (and a ramp-up), optional gradient clipping, bf16/fp16
autocast, skipping of steps whose gradients are NaN/Inf (and a clear stop after too many),
tqdm progress with loss and images/s, a JSONL loss log and a loss-curve plot, periodic sample
grids, atomic safetensors checkpoints holding everything needed to resume bit for bit (the
fp16 loss scale and the data position included), a checkpoint of the last whole step on Ctrl-C
or SIGTERM (single-process runs), and multi-process data parallelism under torchrun
(DistributedDataParallel, rank-0-only I/O).

This module holds ``train`` and the loop over the steps; the options, the run's state, its
start, checkpoints and reports live in modules beside it (listed in ``edm_fast.train``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
import warnings
from pathlib import Path

import torch

from ..io.checkpoints import latest_checkpoint, remove_stale_temporaries
from ..losses import make_loss
from .checkpointing import save_training_checkpoint
from .config import LOSS_PRECOND, TrainConfig, check_config, resumed_config, with_defaults
from .distributed import barrier, data_parallel
from .ema import EMA
from .memory import images_per_pass
from .reporting import ranks_in_sync, sample_grid, summary
from .run_folder import Run, trim_log
from .start import start_or_resume
from .state import TrainState
from .step import accumulate_gradients, learning_rate, mirror_half, zero_nonfinite_gradients

__all__ = ["TrainConfig", "train", "TrainingDiverged", "TrainingInterrupted", "LOSS_PRECOND",
           "resumed_config", "with_defaults", "EMA", "TrainState"]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""

    exit_code = 1  # a run that failed: the CLI prints the message as one line (edm_fast.errors)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (``signum``): the run stopped after a whole step and saved it
    (``checkpoint``)."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGINT):
        super().__init__(f"stopped at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.signum = step, checkpoint, int(signum)


class _StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step, with a checkpoint,
    so that no finished step is lost; a second Ctrl-C interrupts at once. Installed for
    single-process runs in the main thread only (ranks of a torchrun job would stop at different
    steps and hang in the next collective)."""

    def __init__(self, enabled: bool):
        self.signal, self._previous = None, {}
        if enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                current = signal.getsignal(sig)
                if current in (signal.SIG_IGN, None):  # ignored on purpose (nohup, `cmd &`),
                    continue                          # or a handler not set from Python
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)



def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run (or continue) a training run; returns a summary dict. See TrainConfig for options."""
    from tqdm.auto import tqdm  # the notebook widget under Jupyter (with ipywidgets)

    cfg = with_defaults(cfg)
    check_config(cfg)
    run = Run(cfg)
    if run.main:
        for stale in remove_stale_temporaries(run.out):
            warnings.warn(f"removed {stale.name}, an unfinished checkpoint write of a killed "
                          "process", stacklevel=2)
    barrier()
    state = start_or_resume(run, resume)
    if run.main:  # only now: a run refused for its data, preset or --resume leaves no folder
        run.out.mkdir(parents=True, exist_ok=True)
        trim_log(run.out / "log.jsonl", state.step)
        if cfg.loss == "edm2":
            from .edm2 import remove_snapshots_after

            remove_snapshots_after(run.out, state.step * cfg.batch)
        (run.out / "config.json").write_text(json.dumps(
            state.meta | {"train": dataclasses.asdict(cfg)}, indent=2, default=str))
    state.loss_fn = make_loss(state.meta["loss"])
    state.train_denoiser = (data_parallel(state.denoiser, run.device, cfg.loss == "edm2")
                            if run.world > 1 else state.denoiser)
    state.denoiser.model.train()
    total_steps = math.ceil(cfg.kimg * 1000 / cfg.batch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    state.scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.amp == "fp16")
    if state.scaler.is_enabled() and state.meta.get("grad_scaler"):  # fp16: resume bit for bit
        state.scaler.load_state_dict(state.meta["grad_scaler"])
    if state.step >= total_steps:  # a finished run resumed with the same length: nothing to do
        return summary(run, state, 0, None, in_sync=True, log=False)
    start_step = state.step
    cfg = dataclasses.replace(cfg, batch_gpu=images_per_pass(run, cfg, state))

    bar = tqdm(total=total_steps, initial=state.step, desc=f"train {cfg.loss}", unit="step",
               disable=not (cfg.progress and run.main), dynamic_ncols=True)
    stop = _StopRequest(run.world == 1 and threading.current_thread() is threading.main_thread())
    try:
        last_logged = run_steps(run, cfg, state, total_steps, bar, stop)
    finally:
        stop.restore()
        bar.close()
    in_sync = ranks_in_sync(state.denoiser.model, run.world)
    return summary(run, state, state.step - start_step, last_logged, in_sync)


def run_steps(run: Run, cfg: TrainConfig, state: TrainState, total_steps: int, bar,
              stop: _StopRequest):
    """The training steps from ``state.step`` to ``total_steps``, advancing ``state``; returns
    last_logged = (loss, steps): the last log record's loss, the mean over its last ``steps``
    steps (None when no step ran). ``cfg``: the run's options with batch_gpu settled."""
    ckpt_every = max(1, round(cfg.ckpt_every_kimg * 1000 / cfg.batch))
    sample_every = round(cfg.sample_every_kimg * 1000 / cfg.batch) if cfg.sample_every_kimg else 0
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    edm2 = cfg.loss == "edm2"
    snapshot_every = (max(1, round(cfg.snapshot_every_kimg * 1000 / cfg.batch))
                      if edm2 and cfg.snapshot_every_kimg else math.inf)  # 0: at the end only
    model, ema, opt, scaler = state.denoiser.model, state.ema, state.optimizer, state.scaler
    saved_step = state.step
    consecutive_bad, smooth, steps_since_log, loss_sum, last_logged = 0, None, 0, 0.0, None
    t_last = time.perf_counter()
    while state.step < total_steps and stop.signal is None:
        try:
            images, labels = next(state.stream)
        except Exception:
            if stop.signal is None:
                raise
            break  # Ctrl-C also reached the data loader's workers: stop at the last whole step
        images = images.to(run.device, non_blocking=True)
        labels = labels.to(run.device) if state.denoiser.label_dim else None
        if cfg.xflip:
            images = mirror_half(images, cfg.seed, state.step, run.rank)
        aug_labels = None
        if state.augment is not None:
            images, aug_labels = state.augment(images)
            aug_labels = aug_labels.to(run.device)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, state.step)
        opt.zero_grad(set_to_none=True)
        loss = accumulate_gradients(state.loss_fn, state.train_denoiser, images, labels,
                                    aug_labels, scaler, cfg.batch_gpu, amp_dtype, run.device)
        scaler.unscale_(opt)
        # EDM2 (NVlabs' force_finite): NaN/Inf gradient entries are zeroed and the step is taken;
        # under the fp16 loss scaler, whose own skip lowers the scale, the step is skipped.
        zeroed = edm2 and not scaler.is_enabled() and zero_nonfinite_gradients(model)
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        finite = bool(torch.isfinite(grad_norm))  # identical on every rank: grads are all-reduced
        if zeroed or not finite:
            consecutive_bad += 1
            state.nonfinite_total += 1
            if consecutive_bad > cfg.max_nonfinite:
                latest = latest_checkpoint(run.out)
                raise TrainingDiverged(
                    f"{consecutive_bad} consecutive steps had NaN/Inf gradients "
                    f"(step {state.step}); lower --lr or use --grad-clip"
                    + (", or try --amp none" if amp_dtype else "")
                    + (f"; the last good checkpoint is {latest}" if latest else
                       "; no checkpoint was written"))
            if not finite:
                scaler.update()
                continue
        else:
            consecutive_bad = 0
        scaler.step(opt)
        scaler.update()
        state.step += 1
        step = state.step
        ema.update(model, (step - 1) * cfg.batch, cfg.batch)  # the images before this batch
        loss_value = loss.item()
        loss_sum += loss_value
        steps_since_log += 1
        smooth = loss_value if smooth is None else 0.95 * smooth + 0.05 * loss_value
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            ips = steps_since_log * cfg.batch / max(now - t_last, 1e-9)
            record = {"step": step, "kimg": step * cfg.batch / 1000,
                      "loss": loss_sum / steps_since_log, "lr": opt.param_groups[0]["lr"],
                      "img_per_s": ips, "nonfinite_total": state.nonfinite_total}
            run.log(record)
            last_logged = (record["loss"], steps_since_log)
            bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{ips:.0f}")
            t_last, steps_since_log, loss_sum = now, 0, 0.0
        if edm2 and run.main and (step % snapshot_every == 0 or step == total_steps):
            from .phema_snapshots import save_power_ema_snapshots

            save_power_ema_snapshots(ema.power, run.out,
                                     {**state.meta, "step": step, "kimg": step * cfg.batch / 1000},
                                     nimg=step * cfg.batch, state=model.state_dict())
        if step % ckpt_every == 0 or step == total_steps:
            save_training_checkpoint(run, state)
            saved_step = step
        if run.main and ((sample_every and step % sample_every == 0) or step == total_steps):
            sample_grid(run, state.meta, ema, step)
    # (a signal that came after the last step leaves the run finished)
    if stop.signal is not None and state.step < total_steps:
        if saved_step != state.step:
            save_training_checkpoint(run, state)
        raise TrainingInterrupted(state.step, latest_checkpoint(run.out), stop.signal)
    return last_logged
