"""Endless, deterministic, resumable, rank-sharded batches: the sampler of each rank's
indices and the stream that fetches them (in this process, or through DataLoader workers)."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = ["BatchStream", "InfiniteSampler", "fetch_batch", "infinite_loader"]


def fetch_batch(ds, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (x (B, ...), labels (B,)) from a dataset, vectorised when it has get_batch."""
    if hasattr(ds, "get_batch"):
        return ds.get_batch(indices)
    return _collate([ds[i] for i in indices.tolist()])


def _collate(items) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([torch.as_tensor(x) for x, _ in items]),
            torch.stack([torch.as_tensor(y, dtype=torch.int64) for _, y in items]))


class InfiniteSampler:
    """Endless per-rank batches of indices; the order is a permutation per epoch from (seed, epoch).

    The global stream is perm(epoch 0) ++ perm(epoch 1) ++ ...; each step takes the next
    batch_size * world_size indices and rank r gets slice [r*B, (r+1)*B), so ranks stay in
    lockstep and see disjoint parts of every epoch. drop_last=True uses only a multiple of the
    global batch per epoch (the dropped tail differs each epoch); drop_last=False lets a batch run
    across the epoch boundary. The state (epoch, position) is the same on every rank.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or size < 1 or seed < 0:
            raise ValueError(f"need size >= 1, batch_size >= 1, seed >= 0 (got {size}, "
                             f"{batch_size}, {seed})")
        if drop_last and size < batch_size * world_size:
            raise ValueError(f"dataset of {size} items is smaller than one global batch "
                             f"({batch_size} x {world_size} ranks); use drop_last=False")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.shuffle = drop_last, shuffle
        self.epoch, self.position = 0, 0
        self._cached = (None, None)

    @property
    def per_epoch(self) -> int:
        """Indices used per epoch (all ranks together)."""
        g = self.batch_size * self.world_size
        return self.size - self.size % g if self.drop_last else self.size

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of all indices, (size,) int64; depends only on (seed, epoch)."""
        if self._cached[0] != epoch:
            if self.shuffle:
                mixed = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
                gen = torch.Generator().manual_seed(int(mixed) >> 1)
                perm = torch.randperm(self.size, generator=gen)
            else:
                perm = torch.arange(self.size)
            self._cached = (epoch, perm)
        return self._cached[1]

    def next_batch(self) -> torch.Tensor:
        """This rank's next batch of indices, (batch_size,) int64."""
        need, chunks = self.batch_size * self.world_size, []
        while need:
            if self.position >= self.per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(need, self.per_epoch - self.position)
            chunks.append(self.permutation(self.epoch)[self.position:self.position + take])
            self.position, need = self.position + take, need - take
        start = self.rank * self.batch_size
        return torch.cat(chunks)[start:start + self.batch_size]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["size"] != self.size:
            raise ValueError(f"sampler state is for seed {state['seed']} and {state['size']} "
                             f"items, not seed {self.seed} and {self.size} items")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _ignore_interrupts(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the main process, which finishes its step and saves
    it (a terminal sends SIGINT to the whole process group); they exit with the main process."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BatchStream:
    """Endless iterator of (x (B, ...), labels (B,)) batches driven by an InfiniteSampler.

    num_workers=0 fetches in this process (vectorised for in-memory data). num_workers>0 wraps
    a DataLoader whose workers decode ahead; state_dict() still describes the batches handed
    out, so a resumed run continues with exactly the batches it would have seen. (Files a worker
    finds unreadable are reported by its warnings but not added to the main dataset's skipped.)

    Neither path touches the global torch RNG: the DataLoader draws its workers' base seed from
    its own generator, seeded from (seed, rank, epoch, position) where it starts, so creating
    it (first batch, or again after load_state_dict) cannot shift the training noise of a
    resumed run. The datasets here draw no random numbers, so workers yield exactly the
    batches num_workers=0 does.
    """

    def __init__(self, dataset, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, num_workers: int = 0,
                 pin_memory: bool = False):
        if num_workers < 0:  # DataLoader's own message does not say which option is wrong
            raise ValueError(f"workers must be >= 0, got num_workers={num_workers}")
        self.dataset = dataset
        self.sampler = InfiniteSampler(len(dataset), batch_size, seed=seed, rank=rank,
                                       world_size=world_size, drop_last=drop_last)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._state = self.sampler.state_dict()  # state after the last batch handed out
        self._pending: deque[dict] = deque()
        self._loader_iter = None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_workers == 0:
            batch = fetch_batch(self.dataset, self.sampler.next_batch())
            self._state = self.sampler.state_dict()
            return batch
        if self._loader_iter is None:
            self._loader_iter = self._start_loader()
        batch = next(self._loader_iter)
        self._state = self._pending.popleft()
        return batch

    def _start_loader(self):
        """An iterator over a DataLoader fed by _index_batches from the sampler's position.

        iter(DataLoader) draws the workers' base seed from `generator`, or from the global torch
        RNG when there is none: that draw would consume the training noise's RNG each time the
        loader is (re)created, so a resumed run would diverge. Its own generator, seeded from
        where the loader starts, keeps the global RNG untouched and the workers' seeds fixed.
        """
        s = self.sampler
        mixed = np.random.SeedSequence([s.seed, s.rank, s.epoch, s.position, 0x10AD])
        gen = torch.Generator().manual_seed(int(mixed.generate_state(1, np.uint64)[0]) >> 1)
        return iter(DataLoader(
            self.dataset, batch_sampler=self._index_batches(), num_workers=self.num_workers,
            collate_fn=_collate, pin_memory=self.pin_memory, generator=gen,
            worker_init_fn=_ignore_interrupts if self.num_workers else None))

    def _index_batches(self):
        """Index lists for the DataLoader; remembers the sampler state after each one."""
        return _index_batches(self.sampler, self._pending)

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()
        self._pending.clear()
        self._loader_iter = None  # restart workers from the restored position


def _index_batches(sampler: InfiniteSampler, pending: deque):
    """The sampler's batches as index lists, appending its state after each to `pending`. A
    function, not a method: a generator holding the BatchStream would make a reference cycle
    (stream -> DataLoader iterator -> generator -> stream), which only the garbage collector
    frees, tearing the queues down before the iterator can stop its workers (5 s each)."""
    while True:
        indices = sampler.next_batch().tolist()
        pending.append(sampler.state_dict())
        yield indices


def infinite_loader(ds, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                    drop_last: bool = True, num_workers: int = 0,
                    pin_memory: bool = False) -> BatchStream:
    """Endless, deterministic, resumable, rank-sharded batches of `ds` (see InfiniteSampler)."""
    return BatchStream(ds, batch_size, seed=seed, rank=rank, world_size=world_size,
                       drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory)
