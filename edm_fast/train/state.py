"""``TrainState``: what a training run carries from one step to the next.

A checkpoint holds all of it (plus each rank's RNG state and the fp16 loss scale), so a run
resumed from one continues bit for bit; ``start.start_or_resume`` builds it, the training loop
(loop.py) advances it, ``checkpointing`` writes and restores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .augment import AugmentPipe
    from .batch_stream import BatchStream

__all__ = ["TrainState"]


@dataclass(eq=False)
class TrainState:
    """The run's network, its EMA, optimizer and data position, and the step counters."""

    meta: dict                       # the checkpoint metadata: network spec, preconditioning,
    #                                  loss, sample shape, data, training options
    dataset: Any                     # the training data (train.data)
    denoiser: torch.nn.Module        # the network in its preconditioning (EDM2Denoiser for EDM2)
    augment: AugmentPipe | None      # non-leaking augmentation (None: off)
    ema: Any                         # ema.EMA, or edm2.PowerEMATracker for an EDM2 run
    optimizer: torch.optim.Optimizer
    stream: BatchStream              # this rank's batches, resumable at the exact position
    step: int = 0                    # optimizer steps taken (skipped steps do not count)
    nonfinite_total: int = 0         # steps whose gradients held NaN/Inf, over the whole run
    train_denoiser: Any = None       # what the loss calls: ``denoiser``, or it around DDP
    loss_fn: Any = None              # losses.make_loss(meta["loss"])
    scaler: torch.amp.GradScaler | None = None  # the fp16 loss scaler (disabled otherwise)
