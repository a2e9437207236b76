"""Per-seed noise: a sample's noise depends only on its seed, never on its batch or device.

Each seed owns one CPU ``torch.Generator`` (Mersenne Twister, seeded with the seed itself).
Its stream is consumed in a fixed order: first the initial latent, then one draw for every
sampler step that injects noise (EDM Alg. 2 l.5, only steps with gamma_i > 0). Draws are always
made in float32 on the CPU and then cast and moved, so the same seed gives the same noise on
CPU, CUDA or MPS and in float32 or float64 (the float64 reference consumes exactly the noise the
float32 fast paths consume). The C++ sampler reproduces the same streams (csrc/).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["SeedNoise", "parse_seeds"]


class SeedNoise:
    """Independent Gaussian noise streams, one per seed.

    Args:
        seeds: one non-negative integer per sample.
        shape: the shape of one sample, e.g. (C, H, W) or (D,).
        device, dtype: where and in which dtype the draws are returned.
    """

    def __init__(self, seeds: Iterable[int], shape: Sequence[int], *, device=None,
                 dtype: torch.dtype = torch.float32):
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("SeedNoise needs at least one seed")
        if any(s < 0 or s >= 2**64 for s in self.seeds):
            raise ValueError("seeds must be integers in [0, 2**64)")
        self.shape = tuple(int(n) for n in shape)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self._generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def draw(self) -> torch.Tensor:
        """The next draw of every stream, (N, *shape)."""
        rows = [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self._generators]
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)

    def draw_many(self, count: int) -> torch.Tensor:
        """``count`` successive draws of every stream, (count, N, *shape), in draw order."""
        if count == 0:
            return torch.empty((0, len(self), *self.shape), device=self.device, dtype=self.dtype)
        return torch.stack([self.draw() for _ in range(count)])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Next draw shaped like x; the ``randn`` callable the samplers take."""
        if tuple(x.shape) != (len(self), *self.shape):
            raise ValueError(f"randn_like: expected shape {(len(self), *self.shape)}, "
                             f"got {tuple(x.shape)}")
        return self.draw().to(device=x.device, dtype=x.dtype)


MAX_SEEDS = 100_000_000  # per call; the C++ tool has the same limit (kMaxSeeds)
SEED_LIMIT = 2**64  # torch.Generator().manual_seed takes seeds in [0, 2^64)


def parse_seeds(spec: str | int | Iterable[int]) -> list[int]:
    """Parse '0-63', '1,5,9', '0-3,10' (inclusive ranges) or an int / list into a list of ints,
    each in [0, 2^64)."""
    if isinstance(spec, int) or (hasattr(spec, "__index__") and getattr(spec, "ndim", 1) == 0):
        spec = [spec]  # one seed: an int, a numpy integer, a 0-d tensor; a bool is refused below
    if not isinstance(spec, str):
        if not hasattr(spec, "__iter__"):
            raise ValueError(f"seeds must be an integer, integers or a string like '0-63', "
                             f"got {spec!r}")
        seeds = []
        for s in spec:
            value = s.item() if hasattr(s, "item") else s  # numpy / torch scalars
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"seeds must be integers, got {s!r}")
            seeds.append(value)
        _check_seed_range(seeds, spec)
        return seeds
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = b = int(lo)
            if sep:
                b = int(hi)
        except ValueError:
            raise ValueError(f"bad seed list {spec!r}: use e.g. '0-63' or '1,5,9'") from None
        if b < a:
            raise ValueError(f"bad seed list {spec!r}: the range {part} decreases")
        if b - a + 1 > MAX_SEEDS - len(seeds):
            raise ValueError(f"bad seed list {spec!r}: more than {MAX_SEEDS:,} seeds; split the "
                             "job")
        _check_seed_range((a, b), spec)
        seeds.extend(range(a, b + 1))
    if not seeds:
        raise ValueError(f"bad seed list {spec!r}: no seeds")
    return seeds


def _check_seed_range(seeds, spec) -> None:
    if seeds and not (0 <= min(seeds) and max(seeds) < SEED_LIMIT):
        raise ValueError(f"bad seed list {spec!r}: seeds must lie in [0, 2^64)")
