"""The start of a training run: the data, the network and its metadata built from the options,
the EMA, the optimizer and the batch stream, and, with ``--resume``, the state of the newest
intact checkpoint after checking that the options rebuild the same run."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from ..io.checkpoints import CheckpointError, build_denoiser, latest_checkpoint, net_spec
from .batch_stream import BatchStream
from .checkpointing import read_newest_intact, restore_training_state
from .config import LOSS_PRECOND, TrainConfig, loss_config
from .distributed import is_main
from .ema import EMA
from .run_folder import Run
from .state import TrainState

__all__ = ["build_network", "check_same_model", "load_training_data", "start_or_resume"]


def start_or_resume(run: Run, resume: bool) -> TrainState:
    """The run's state at its start: built from the options, then, when resuming, loaded from
    the newest intact checkpoint (step and counters included)."""
    cfg = run.cfg
    latest = latest_checkpoint(run.out)
    if latest is not None and not resume:
        raise ValueError(f"{run.out} already holds checkpoints ({latest.name}); pass --resume "
                         "to continue that run or choose another --out")
    tensors, meta = (None, None)
    if resume:
        if latest is None:
            raise CheckpointError(f"--resume: no checkpoint in {run.out}")
        latest, tensors, meta = read_newest_intact(run.out, run.main)
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
    dataset = load_training_data(cfg)
    denoiser, new_meta, pipe = build_network(cfg, dataset, run.device)
    if meta is not None:
        check_same_model(meta, new_meta, latest)
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
    state = TrainState(meta=meta, dataset=dataset, denoiser=denoiser, augment=pipe, ema=ema,
                       optimizer=opt, stream=stream)
    if tensors is not None:
        restore_training_state(latest, tensors, run, state)
    return state


def load_training_data(cfg: TrainConfig):
    """The data set that ``cfg.data`` names, at the run's resolution and channels."""
    from .data import load_dataset

    kwargs = {"progress": cfg.progress and is_main(), "max_pixels": cfg.max_pixels}
    # only the options given: load_dataset refuses them for toy data (2-D points have no size)
    kwargs |= {name: value for name, value in (("resolution", cfg.resolution),
                                               ("channels", cfg.channels)) if value is not None}
    return load_dataset(cfg.data, **kwargs)


def build_network(cfg: TrainConfig, dataset, device):
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
        "loss": loss_config(cfg),
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


def check_same_model(saved: dict, new: dict, path: Path) -> None:
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

