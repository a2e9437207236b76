"""One optimizer step's parts: the learning rate of the step (EDM's ramp-up, App. F.3, or
EDM2's inverse-square-root decay), --xflip mirroring, gradient accumulation over micro-batches
(--batch-gpu) and the zeroing of NaN/Inf gradient entries (EDM2)."""

from __future__ import annotations

import contextlib

import torch

from .config import TrainConfig

__all__ = ["accumulate_gradients", "learning_rate", "mirror_half", "zero_nonfinite_gradients"]


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of the step that starts after ``step`` steps: EDM's linear ramp-up
    (App. F.3), or EDM2's ramp-up and inverse-square-root decay (train_edm2)."""
    nimg = step * cfg.batch
    if cfg.loss == "edm2":
        from .edm2 import edm2_learning_rate

        return edm2_learning_rate(nimg, cfg.batch, cfg.lr, cfg.lr_decay_batches,
                                  cfg.lr_rampup_kimg)
    return cfg.lr * min(nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1)


@torch.no_grad()
def zero_nonfinite_gradients(model: torch.nn.Module) -> bool:
    """Set the NaN/Inf entries of every gradient to 0; True when there were any."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        return False
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    return True


def mirror_half(images: torch.Tensor, seed: int, step: int, rank: int) -> torch.Tensor:
    """--xflip: each image mirrored left-right with probability 1/2, drawn from a generator of
    its own seeded by (seed, step, rank), so the global RNG (and resume) is unaffected. NVlabs'
    --xflip doubles the data set with mirrored copies; a fair coin per image per step gives
    each image and its mirror the same expected share of training."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    flip = torch.rand(images.shape[0], generator=gen) < 0.5
    flip = flip.to(images.device).reshape(-1, *([1] * (images.ndim - 1)))
    return torch.where(flip, images.flip(-1), images)


def accumulate_gradients(loss_fn, train_den, images, labels, aug_labels, scaler,
                          batch_gpu: int | None, amp_dtype, device) -> torch.Tensor:
    """Backpropagate the batch's mean loss; returns it (detached). With ``batch_gpu`` below the
    batch, the random numbers of the loss (sigma, noise, DDPM's t) are drawn for the whole
    batch first, then each slice of at most ``batch_gpu`` images adds its share
    (slice size / batch) of the mean's gradient, so the result equals the full batch's to float
    rounding while only one slice's activations are alive at a time (EDM2 nets: to the 1e-4
    per pass of their forced weight normalisation, which runs once per slice). Under DDP the
    gradients are all-reduced once, on the last slice."""
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    n = images.shape[0]
    if batch_gpu is None or batch_gpu >= n:
        with autocast:
            loss = loss_fn(train_den, images, labels, aug_labels).float().mean()
        scaler.scale(loss).backward()
        return loss.detach()
    drawn = loss_fn.draw(train_den, images)
    ddp = train_den.model if hasattr(train_den.model, "no_sync") else None
    total = torch.zeros((), device=device)
    starts = range(0, n, batch_gpu)
    for start in starts:
        part = slice(start, min(start + batch_gpu, n))
        last = start + batch_gpu >= n
        sync = contextlib.nullcontext() if ddp is None or last else ddp.no_sync()
        with sync:
            with autocast:
                per_element = loss_fn.given(
                    train_den, images[part], None if labels is None else labels[part],
                    None if aug_labels is None else aug_labels[part],
                    {k: v[part] for k, v in drawn.items()}).float()
                share = per_element.mean() * (per_element.shape[0] / n)
            scaler.scale(share).backward()
        total += share.detach()
    return total
