"""Power-EMA snapshot files: what a training run stores for post-hoc EMA, and the
reconstruction of new EMA profiles from them (``edm-fast phema``; the math is edm_fast.train.phema).

Two kinds of snapshot folders are read:
    edm-fast    ``phema-<nimg>-<sigma_rel>.safetensors`` (nimg: training images seen, 10 digits,
                exact even for the short runs of CPU work): inference checkpoints (``ema.*`` and the
                config metadata) whose metadata ``phema`` holds {"nimg": images seen,
                "sigma_rel": profile}; ``save_snapshot`` writes them.
    NVlabs      ``<prefix>-<kimg>-<sigma_rel>.pkl`` (EDM2's raw snapshots, e.g.
                ``edm2-img512-xs-2147483-0.050.pkl``), read by the restricted unpickler of
                edm_fast.io.official_edm2 without running their code; the time is the kimg of the
                name rounded as NVlabs' reconstruct_phema.py does (a multiple of 1024 images).
The reconstructions are written as edm-fast inference checkpoints with the same ``phema``
metadata (plus the number of snapshots used), which ``edm-fast sample --ckpt`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..io.checkpoints import CheckpointError, read_inference_weights, save_checkpoint
from ..errors import EdmFastError
from .phema import PowerEMA, Snapshot, reconstruct

__all__ = ["SnapshotFile", "snapshot_name", "save_snapshot", "save_power_ema_snapshots",
           "list_snapshots",
           "reconstruct_snapshots", "kimg_to_nimg"]

_EDM_FAST_RE = re.compile(r"^phema-(\d+)-(\d+\.\d+)\.safetensors$")
_NVLABS_RE = re.compile(r"^(.*)-(\d+)-(\d+\.\d+)\.pkl$")


@dataclasses.dataclass(frozen=True)
class SnapshotFile:
    path: Path
    nimg: int
    sigma_rel: float
    official: bool  # an NVlabs pickle


def snapshot_name(nimg: int, sigma_rel: float) -> str:
    return f"phema-{nimg:010d}-{sigma_rel:.3f}.safetensors"


def kimg_to_nimg(kimg: int) -> int:
    """The image count of NVlabs' snapshot names (kimg = nimg // 1000, nimg a multiple of 1024,
    as their training loop saves)."""
    return (kimg * 1000 + 999) // 1024 * 1024


def save_snapshot(folder, tensors: dict[str, torch.Tensor], meta: dict, *, nimg: int,
                  sigma_rel: float) -> Path:
    """Write one power-EMA snapshot (the averaged network ``tensors``, without prefix) into
    ``folder``, atomically; ``meta`` is the run's checkpoint metadata (net, precond, ...)."""
    meta = {k: v for k, v in meta.items() if k not in ("optimizer", "stream")}
    meta["phema"] = {"nimg": int(nimg), "sigma_rel": float(sigma_rel)}
    path = Path(folder) / snapshot_name(nimg, sigma_rel)
    return save_checkpoint(path, {f"ema.{k}": v for k, v in tensors.items()}, meta)


def save_power_ema_snapshots(ema: PowerEMA, folder, meta: dict, *, nimg: int,
                             state: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write every profile of ``ema`` at time ``nimg``, one snapshot per sigma_rel. ``state``,
    the network's state dict, supplies what is not averaged (persistent buffers such as EDM2's
    Fourier frequencies); its entries must be the ones the averages do not replace."""
    return [save_snapshot(folder, {**(state or {}), **average}, meta, nimg=nimg,
                          sigma_rel=sigma_rel)
            for sigma_rel, average in ema.averages.items()]


def _edm_fast_phema_meta(path: Path) -> tuple[int, float]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("edm_fast")
        info = json.loads(raw)["phema"]
        nimg, sigma_rel = info["nimg"], info["sigma_rel"]
    except Exception as exc:  # torn file, no metadata, not a snapshot
        raise CheckpointError(f"{path} is not a power-EMA snapshot (no readable 'phema' "
                              f"metadata): {type(exc).__name__}: {exc}"[:400]) from exc
    if isinstance(nimg, bool) or not isinstance(nimg, int) or nimg <= 0 \
            or isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise CheckpointError(f"{path}: bad 'phema' metadata {info!r:.200}")
    return nimg, float(sigma_rel)


def list_snapshots(folder, *, sigma_rels: Sequence[float] | None = None) -> list[SnapshotFile]:
    """The snapshots in ``folder`` (one kind only), sorted by (time, sigma_rel); only those
    with a sigma_rel in ``sigma_rels`` (to 1e-6) when given."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no snapshot folder at {folder} (phema reads a run folder "
                                "holding phema-*.safetensors or NVlabs' *-KIMG-SIGMA.pkl)")
    found = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if _EDM_FAST_RE.match(path.name):
            nimg, sigma_rel = _edm_fast_phema_meta(path)
            found.append(SnapshotFile(path, nimg, sigma_rel, official=False))
        elif m := _NVLABS_RE.match(path.name):
            found.append(SnapshotFile(path, kimg_to_nimg(int(m.group(2))), float(m.group(3)),
                                      official=True))
    if len({s.official for s in found}) > 1:
        raise EdmFastError(f"{folder} holds both edm-fast and NVlabs snapshots; keep one kind "
                           "per folder")
    if sigma_rels is not None:
        found = [s for s in found if any(abs(s.sigma_rel - r) < 1e-6 for r in sigma_rels)]
    if not found:
        raise EdmFastError(f"no power-EMA snapshots in {folder} (phema-NIMG-SIGMA.safetensors "
                           "or NVlabs' PREFIX-KIMG-SIGMA.pkl)"
                           + (f" with sigma_rel in {list(sigma_rels)}" if sigma_rels else ""))
    return sorted(found, key=lambda s: (s.nimg, s.sigma_rel))


def _load(snapshot: SnapshotFile) -> tuple[dict[str, torch.Tensor], dict]:
    """(network tensors, config metadata) of a snapshot, checked before use."""
    if snapshot.official:
        from ..io.official import read_official_edm2

        return read_official_edm2(snapshot.path)
    return read_inference_weights(snapshot.path, ema=True)


def reconstruct_snapshots(folder, sigma_rels: Sequence[float], out, *,
                          nimg: int | None = None, in_sigma_rels: Sequence[float] | None = None,
                          dtype: torch.dtype | None = None) -> list[Path]:
    """Reconstruct the EMAs of ``sigma_rels`` at time ``nimg`` (default: the latest snapshot's;
    otherwise it must be a snapshot time) from the snapshots in ``folder`` and write them:
    ``out`` a folder (``phema-<nimg>-<sigma_rel>.safetensors`` in it) or, for a single
    sigma_rel, a ``.safetensors`` file. Snapshots are read one at a time. Returns the paths."""
    files = list_snapshots(folder, sigma_rels=in_sigma_rels)
    times = sorted({s.nimg for s in files})
    if nimg is None:
        nimg = times[-1]
    elif nimg not in times:
        raise EdmFastError(f"no snapshot at {nimg} images (kimg {nimg // 1000}); snapshot kimg: "
                           f"{', '.join(str(t // 1000) for t in times[-8:])}")
    out = Path(out)
    single = out.suffix == ".safetensors"
    if single and len(sigma_rels) != 1:
        raise EdmFastError(f"--out {out} is one file but {len(sigma_rels)} sigma_rel values are "
                           "asked for; give a folder")
    if out.suffix and not single:
        raise EdmFastError(f"--out {out}: give a folder or a .safetensors file")
    target = out.parent if single else out
    if target.exists() and target.resolve() == Path(folder).resolve():
        raise EdmFastError(f"--out {out} is in the snapshot folder; write the reconstructions "
                           "elsewhere (they would be read as tracked snapshots next time)")
    metas: dict[Path, dict] = {}

    def loader(snapshot: SnapshotFile):
        def load():
            tensors, meta = _load(snapshot)
            first = next(iter(metas.values()), None)
            if first is not None and first.get("net") != meta.get("net"):
                raise EdmFastError(f"{snapshot.path.name} holds another network than "
                                   f"{next(iter(metas)).name}")
            metas[snapshot.path] = meta
            return tensors
        return load

    snaps = [Snapshot(s.nimg, s.sigma_rel, loader(s)) for s in files]
    averaged = reconstruct(snaps, sigma_rels, t=nimg)
    used = [s for s in files if s.nimg <= nimg]
    meta = metas[used[-1].path]  # the config of the latest snapshot used
    meta = {k: v for k, v in meta.items() if k not in ("optimizer", "stream", "phema")}
    written = []
    for sigma_rel, tensors in averaged.items():
        path = out if single else out / snapshot_name(nimg, sigma_rel)
        keep = {f"ema.{k}": (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                for k, v in tensors.items()}
        info = {"nimg": int(nimg), "sigma_rel": float(sigma_rel), "reconstructed_from": len(used),
                "source": "nvlabs" if used[0].official else "edm-fast"}
        written.append(save_checkpoint(path, keep, {**meta, "phema": info}))
    return written
