"""How much memory a training step needs, and the micro-batch that fits what the machine has.

A step's memory is (a) the model's state: weights, gradients, Adam's two moments, the EMA copy
and the temporaries of Adam's multi-tensor update, six times the parameter bytes, plus a fixed
working set of the libraries, and (b) the activations autograd keeps for the backward
pass, which grow linearly with the images in one forward pass. (b) is measured, not modelled:
one forward pass of the loss on two images counts the bytes of every tensor autograd saves
(``torch.autograd.graph.saved_tensors_hooks``, each storage once), so every architecture,
resolution, dropout and augmentation setting is covered as it runs. ``images_per_pass`` picks
a training run's micro-batch (--batch-gpu) from them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch

__all__ = ["MemoryEstimate", "available_bytes", "estimate_step_memory", "fitting_micro_batch",
           "images_per_pass"]

STATE_COPIES = 6  # weights, gradients, Adam's m and v, EMA weights, Adam's foreach temporaries
RUNTIME_BYTES = 200 * 2**20  # allocator and library working memory of a training step (CPU)
HEADROOM = 0.8  # plan to use at most this share of the memory available at the start
# The backward pass holds, beside the saved activations, the gradients flowing back through the
# layer being differentiated and allocator slack. The three constants were fitted to measured
# peaks on the CPU (bench/bench_train_memory.py; its table in bench/RESULTS.md, "training memory
# estimate", gives the ratio for each case).
BACKWARD_FACTOR = 1.3


@dataclass(frozen=True)
class MemoryEstimate:
    state_bytes: int  # model, gradients, optimizer and EMA state, library working set
    per_image_bytes: int  # saved activations per image of one forward pass

    def step_bytes(self, images_per_pass: int) -> int:
        return int(self.state_bytes
                   + BACKWARD_FACTOR * self.per_image_bytes * images_per_pass)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())


def estimate_step_memory(model: torch.nn.Module, loss_of_images) -> MemoryEstimate:
    """``loss_of_images(n)`` runs the training loss forward on n images (with grad)."""
    state = RUNTIME_BYTES + STATE_COPIES * sum(p.numel() * p.element_size()
                                               for p in model.parameters())
    one, two = (_saved_bytes(lambda n=n: loss_of_images(n)) for n in (1, 2))
    # two images minus one: the per-image part, without buffers saved once per pass
    return MemoryEstimate(state_bytes=state, per_image_bytes=max(two - one, 1))


def available_bytes(device: torch.device) -> int | None:
    """Free memory for training on ``device``: CUDA's free memory, or on the CPU the kernel's
    MemAvailable (Linux), else None (unknown: no automatic micro-batch)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fitting_micro_batch(estimate: MemoryEstimate, images_per_rank: int,
                        available: int | None) -> int | None:
    """The largest number of images per forward pass, at most ``images_per_rank``, whose step
    fits in HEADROOM x ``available``; None when the whole batch fits or memory is unknown.
    Raises MemoryError (with the figures) when not even one image fits."""
    if available is None:
        return None
    budget = HEADROOM * available
    if estimate.step_bytes(images_per_rank) <= budget:
        return None
    room = budget - estimate.state_bytes
    fits = int(room // (BACKWARD_FACTOR * estimate.per_image_bytes)) if room > 0 else 0
    if fits < 1:
        raise MemoryError(f"training needs about {_gb(estimate.step_bytes(1))} even one image "
                          f"at a time, and {_gb(available)} is available: use a smaller "
                          "--preset or --resolution")
    return min(fits, images_per_rank)


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def images_per_pass(run, cfg, state) -> int | None:
    """cfg.batch_gpu, or when it is unset and this rank's batch would not fit in the memory
    available, the largest micro-batch that does, with a one-line note. ``run``: the process
    (run_folder.Run); ``state``: the run's TrainState, its loss_fn set. The estimate runs the
    loss on random images under a forked RNG: training's random stream is untouched."""
    per_rank = cfg.batch // run.world
    if cfg.batch_gpu is not None:
        return cfg.batch_gpu
    shape = tuple(state.meta["sample_shape"])
    denoiser, pipe, loss_fn = state.denoiser, state.augment, state.loss_fn

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
