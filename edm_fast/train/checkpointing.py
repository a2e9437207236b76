"""Training checkpoints: writing one (atomic safetensors, every rank's RNG state, the optimizer,
the data position and the fp16 loss scale), finding the newest that reads, and restoring a run's
state from it after checking it, so that a resumed run continues bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..io.checkpoints import (
    CheckpointError, UnreadableCheckpointError, check_finite, check_weights, list_checkpoints,
    read_checkpoint, save_checkpoint,
)
from .distributed import barrier
from .reporting import plot_losses
from .run_folder import Run
from .state import TrainState

__all__ = ["read_newest_intact", "restore_training_state", "save_training_checkpoint"]


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


def read_newest_intact(folder: Path, main: bool = True):
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


def restore_training_state(path: Path, tensors: dict, run: Run, state: TrainState) -> None:
    """Load a checkpoint's training state (``tensors`` and ``state.meta``, read from ``path``)
    into the freshly built ``state``: weights, EMA, optimizer, data position, RNG, counters.

    The file is checked before anything is loaded: the weights and EMA weights match the
    network built from the options (keys, shapes, floating dtypes) and are finite, the step
    counters are non-negative integers. A file that still fails to restore (optimizer, data
    order or RNG state of another shape) is refused as a damaged file, in one line."""
    meta, denoiser, ema = state.meta, state.denoiser, state.ema
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
        _restore_optimizer(state.optimizer,
                           {k: v for k, v in tensors.items() if k.startswith("optim.")},
                           meta["optimizer"])
        state.stream.load_state_dict(meta["stream"])
        _set_rng_state(rng, run.device)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        what = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise CheckpointError(f"--resume: {path} holds a damaged training state ({what})") \
            from exc
    state.step, state.nonfinite_total = step, nonfinite_total


def save_training_checkpoint(run: Run, state: TrainState) -> Path | None:
    """All ranks gather RNG states; rank 0 writes ``state`` at its step as a checkpoint,
    atomically, prunes old ones and redraws loss.png."""
    rng = _rng_state(run.device)
    all_rng = [rng]
    if run.world > 1:
        import torch.distributed as dist

        all_rng = [None] * run.world
        dist.all_gather_object(all_rng, {k: v.cpu() for k, v in rng.items()})
    path = None
    if run.main:
        meta, ema, step, scaler = state.meta, state.ema, state.step, state.scaler
        optim_tensors, optim_info = _optimizer_tensors(state.optimizer)
        tensors = {f"model.{k}": v for k, v in state.denoiser.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
        if hasattr(ema, "power"):  # EDM2: the other power-EMA profiles, for an exact resume
            tensors.update({f"phema.{k}": v for k, v in ema.state_dict().items()})
        tensors.update(optim_tensors)
        for r, states in enumerate(all_rng):
            tensors.update({f"rng.rank{r}.{k}": v for k, v in states.items()})
        meta = {**meta, "step": step, "kimg": step * run.cfg.batch / 1000,
                "optimizer": optim_info, "stream": state.stream.state_dict(),
                "nonfinite_total": state.nonfinite_total, "world_size": run.world,
                "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None}
        path = save_checkpoint(run.out / f"ckpt-{step:08d}.safetensors", tensors, meta)
        old = sorted(run.out.glob("ckpt-*.safetensors"))[:-max(run.cfg.keep_ckpts, 1)]
        for p in old:
            p.unlink(missing_ok=True)
        plot_losses(run.out)
    barrier()
    return path

