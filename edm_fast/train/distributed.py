"""Multi-process helpers for ``torchrun``: rank discovery, seed sharding, rank-0-only I/O, and the
training denoiser around DistributedDataParallel."""

from __future__ import annotations

import atexit
import datetime
import gc
import os

import torch
import torch.distributed as dist

__all__ = ["world_info", "init_distributed", "close_distributed", "rank_device", "shard_seeds",
           "is_main", "barrier", "data_parallel"]


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def rank_device(device: torch.device) -> torch.device:
    """This process's device: under torchrun a CUDA job runs rank r on cuda:LOCAL_RANK (one GPU
    per process, as DDP needs; a bare 'cuda' would put every rank on GPU 0); other devices, and
    single-process runs, keep ``device``."""
    _, local_rank, world = world_info()
    if world == 1 or device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU of its own: {count} CUDA device(s) "
                         f"here, so use --nproc_per_node {count} or fewer")
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    rank, local_rank, world = world_info()
    if world > 1 and not dist.is_initialized():
        use_nccl = device is not None and device.type == "cuda" and dist.is_nccl_available()
        if use_nccl:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_nccl else "gloo")
        atexit.register(close_distributed)  # also for train()/sample used as a library
    return rank, world


def close_distributed() -> None:
    """Leave the process group (a no-op when none is joined). Every torchrun job must do this
    before the interpreter shuts down: a gloo group left to the interpreter's teardown can abort
    a finished process with "terminate called without an active exception" (its worker threads
    outlive Python), which turns a successful run's exit status into SIGABRT."""
    if dist.is_available() and dist.is_initialized():
        # A DDP wrapper kept alive by a reference cycle would otherwise be freed during the
        # interpreter's finalisation, with gloo work still holding its tensors: collect it now.
        gc.collect()
        if dist.get_backend() == "gloo":
            # Every rank first finishes its collectives and I/O: a rank that tears down its gloo
            # connections while a peer still uses the group can abort that peer at exit. The
            # wait is bounded, so a rank whose peer crashed or was interrupted still leaves.
            try:
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            except RuntimeError:
                pass
        dist.destroy_process_group()


def shard_seeds(seeds: list[int]) -> tuple[list[int], int, int]:
    """This rank's seeds (seeds[rank::world]); images depend on seeds only, so any split works."""
    rank, world = init_distributed()
    return seeds[rank::world], rank, world


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def data_parallel(denoiser, device: torch.device, edm2: bool):
    """The denoiser that training calls under torchrun: ``denoiser``'s network wrapped in
    DistributedDataParallel (gradients all-reduced), in the same preconditioning."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..precond import Denoiser

    ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(denoiser.model, device_ids=ids)
    return (_ddp_edm2_denoiser(ddp, denoiser) if edm2 else
            Denoiser(ddp, denoiser.precond, label_dim=denoiser.label_dim))


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
