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
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io.checkpoints import (
    CheckpointError, build_denoiser, check_finite, check_weights, latest_checkpoint,
    list_checkpoints, net_spec, UnreadableCheckpointError, read_checkpoint, remove_stale_temporaries, save_checkpoint,
)
from ..device import resolve_device
from .distributed import barrier, init_distributed, is_main, rank_device
from ..losses import make_loss

__all__ = ["TrainConfig", "train", "TrainingDiverged", "LOSS_PRECOND", "resumed_config",
           "with_defaults"]

LOSS_PRECOND = {"edm": "edm", "ddpm": "ddpm", "vp": "vp", "ve": "ve", "edm2": "edm"}


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


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


class EMA:
    """theta_ema <- beta theta_ema + (1 - beta) theta, beta = 0.5^(batch / half-life) (App. F.3)."""

    def __init__(self, model: torch.nn.Module, halflife_kimg: float, rampup_ratio: float | None):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_nimg = halflife_kimg * 1000
        self.rampup_ratio = rampup_ratio

    @torch.no_grad()
    def update(self, model: torch.nn.Module, nimg: int, batch: int) -> None:
        """One EMA step after a batch of ``batch`` images; ``nimg`` counts the images trained on
        before it (NVlabs' cur_nimg at its update), so the first update copies the weights."""
        halflife = self.halflife_nimg
        if self.rampup_ratio is not None:
            halflife = min(halflife, nimg * self.rampup_ratio)
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


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


def _check_config(cfg: TrainConfig) -> None:
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


def _load_data(cfg: TrainConfig):
    from .data import load_dataset

    kwargs = {"progress": cfg.progress and is_main(), "max_pixels": cfg.max_pixels}
    # only the options given: load_dataset refuses them for toy data (2-D points have no size)
    kwargs |= {name: value for name, value in (("resolution", cfg.resolution),
                                               ("channels", cfg.channels)) if value is not None}
    return load_dataset(cfg.data, **kwargs)


def _build(cfg: TrainConfig, dataset, device):
    """(denoiser, meta, augment_pipe) for a new run."""
    from .augment import AugmentPipe
    from ..nets.presets import get_preset

    pipe = AugmentPipe(p=cfg.augment) if cfg.augment > 0 else None
    label_dim = dataset.num_classes if cfg.cond else 0
    if cfg.cond and label_dim == 0:
        raise ValueError(f"--cond asked for, but {cfg.data!r} has no class labels")
    overrides = dict(cfg.net_overrides)
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    if cfg.label_dropout:
        overrides["label_dropout"] = cfg.label_dropout
    toy = dataset.resolution is None
    if toy and cfg.xflip:
        raise ValueError(f"--xflip mirrors images; {cfg.data!r} holds vectors")
    if toy != (get_preset(cfg.preset).arch == "mlp"):
        raise ValueError(f"preset {cfg.preset!r} is {'an image' if toy else 'a vector'} network, "
                         f"but {cfg.data!r} holds {'vectors' if toy else 'images'}; use "
                         f"{'--preset toy-mlp' if toy else 'an image preset such as tiny'}")
    spec = net_spec(cfg.preset, img_resolution=None if toy else dataset.resolution,
                    img_channels=dataset.dim if toy else dataset.num_channels,
                    label_dim=label_dim, augment_dim=pipe.label_dim if pipe else 0, **overrides)
    meta = {
        "net": spec,
        "precond": {"name": LOSS_PRECOND[cfg.loss]},
        "loss": _loss_config(cfg),
        "sample_shape": list(dataset.shape),
        "data": {"spec": cfg.data, "name": dataset.name, "num_classes": dataset.num_classes,
                 "class_names": list(dataset.class_names)},
        "train": dataclasses.asdict(cfg),
    }
    from .data import dataset_stats

    meta["data"]["stats"] = {k: (v.tolist() if torch.is_tensor(v) else v)
                             for k, v in dataset_stats(dataset, max_items=2000).items()}
    denoiser = build_denoiser(meta)
    if meta["precond"]["name"] == "edm":
        denoiser.precond.sigma_data = 0.5  # EDM's fixed sigma_data (Table 1); stats are logged
    if cfg.loss == "edm2":  # the same net and preconditioning, plus the log-variance head
        from ..nets.edm2_precond import EDM2Denoiser

        denoiser = EDM2Denoiser(denoiser.model, denoiser.precond)
    return denoiser.to(device), meta, pipe


def _loss_config(cfg: TrainConfig) -> dict:
    """make_loss's config: the name, and the noise-level distribution where it was set."""
    config = {"name": cfg.loss}
    if cfg.p_mean is not None:
        config["P_mean"] = cfg.p_mean
    if cfg.p_std is not None:
        config["P_std"] = cfg.p_std
    return config


def _optimizer_tensors(opt: torch.optim.Optimizer):
    """Adam state as flat tensors plus the JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt, tensors, info) -> None:
    state: dict = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in info["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def _rng_state(device) -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_state(states: dict[str, torch.Tensor], device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


class _Run:
    """State of one training process (rank)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = rank_device(resolve_device(cfg.device))
        self.rank, self.world = init_distributed(self.device)
        if cfg.batch % self.world:
            raise ValueError(f"batch {cfg.batch} is not divisible by {self.world} processes")
        self.out = Path(cfg.out)
        self.main = is_main()

    def log(self, record: dict) -> None:
        if self.main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def _trim_log(log: Path, step: int) -> None:
    """Keep only the log records up to ``step`` (0 for a fresh run): a run stopped after its last
    checkpoint logged steps that the resumed run repeats, and a fresh run in a folder without
    checkpoints starts a new log."""
    if not log.exists():
        return

    def step_of(line: str) -> float:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            warnings.warn(f"{log}: dropped an unreadable line ({line[:40]!r})", stacklevel=3)
            return math.inf
        return record.get("step", record.get("summary", {}).get("steps", math.inf))

    kept = [line for line in log.read_text().splitlines() if line.strip() and step_of(line) <= step]
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(log)


def _check_same_model(saved: dict, new: dict, path: Path) -> None:
    """--resume must rebuild the saved network: the same architecture and constructor arguments
    (resolution, channels, dropout, label dropout, overrides) and the same sample shape."""
    def plain(value):  # what a JSON round trip makes of it (tuples -> lists)
        return json.loads(json.dumps(value))

    old_net, new_net = plain(saved["net"]), plain(new["net"])
    changed = [f"sample shape {saved['sample_shape']} -> {new['sample_shape']}"
               ] if plain(saved["sample_shape"]) != plain(new["sample_shape"]) else []
    if old_net.get("arch") != new_net.get("arch"):
        changed.append(f"arch {old_net.get('arch')} -> {new_net.get('arch')}")
    old_kw, new_kw = (n.get("kwargs") if isinstance(n.get("kwargs"), dict) else {}
                      for n in (old_net, new_net))
    changed += [f"{k} {old_kw.get(k)!r} -> {new_kw.get(k)!r}"
                for k in sorted(set(old_kw) | set(new_kw)) if old_kw.get(k) != new_kw.get(k)]
    if changed:
        raise ValueError(f"--resume: these options build another network than {path.name}: "
                         f"{'; '.join(changed)}; resume with the run's options or choose another "
                         "--out")


def _read_newest_intact(folder: Path, main: bool = True):
    """(path, tensors, meta) of the newest checkpoint in ``folder`` that reads. Writes are atomic,
    but a file can still be torn later (a copy cut short): it is renamed to <name>.torn, so that
    nothing counts it as a checkpoint any more, and the previous one is used, with a warning.
    Other errors (a newer format, no metadata) stop the resume. Only the main rank renames."""
    torn = []
    for path in list_checkpoints(folder):
        try:
            tensors, meta = read_checkpoint(path)
        except UnreadableCheckpointError as exc:
            torn.append(str(exc))
            if main:
                path.replace(path.with_name(path.name + ".torn"))
            continue
        except CheckpointError:
            if path.exists():
                raise
            continue  # renamed to .torn by the main rank meanwhile (a torchrun job)
        if torn and main:
            warnings.warn(f"--resume: renamed {len(torn)} unreadable checkpoint(s) to *.torn, "
                          f"resuming from {path.name}: {'; '.join(torn)}", stacklevel=3)
        return path, tensors, meta
    raise CheckpointError(f"--resume: no readable checkpoint in {folder} (unreadable ones were "
                          f"renamed to *.torn): {'; '.join(torn)}")


def _resume_or_start(run: _Run, resume: bool):
    """Build everything, from the latest checkpoint when resuming."""
    cfg = run.cfg
    latest = latest_checkpoint(run.out)
    if latest is not None and not resume:
        raise ValueError(f"{run.out} already holds checkpoints ({latest.name}); pass --resume "
                         "to continue that run or choose another --out")
    tensors, meta = (None, None)
    if resume:
        if latest is None:
            raise CheckpointError(f"--resume: no checkpoint in {run.out}")
        latest, tensors, meta = _read_newest_intact(run.out, run.main)
        if "train" not in meta or "optimizer" not in meta or not any(
                k.startswith("model.") for k in tensors):
            raise CheckpointError(f"--resume: {latest} is not a training checkpoint (no "
                                  "optimizer state or training weights; an inference file "
                                  "written by convert/export?)")
        saved = meta["train"]
        if not isinstance(saved, dict) or not isinstance(meta.get("net"), dict) \
                or "sample_shape" not in meta:
            raise CheckpointError(f"--resume: {latest} has damaged metadata (its training "
                                  "options, network or sample shape are missing)")
        for key in ("data", "preset", "loss", "cond", "batch", "augment", "seed"):
            if getattr(cfg, key) != saved.get(key):
                raise ValueError(f"--resume: {key}={getattr(cfg, key)!r} differs from the run's "
                                 f"{saved.get(key)!r}")
        if cfg.loss == "edm2" and list(cfg.ema_sigma_rels) != saved.get("ema_sigma_rels"):
            raise ValueError(f"--resume: ema_sigma_rels={list(cfg.ema_sigma_rels)} differs from "
                             f"the profiles the run tracks, {saved.get('ema_sigma_rels')}")
    torch.manual_seed(cfg.seed * 1000 + run.rank)
    dataset = _load_data(cfg)
    denoiser, new_meta, pipe = _build(cfg, dataset, run.device)
    if meta is not None:
        _check_same_model(meta, new_meta, latest)
    meta = meta or new_meta
    meta["train"] = dataclasses.asdict(cfg)
    meta["loss"] = new_meta["loss"]  # its noise levels follow the options, as lr does
    if cfg.loss == "edm2":  # power-function EMAs (Sec. 3.1) and Adam's betas of EDM2
        from .edm2 import PowerEMATracker

        ema = PowerEMATracker(denoiser.model, cfg.ema_sigma_rels)
        betas = (0.9, 0.99)
    else:
        ema = EMA(denoiser.model, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
        betas = (0.9, 0.999)
    opt = torch.optim.Adam(denoiser.model.parameters(), lr=cfg.lr, betas=betas, eps=1e-8)
    from .data import BatchStream

    # A data set smaller than one global batch (a user's few photos) cannot drop a partial
    # batch per epoch: its batches run across epoch boundaries instead (each item then appears
    # about batch/len times per batch).
    small = len(dataset) < cfg.batch
    if small and run.main:
        warnings.warn(f"the data set has {len(dataset)} items, fewer than one batch of "
                      f"{cfg.batch}: batches span epochs and repeat items", stacklevel=2)
    stream = BatchStream(dataset, cfg.batch // run.world, seed=cfg.seed, rank=run.rank,
                         world_size=run.world, num_workers=cfg.workers, drop_last=not small,
                         pin_memory=run.device.type == "cuda")
    step, nonfinite_total = 0, 0
    if tensors is not None:
        step, nonfinite_total = _restore_training_state(latest, tensors, meta, run, denoiser,
                                                        ema, opt, stream)
    return dataset, denoiser, meta, pipe, ema, opt, stream, step, nonfinite_total


def _restore_training_state(path: Path, tensors, meta, run: _Run, denoiser, ema, opt,
                            stream) -> tuple[int, int]:
    """Load a checkpoint's training state into the freshly built run; (step, nonfinite_total).

    The file is checked before anything is loaded: the weights and EMA weights match the
    network built from the options (keys, shapes, floating dtypes) and are finite, the step
    counters are non-negative integers. A file that still fails to restore (optimizer, data
    order or RNG state of another shape) is refused as a damaged file, in one line."""
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema_sd = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    for weights in (model_sd, ema_sd):
        check_weights(denoiser.model, weights, path)
        check_finite(weights, path)
    power_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("phema.")}
    if hasattr(ema, "power"):  # an EDM2 run: the tracked profiles after the first (ema.*)
        expected = ema.state_dict()
        wrong = sorted(set(expected) ^ set(power_sd)) or [
            k for k in expected if power_sd[k].shape != expected[k].shape
            or power_sd[k].dtype != expected[k].dtype]
        if wrong:
            raise CheckpointError(f"--resume: {path}: its power-EMA state does not match the "
                                  f"profiles {list(ema.power.sigma_rels)} of this network "
                                  f"(first mismatch: phema.{wrong[0]})")
        check_finite(power_sd, path)
    step, nonfinite_total = meta.get("step"), meta.get("nonfinite_total", 0)
    for name, value in (("step", step), ("nonfinite_total", nonfinite_total)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"--resume: {path}: {name} is {value!r}, not a count")
    rng = {k.split(".")[2]: v for k, v in tensors.items() if k.startswith(f"rng.rank{run.rank}.")}
    if not rng:
        raise CheckpointError(f"{path}: no RNG state for rank {run.rank} (was the run "
                              "started with a different number of processes?)")
    try:
        denoiser.model.load_state_dict(model_sd)
        ema.model.load_state_dict(ema_sd)
        if hasattr(ema, "power"):
            ema.load_state_dict(power_sd)
        _restore_optimizer(opt, {k: v for k, v in tensors.items() if k.startswith("optim.")},
                           meta["optimizer"])
        stream.load_state_dict(meta["stream"])
        _set_rng_state(rng, run.device)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        what = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise CheckpointError(f"--resume: {path} holds a damaged training state ({what})") \
            from exc
    return step, nonfinite_total


def _save(run: _Run, meta, denoiser, ema, opt, stream, step, nonfinite_total,
          scaler) -> Path | None:
    """All ranks gather RNG states; rank 0 writes the checkpoint atomically and prunes old ones."""
    rng = _rng_state(run.device)
    all_rng = [rng]
    if run.world > 1:
        import torch.distributed as dist

        all_rng = [None] * run.world
        dist.all_gather_object(all_rng, {k: v.cpu() for k, v in rng.items()})
    path = None
    if run.main:
        optim_tensors, optim_info = _optimizer_tensors(opt)
        tensors = {f"model.{k}": v for k, v in denoiser.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
        if hasattr(ema, "power"):  # EDM2: the other power-EMA profiles, for an exact resume
            tensors.update({f"phema.{k}": v for k, v in ema.state_dict().items()})
        tensors.update(optim_tensors)
        for r, states in enumerate(all_rng):
            tensors.update({f"rng.rank{r}.{k}": v for k, v in states.items()})
        meta = {**meta, "step": step, "kimg": step * run.cfg.batch / 1000,
                "optimizer": optim_info, "stream": stream.state_dict(),
                "nonfinite_total": nonfinite_total, "world_size": run.world,
                "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None}
        path = save_checkpoint(run.out / f"ckpt-{step:08d}.safetensors", tensors, meta)
        old = sorted(run.out.glob("ckpt-*.safetensors"))[:-max(run.cfg.keep_ckpts, 1)]
        for p in old:
            p.unlink(missing_ok=True)
        _plot_losses(run.out)
    barrier()
    return path


def _plot_losses(out: Path) -> None:
    """loss.png from log.jsonl (skipped quietly without matplotlib). Drawn on a figure of its
    own: matplotlib's backend stays as it was (a notebook's plt.show() keeps working)."""
    from ..optional import MissingDependency, figures

    try:
        plt = figures("the loss curve loss.png")
    except MissingDependency:
        return
    log = out / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    records = [r for r in records if "loss" in r]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([r["kimg"] for r in records], [r["loss"] for r in records], lw=1)
    ax.set_xlabel("kimg")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    losses = [r["loss"] for r in records if r["loss"] > 0]
    if losses and max(losses) < 10 * min(losses):  # within a decade: 1.4, not 1.4x10^0
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from ..io.samples import save_figure

    save_figure(fig, out / "loss.png")


@torch.no_grad()
def _sample_grid(run: _Run, meta, ema, step: int, num: int = 64) -> None:
    """A grid (or toy scatter) of EMA samples with 18 Heun steps, seeds 0..num-1."""
    from tqdm.auto import tqdm  # the notebook widget under Jupyter (with ipywidgets)

    from ..io.samples import save_samples
    from ..noise import SeedNoise
    from ..precond import Denoiser, make_precond
    from ..sampling.reference import sample_edm
    from ..schedules import edm_sigmas

    den = Denoiser(ema.model, make_precond(meta["precond"])).eval()
    shape = tuple(meta["sample_shape"])
    noise = SeedNoise(range(num), shape, device=run.device)
    labels = (torch.arange(num, device=run.device) % den.label_dim) if den.label_dim else None
    sigmas = edm_sigmas(18, max(0.002, den.sigma_min), min(80.0, den.sigma_max))
    with tqdm(total=len(sigmas) - 1, desc=f"sample grid ({num} images)", unit="step",
              leave=False, disable=not run.cfg.progress) as bar:
        x = sample_edm(den, noise.draw(), sigmas, class_labels=labels,
                       callback=lambda _: bar.update())
    mixture = None
    if meta["data"]["spec"].startswith("toy:"):
        from ..nets.toy import MIXTURES

        name = meta["data"]["spec"][4:]
        mixture = MIXTURES[name]() if name in MIXTURES else None
    out = run.out / f"samples-{step:08d}.png"
    save_samples(x.cpu(), out, seeds=range(num), mixture=mixture, title=f"step {step}")


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run (or continue) a training run; returns a summary dict. See TrainConfig for options."""
    from tqdm.auto import tqdm  # the notebook widget under Jupyter (with ipywidgets)

    cfg = with_defaults(cfg)
    _check_config(cfg)
    run = _Run(cfg)
    if run.main:
        for stale in remove_stale_temporaries(run.out):
            warnings.warn(f"removed {stale.name}, an unfinished checkpoint write of a killed "
                          "process", stacklevel=2)
    barrier()
    dataset, denoiser, meta, pipe, ema, opt, stream, step, nonfinite_total = _resume_or_start(
        run, resume)
    if run.main:  # only now: a run refused for its data, preset or --resume leaves no folder
        run.out.mkdir(parents=True, exist_ok=True)
        _trim_log(run.out / "log.jsonl", step)
        if cfg.loss == "edm2":
            from .edm2 import remove_snapshots_after

            remove_snapshots_after(run.out, step * cfg.batch)
        (run.out / "config.json").write_text(json.dumps(meta | {"train": dataclasses.asdict(cfg)},
                                                        indent=2, default=str))
    loss_fn = make_loss(meta["loss"])
    train_den = denoiser
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from ..precond import Denoiser

        ids = [run.device.index] if run.device.type == "cuda" else None
        ddp = DDP(denoiser.model, device_ids=ids)
        train_den = (_ddp_edm2_denoiser(ddp, denoiser) if cfg.loss == "edm2" else
                     Denoiser(ddp, denoiser.precond, label_dim=denoiser.label_dim))
    denoiser.model.train()
    total_steps = math.ceil(cfg.kimg * 1000 / cfg.batch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.amp == "fp16")
    if scaler.is_enabled() and meta.get("grad_scaler"):  # fp16 loss scale: resume bit for bit
        scaler.load_state_dict(meta["grad_scaler"])
    if step >= total_steps:  # a finished run resumed with the same length: nothing to do
        return _summary(run, step, 0, None, nonfinite_total, in_sync=True, log=False)
    start_step = step
    cfg = dataclasses.replace(cfg, batch_gpu=_images_per_pass(run, cfg, meta, denoiser, pipe,
                                                              loss_fn))

    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.loss}", unit="step",
               disable=not (cfg.progress and run.main), dynamic_ncols=True)
    stop = _StopRequest(run.world == 1 and threading.current_thread() is threading.main_thread())
    try:
        step, last_logged, nonfinite_total = _loop(run, cfg, meta, denoiser, train_den, ema,
                                                   opt, stream, pipe, scaler, loss_fn, bar, stop,
                                                   step, total_steps, nonfinite_total)
    finally:
        stop.restore()
        bar.close()
    in_sync = _ranks_in_sync(denoiser.model, run.world)
    return _summary(run, step, step - start_step, last_logged, nonfinite_total, in_sync)


def _ddp_edm2_denoiser(ddp, denoiser):
    """The EDM2 denoiser around a DistributedDataParallel of its network: D through DDP's
    forward; u(sigma) from the wrapped module's head, whose gradients DDP's hooks on the
    parameters all-reduce with the rest."""
    from ..nets.edm2_precond import EDM2Denoiser

    class DDPEDM2Denoiser(EDM2Denoiser):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.model, self.precond = ddp, denoiser.precond
            self.label_dim, self.net_dtype = denoiser.label_dim, denoiser.net_dtype

        def logvar(self, sigma):
            c_noise = self.precond.coefficients(torch.as_tensor(sigma).reshape(-1))[3]
            return self.model.module.logvar(
                c_noise.to(torch.promote_types(c_noise.dtype, torch.float32)))

    return DDPEDM2Denoiser()


def _images_per_pass(run: _Run, cfg: TrainConfig, meta, denoiser, pipe, loss_fn) -> int | None:
    """cfg.batch_gpu, or when it is unset and this rank's batch would not fit in the memory
    available (train_memory), the largest micro-batch that does, with a one-line note. The
    estimate runs the loss on random images under a forked RNG: training's random stream is
    untouched."""
    from .memory import available_bytes, estimate_step_memory, fitting_micro_batch

    per_rank = cfg.batch // run.world
    if cfg.batch_gpu is not None:
        return cfg.batch_gpu
    shape = tuple(meta["sample_shape"])

    def loss_of_images(n):
        images = torch.randn(n, *shape, device=run.device)
        labels = (torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long),
                                              denoiser.label_dim).float().to(run.device)
                  if denoiser.label_dim else None)
        aug = None
        if pipe is not None:
            images, aug = pipe(images)
            aug = aug.to(run.device)
        return loss_fn(denoiser, images, labels, aug).float().mean()

    cuda = [run.device] if run.device.type == "cuda" else []
    weights = copy.deepcopy(denoiser.model.state_dict())  # EDM2 nets renormalise them in place
    with torch.random.fork_rng(devices=cuda):
        estimate = estimate_step_memory(denoiser.model, loss_of_images)
    denoiser.model.load_state_dict(weights)
    denoiser.model.zero_grad(set_to_none=True)
    if cfg.loss == "edm2":  # one EMA copy per tracked profile, where the estimate counts one
        extra = (len(cfg.ema_sigma_rels) - 1) * sum(p.numel() * p.element_size()
                                                    for p in denoiser.model.parameters())
        estimate = dataclasses.replace(estimate, state_bytes=estimate.state_bytes + extra)
    available = available_bytes(run.device)
    try:
        micro = fitting_micro_batch(estimate, per_rank, available)
    except MemoryError as exc:
        raise ValueError(f"{exc}") from None
    if micro is not None and run.main:
        warnings.warn(f"a batch of {per_rank} per device needs about "
                      f"{estimate.step_bytes(per_rank) / 2**30:.1f} GB, "
                      f"{available / 2**30:.1f} GB is available: training {micro} images per "
                      "pass with gradient accumulation (--batch-gpu; the same result)",
                      stacklevel=3)
    return micro


def _loop(run, cfg, meta, denoiser, train_den, ema, opt, stream, pipe, scaler, loss_fn, bar,
          stop, step, total_steps, nonfinite_total):
    """The training steps from ``step`` to ``total_steps``; returns (step, last_logged,
    nonfinite_total), last_logged = (loss, steps): the last log record's loss, the mean over
    its last ``steps`` steps (None when no step ran)."""
    ckpt_every = max(1, round(cfg.ckpt_every_kimg * 1000 / cfg.batch))
    sample_every = round(cfg.sample_every_kimg * 1000 / cfg.batch) if cfg.sample_every_kimg else 0
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    edm2 = cfg.loss == "edm2"
    snapshot_every = (max(1, round(cfg.snapshot_every_kimg * 1000 / cfg.batch))
                      if edm2 and cfg.snapshot_every_kimg else math.inf)  # 0: at the end only
    saved_step = step
    consecutive_bad, smooth, steps_since_log, loss_sum, last_logged = 0, None, 0, 0.0, None
    t_last = time.perf_counter()
    while step < total_steps and stop.signal is None:
        try:
            images, labels = next(stream)
        except Exception:
            if stop.signal is None:
                raise
            break  # Ctrl-C also reached the data loader's workers: stop at the last whole step
        images = images.to(run.device, non_blocking=True)
        labels = labels.to(run.device) if denoiser.label_dim else None
        if cfg.xflip:
            images = _mirror_half(images, cfg.seed, step, run.rank)
        aug_labels = None
        if pipe is not None:
            images, aug_labels = pipe(images)
            aug_labels = aug_labels.to(run.device)
        for group in opt.param_groups:
            group["lr"] = _learning_rate(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss = _accumulate_gradients(loss_fn, train_den, images, labels, aug_labels, scaler,
                                     cfg.batch_gpu, amp_dtype, run.device)
        scaler.unscale_(opt)
        # EDM2 (NVlabs' force_finite): NaN/Inf gradient entries are zeroed and the step is taken;
        # under the fp16 loss scaler, whose own skip lowers the scale, the step is skipped.
        zeroed = edm2 and not scaler.is_enabled() and _zero_nonfinite_gradients(denoiser.model)
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(denoiser.model.parameters(), max_norm)
        finite = bool(torch.isfinite(grad_norm))  # identical on every rank: grads are all-reduced
        if zeroed or not finite:
            consecutive_bad += 1
            nonfinite_total += 1
            if consecutive_bad > cfg.max_nonfinite:
                latest = latest_checkpoint(run.out)
                raise TrainingDiverged(
                    f"{consecutive_bad} consecutive steps had NaN/Inf gradients (step {step}); "
                    "lower --lr or use --grad-clip" + (", or try --amp none" if amp_dtype else "")
                    + (f"; the last good checkpoint is {latest}" if latest else
                       "; no checkpoint was written"))
            if not finite:
                scaler.update()
                continue
        else:
            consecutive_bad = 0
        scaler.step(opt)
        scaler.update()
        step += 1
        ema.update(denoiser.model, (step - 1) * cfg.batch, cfg.batch)  # images before this one
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
                      "img_per_s": ips, "nonfinite_total": nonfinite_total}
            run.log(record)
            last_logged = (record["loss"], steps_since_log)
            bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{ips:.0f}")
            t_last, steps_since_log, loss_sum = now, 0, 0.0
        if edm2 and run.main and (step % snapshot_every == 0 or step == total_steps):
            from .phema_snapshots import save_power_ema_snapshots

            save_power_ema_snapshots(ema.power, run.out, {**meta, "step": step,
                                                          "kimg": step * cfg.batch / 1000},
                                     nimg=step * cfg.batch, state=denoiser.model.state_dict())
        if step % ckpt_every == 0 or step == total_steps:
            _save(run, meta, denoiser, ema, opt, stream, step, nonfinite_total, scaler)
            saved_step = step
        if run.main and ((sample_every and step % sample_every == 0) or step == total_steps):
            _sample_grid(run, meta, ema, step)
    if stop.signal is not None and step < total_steps:  # (a signal after the last step: done)
        if saved_step != step:
            _save(run, meta, denoiser, ema, opt, stream, step, nonfinite_total, scaler)
        raise TrainingInterrupted(step, latest_checkpoint(run.out), stop.signal)
    return step, last_logged, nonfinite_total


def _learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of the step that starts after ``step`` steps: EDM's linear ramp-up
    (App. F.3), or EDM2's ramp-up and inverse-square-root decay (train_edm2)."""
    nimg = step * cfg.batch
    if cfg.loss == "edm2":
        from .edm2 import edm2_learning_rate

        return edm2_learning_rate(nimg, cfg.batch, cfg.lr, cfg.lr_decay_batches,
                                  cfg.lr_rampup_kimg)
    return cfg.lr * min(nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1)


@torch.no_grad()
def _zero_nonfinite_gradients(model: torch.nn.Module) -> bool:
    """Set the NaN/Inf entries of every gradient to 0; True when there were any."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        return False
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    return True


def _mirror_half(images: torch.Tensor, seed: int, step: int, rank: int) -> torch.Tensor:
    """--xflip: each image mirrored left-right with probability 1/2, drawn from a generator of
    its own seeded by (seed, step, rank), so the global RNG (and resume) is unaffected. NVlabs'
    --xflip doubles the data set with mirrored copies; a fair coin per image per step gives
    each image and its mirror the same expected share of training."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    flip = torch.rand(images.shape[0], generator=gen) < 0.5
    flip = flip.to(images.device).reshape(-1, *([1] * (images.ndim - 1)))
    return torch.where(flip, images.flip(-1), images)


def _accumulate_gradients(loss_fn, train_den, images, labels, aug_labels, scaler,
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


def _summary(run: _Run, step, steps_this_run, last_logged, nonfinite_total, in_sync,
             log: bool = True) -> dict:
    """final_loss is the run's last logged loss (log.jsonl and loss.png end on it): the mean
    training loss over the last final_loss_steps steps (an exponential average seeded with the
    first step's loss, as this was before, stayed far above it in short runs). None when this
    call trained no step."""
    final_loss, final_steps = last_logged if last_logged is not None else (None, 0)
    summary = {"steps": step, "steps_this_run": steps_this_run,
               "kimg": step * run.cfg.batch / 1000, "final_loss": final_loss,
               "final_loss_steps": final_steps,
               "nonfinite_total": nonfinite_total, "ranks_in_sync": in_sync,
               "world_size": run.world,
               "checkpoint": str(latest_checkpoint(run.out)) if run.main else None}
    if log:
        run.log({"summary": summary})
    return summary


def _ranks_in_sync(model: torch.nn.Module, world: int) -> bool:
    """True when every rank holds bit-identical weights (a DDP sanity check at the end)."""
    if world == 1:
        return True
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    index = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)
    digest = torch.stack([flat.sum(), (flat * index).sum()])  # on the backend's device
    gathered = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)
