"""The EDM2 training recipe inside ``edm-fast train`` (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696; NVlabs/edm2's
train_edm2.py and training/training_loop.py for the option semantics).

An EDM2 run is a run whose network preset has arch ``edm2``. It differs from an EDM run in:
    - the loss: the learned-uncertainty loss of Eq. 21 (``losses.EDM2Loss``) on an
      ``EDM2Denoiser``; ln(sigma) ~ N(P_mean, P_std^2) with the preset's P_mean, P_std;
    - the learning rate: the inverse-square-root decay that comes with forced weight
      normalisation (config E of the paper's Table 1; NVlabs' learning_rate_schedule),
          lr(nimg) = alpha_ref / sqrt(max(nimg / (t_ref batch), 1)) * min(nimg / rampup, 1),
      nimg the images trained on before the step, t_ref in batches (NVlabs' --decay);
    - Adam's betas (0.9, 0.99), and gradients cleaned of NaN/Inf entries before the step
      (NVlabs' force_finite) instead of the whole step being skipped;
    - the EMA: power-function EMAs for several sigma_rel (Sec. 3.1, Eq. 127,
      ``phema.PowerEMA``) instead of EDM's half-life EMA, with snapshots of every profile at a
      fixed period (``phema_snapshots``) from which ``edm-fast phema`` reconstructs any other
      sigma_rel after training (Alg. 3). The checkpoint's ``ema.*`` weights, which
      ``edm-fast sample --ckpt RUN`` uses, are the first tracked profile.

The defaults of a preset follow NVlabs' train_edm2.py for the paper's configurations and are
small-run values for ``tiny-edm2`` (a few thousand steps on a CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import torch

from .phema import PowerEMA

__all__ = ["EDM2Recipe", "PowerEMATracker", "edm2_learning_rate", "is_edm2_preset", "recipe_for",
           "remove_snapshots_after"]


@dataclasses.dataclass(frozen=True)
class EDM2Recipe:
    """Per-preset defaults of an EDM2 run (each a TrainConfig option left at None)."""

    lr: float                   # alpha_ref
    lr_decay_batches: float     # t_ref in batches (NVlabs --decay); 0 = no decay
    lr_rampup_kimg: float       # linear ramp-up (NVlabs: 10 Mimg)
    p_mean: float
    p_std: float
    snapshot_every_kimg: float  # power-EMA snapshot period (NVlabs: 8 Mi images)


_NVLABS_LR = {"xxs": 0.0170, "xs": 0.0120, "s": 0.0100, "m": 0.0090, "l": 0.0080, "xl": 0.0070,
              "xxl": 0.0065}
_EIGHT_MI_KIMG = (8 << 20) / 1000

# NVlabs/edm2 train_edm2.py's config_presets (lr, decay, P_mean, P_std) with its fixed 10 Mimg
# ramp-up and 8 Mi-image snapshot period.
_RECIPES = {f"edm2-img512-{size}": EDM2Recipe(lr, 70000, 10_000, -0.4, 1.0, _EIGHT_MI_KIMG)
            for size, lr in _NVLABS_LR.items()}
_RECIPES |= {f"edm2-img64-{size}": EDM2Recipe(_NVLABS_LR[size], 35000, 10_000, -0.8, 1.6,
                                              _EIGHT_MI_KIMG)
             for size in ("xs", "s", "m", "l", "xl")}
# Small runs on pixels (the digits): ImageNet-64's noise levels (pixel space), a ramp-up and a
# decay time a few percent of a 200-kimg run of batch 128 (~1600 steps), snapshots every 10 kimg.
_SMALL = EDM2Recipe(lr=1e-2, lr_decay_batches=500, lr_rampup_kimg=10.0, p_mean=-0.8, p_std=1.6,
                    snapshot_every_kimg=10.0)


def is_edm2_preset(preset: str) -> bool:
    from ..nets.presets import get_preset

    return get_preset(preset).arch == "edm2"


def recipe_for(preset: str) -> EDM2Recipe:
    """The defaults for an EDM2 preset: NVlabs' for the paper's presets, small-run values for
    any other (tiny-edm2)."""
    return _RECIPES.get(preset, _SMALL)


def edm2_learning_rate(nimg: float, batch: int, ref_lr: float, decay_batches: float,
                       rampup_kimg: float) -> float:
    """EDM2's learning rate for the step that starts after ``nimg`` training images:
    ref_lr / sqrt(max(nimg / (decay_batches * batch), 1)), times the linear ramp-up
    min(nimg / (rampup_kimg * 1000), 1); decay_batches = 0 or rampup_kimg = 0 turns that part
    off, as in NVlabs' learning_rate_schedule."""
    lr = ref_lr
    if decay_batches > 0:
        lr /= math.sqrt(max(nimg / (decay_batches * batch), 1.0))
    if rampup_kimg > 0:
        lr *= min(nimg / (rampup_kimg * 1000), 1.0)
    return lr


class PowerEMATracker:
    """Power-function EMAs of a network's parameters for several sigma_rel, updated after each
    step with t = the images trained on so far and dt = the batch (Eq. 127), plus ``model``: a
    copy of the network whose parameters are the first profile's averages themselves (shared
    storage, no extra copy): what the training loop samples its grids with and what the
    checkpoint stores as ``ema.*``. Buffers are copied from the network, not averaged."""

    def __init__(self, model: torch.nn.Module, sigma_rels):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power = PowerEMA(dict(model.named_parameters()), sigma_rels)
        self.primary = self.power.sigma_rels[0]
        average = self.power.averages[self.primary]
        for name, param in self.model.named_parameters():
            param.data = average[name]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, nimg: int, batch: int) -> None:
        """After a step of ``batch`` images that started after ``nimg`` images (the loop's
        calling convention for EDM's EMA): the power EMAs at t = nimg + batch."""
        self.power.update(dict(model.named_parameters()), t=nimg + batch, dt=batch)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{'<sigma_rel>.<name>': tensor} of the profiles after the first (checkpoint keys
        'phema.*'); the first is ``model``'s parameters (the checkpoint's 'ema.*')."""
        first = f"{self.primary:.3f}."
        return {k: v for k, v in self.power.state_dict().items() if not k.startswith(first)}

    def load_state_dict(self, state) -> None:
        """``state`` as state_dict() gives it; the first profile is ``model``'s parameters, which
        the caller loads first."""
        first = f"{self.primary:.3f}."
        self.power.load_state_dict(
            {**state, **{first + k: v for k, v in self.model.named_parameters()}})


_SNAPSHOT_RE = re.compile(r"^phema-(\d+)-\d+\.\d+\.safetensors$")


def remove_snapshots_after(folder: Path, nimg: int) -> list[Path]:
    """Delete the power-EMA snapshots of ``folder`` taken after ``nimg`` images: a run stopped
    after its last checkpoint wrote snapshots that its resumed run retakes (or, resumed with
    other options, would contradict). Returns the removed paths."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for path in sorted(Path(folder).iterdir()):
        m = _SNAPSHOT_RE.match(path.name)
        if m and int(m.group(1)) > nimg:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
