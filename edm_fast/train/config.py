"""The options of a training run: ``TrainConfig``, the defaults left to the recipe
(``with_defaults``: EDM App. F.3, or EDM2's per-preset recipe), the options ``--resume`` takes
from the run (``resumed_config``), and the checks that refuse values that cannot work
(``check_config``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..io.checkpoints import CheckpointError, latest_checkpoint, read_checkpoint

__all__ = ["LOSS_PRECOND", "NOT_RESUMED", "TrainConfig", "check_config", "loss_config",
           "resumed_config", "with_defaults"]

LOSS_PRECOND = {"edm": "edm", "ddpm": "ddpm", "vp": "vp", "ve": "ve", "edm2": "edm"}


@dataclass
class TrainConfig:
    """Every option of a training run (stored in each checkpoint)."""

    data: str = "digits"                 # digits[:RES] | mnist:PATH | toy:NAME | image folder
    out: str = "runs/edm"                # run folder (checkpoints, log, samples)
    preset: str = "tiny"                 # network preset (edm_fast.nets.PRESETS)
    loss: str | None = None              # edm | ddpm | vp | ve | edm2 (sets the preconditioning
    #                                      too); None: edm2 for EDM2 presets, else edm
    cond: bool = False                   # class-conditional on the data's labels
    kimg: float = 200.0                  # training length in thousands of images
    batch: int = 128                     # global batch size (split over ranks)
    batch_gpu: int | None = None         # max images per forward pass; the rest accumulates
    lr: float | None = None              # Adam learning rate after the ramp-up (EDM2: alpha_ref);
    #                                      None: 1e-3 for EDM, the preset's for EDM2 (train_edm2)
    lr_rampup_kimg: float | None = None  # linear ramp-up length; None: 10 (EDM2 presets: 10000)
    lr_decay_batches: float | None = None  # EDM2: t_ref of lr / sqrt(max(t / t_ref, 1)), t in
    #                                      batches; 0: no decay; None: the preset's
    p_mean: float | None = None          # ln(sigma) ~ N(p_mean, p_std^2) in the EDM / EDM2 loss;
    p_std: float | None = None           # None: the loss's (EDM -1.2, 1.2) or the EDM2 preset's
    ema_halflife_kimg: float = 50.0      # EMA half-life in thousands of images
    ema_rampup_ratio: float | None = 0.05  # half-life <= ratio * images seen (None: off)
    ema_sigma_rels: tuple = (0.05, 0.10)  # EDM2: the power-function EMA profiles tracked
    snapshot_every_kimg: float | None = None  # EDM2: power-EMA snapshot period (0: at the end
    #                                      only); None: the preset's
    grad_clip: float | None = None       # max gradient 2-norm (None: no clipping)
    dropout: float | None = None         # override the preset's dropout
    label_dropout: float = 0.0           # label dropout for classifier-free guidance
    augment: float = 0.0                 # augmentation probability (EDM App. F.2); 0 = off
    xflip: bool = False                  # mirror each training image with probability 1/2
    amp: str = "none"                    # none | bf16 | fp16 autocast
    resolution: int | None = None        # image size (default: the data's / preset's)
    channels: int | None = None          # 1 or 3 for image data (default: the data's)
    max_pixels: int = 100_000_000        # image files declaring more are skipped (data.py)
    seed: int = 0
    device: str = "auto"
    workers: int = 0                     # data loader worker processes
    ckpt_every_kimg: float = 50.0
    keep_ckpts: int = 3                  # how many recent checkpoints to keep
    sample_every_kimg: float = 50.0      # sample grid period (0: only at the end)
    log_every: int = 20                  # steps between log records
    max_nonfinite: int = 20              # consecutive skipped steps before giving up
    progress: bool = True
    max_steps: int | None = None         # stop early after this many steps (tests, budgets)
    net_overrides: dict = field(default_factory=dict)


# Options that describe this invocation, not the run: --resume never takes them from the run.
NOT_RESUMED = ("out", "device", "workers", "progress", "max_steps")


def resumed_config(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """``cfg`` with every option outside ``explicit`` (the ones the user set) taken from the
    run's newest checkpoint in cfg.out, except NOT_RESUMED; ``cfg`` itself when there is no
    readable checkpoint (train() then says why). An explicit option that differs from the
    run's where the run fixes it (data, network, batch, seed, ...) is still refused by train()."""
    latest = latest_checkpoint(cfg.out)
    if latest is None:
        return cfg
    try:
        _, meta = read_checkpoint(latest, prefixes=("\0",))  # the metadata only
    except CheckpointError:
        return cfg
    saved = meta.get("train")
    if not isinstance(saved, dict):
        return cfg
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(NOT_RESUMED) - explicit
    return dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k in names})


def with_defaults(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the options left at None set: the loss from the preset's architecture (edm2
    for EDM2 presets), then the learning rate, its schedule, the noise levels and the snapshot
    period from the EDM2 recipe of the preset (train_edm2.recipe_for) or EDM's defaults."""
    from .edm2 import is_edm2_preset, recipe_for

    loss = cfg.loss if cfg.loss is not None else "edm2" if is_edm2_preset(cfg.preset) else "edm"
    if loss == "edm2" and is_edm2_preset(cfg.preset):
        recipe = dataclasses.asdict(recipe_for(cfg.preset))
    else:
        recipe = {"lr": 1e-3, "lr_rampup_kimg": 10.0}
    unset = {k: v for k, v in recipe.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, loss=loss, **unset,
                               ema_sigma_rels=tuple(float(s) for s in cfg.ema_sigma_rels))


def _check_edm2_config(cfg: TrainConfig, edm2: bool) -> None:
    """The options that only an EDM2 run takes, or that it refuses."""
    from .phema import MAX_SIGMA_REL

    if (cfg.loss == "edm2") != edm2:
        raise ValueError(
            f"preset {cfg.preset!r} is an EDM2 network: it trains with the EDM2 loss (leave "
            f"--loss out or give --loss edm2), not {cfg.loss!r}" if edm2 else
            f"the EDM2 loss needs an EDM2 network (its log-variance head): use --preset "
            f"tiny-edm2 or an edm2-* preset, not {cfg.preset!r}")
    if not edm2:
        given = [k for k in ("lr_decay_batches", "snapshot_every_kimg")
                 if getattr(cfg, k) is not None]
        if given:
            raise ValueError(f"{given[0]} belongs to the EDM2 recipe; this is a {cfg.loss} run")
        return
    if cfg.augment:
        raise ValueError("EDM2 networks take no augmentation labels: train them without "
                         "--augment (the EDM2 recipe uses no augmentation)")
    if cfg.label_dropout:
        raise ValueError("EDM2 networks have no label dropout; guide them with a smaller or "
                         "shorter-trained model of their own (autoguidance) instead")
    sigma_rels = cfg.ema_sigma_rels
    if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels) or not all(
            0 < s < MAX_SIGMA_REL for s in sigma_rels):
        raise ValueError(f"ema_sigma_rels must be distinct values in (0, {MAX_SIGMA_REL:.4f}), "
                         f"got {list(sigma_rels)}")
    for name in ("lr_decay_batches", "snapshot_every_kimg"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {getattr(cfg, name)}")


def check_config(cfg: TrainConfig) -> None:
    """Reject option values that cannot work, before anything is written (``cfg`` with its
    defaults set: with_defaults)."""
    from .edm2 import is_edm2_preset

    if cfg.loss not in LOSS_PRECOND:
        raise ValueError(f"unknown loss {cfg.loss!r}; choose from {sorted(LOSS_PRECOND)}")
    _check_edm2_config(cfg, is_edm2_preset(cfg.preset))
    if (cfg.p_mean is not None or cfg.p_std is not None) and cfg.loss not in ("edm", "edm2"):
        raise ValueError(f"p_mean and p_std set the noise levels of the EDM and EDM2 losses; "
                         f"the {cfg.loss} loss draws its own")
    if cfg.p_mean is not None and not math.isfinite(cfg.p_mean):
        raise ValueError(f"p_mean must be a finite number, got {cfg.p_mean}")
    if cfg.p_std is not None and not 0 < cfg.p_std < math.inf:
        raise ValueError(f"p_std must be a finite number > 0, got {cfg.p_std}")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16, got {cfg.amp!r}")
    positive = {"kimg": cfg.kimg, "batch": cfg.batch, "lr": cfg.lr,
                "ema_halflife_kimg": cfg.ema_halflife_kimg, "ckpt_every_kimg": cfg.ckpt_every_kimg,
                "log_every": cfg.log_every, "max_nonfinite": cfg.max_nonfinite,
                "keep_ckpts": cfg.keep_ckpts}
    positive |= {k: v for k, v in (("max_steps", cfg.max_steps), ("grad_clip", cfg.grad_clip),
                                   ("batch_gpu", cfg.batch_gpu)) if v is not None}
    for name, value in positive.items():
        if not 0 < value < math.inf:
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    for name in ("lr_rampup_kimg", "sample_every_kimg", "seed", "workers"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.augment <= 1:
        raise ValueError(f"augment is a probability in [0, 1], got {cfg.augment}")
    for name, value in (("label_dropout", cfg.label_dropout), ("dropout", cfg.dropout or 0)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} is a probability in [0, 1), got {value}")
    if cfg.label_dropout and not cfg.cond:
        raise ValueError("label_dropout drops class labels: it needs a conditional run (--cond)")
    if cfg.resolution is not None and cfg.resolution < 1:  # 0 read as "the default" before
        raise ValueError(f"resolution must be >= 1 (or left out for the data's own), "
                         f"got {cfg.resolution}")
    if not str(cfg.out).strip():  # Path("") is the current folder
        raise ValueError("--out is empty: name the run folder, e.g. runs/edm")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out} is an existing file, not a run folder")


def loss_config(cfg: TrainConfig) -> dict:
    """make_loss's config: the name, and the noise-level distribution where it was set."""
    config = {"name": cfg.loss}
    if cfg.p_mean is not None:
        config["P_mean"] = cfg.p_mean
    if cfg.p_std is not None:
        config["P_std"] = cfg.p_std
    return config

