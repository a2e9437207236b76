"""Per-seed noise: a sample's noise depends only on its seed, never on its batch or device.

Each seed owns one CPU ``torch.Generator`` (Mersenne Twister, seeded with the seed itself).
Its stream is consumed in a fixed order: first the initial latent, then one draw for every
sampler step that injects noise (EDM Alg. 2 l.5, only steps with gamma_i > 0). Draws are always
made in float32 on the CPU and then cast and moved, so the same seed gives the same noise on
CPU, CUDA or MPS and in float32 or float64 (the float64 reference consumes exactly the noise the
float32 fast paths consume). The C++ sampler reproduces the same streams (csrc/).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from .errors import EdmFastError

__all__ = ["SeedNoise", "parse_seeds", "SeedListError", "MAX_SEEDS", "SEED_LIMIT"]


class SeedNoise:
    """Independent Gaussian noise streams, one per seed.

    Args:
        seeds: one integer in [0, 2^64) per sample, or a string such as '0-63' (checked by
            ``parse_seeds``).
        shape: the shape of one sample, e.g. (C, H, W) or (D,).
        device, dtype: where and in which dtype the draws are returned.
    """

    def __init__(self, seeds: Iterable[int], shape: Sequence[int], *, device=None,
                 dtype: torch.dtype = torch.float32):
        self.seeds = parse_seeds(seeds)
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


class SeedListError(EdmFastError):
    """A seed list that ``parse_seeds`` refuses. ``problem`` says what is wrong, so that a caller
    can answer each in its own words (the HTTP server's status codes): "syntax" (a string that is
    not a list of seeds and ranges), "empty", "range" (a seed outside [0, 2^64)), "count" (more
    than the caller's ``max_seeds``; ``limit`` holds it) or "repeat" (``distinct=True``)."""

    def __init__(self, message: str, problem: str, limit: int | None = None):
        super().__init__(message)
        self.problem, self.limit = problem, limit


def parse_seeds(spec: str | int | Iterable[int], *, max_seeds: int = MAX_SEEDS,
                distinct: bool = False) -> list[int]:
    """The one check of a seed list: '0-63', '1,5,9', '0-3,10' (inclusive ranges) or an int (a
    numpy integer, a 0-d tensor) or an iterable of ints as a non-empty list of ints, each in
    [0, 2^64), at most ``max_seeds`` of them (a string is counted before it is expanded), each
    at most once with ``distinct``. Raises ``SeedListError`` (a ValueError) naming the problem."""
    if isinstance(spec, str):
        seeds = _expand_seed_string(spec, max_seeds)
    else:
        seeds = _seed_integers(spec, max_seeds)
    if not seeds:
        raise SeedListError("seeds is empty: pass at least one seed" if not isinstance(spec, str)
                            else f"bad seed list {spec!r}: no seeds", "empty")
    if not (0 <= min(seeds) and max(seeds) < SEED_LIMIT):
        raise SeedListError(f"bad seed list {_shown(spec)}: seeds must lie in [0, 2^64)", "range")
    if len(seeds) > max_seeds:
        raise _too_many(spec, max_seeds)
    if distinct and len(set(seeds)) != len(seeds):  # one file per seed: a repeat would overwrite
        twice = sorted(s for s, n in Counter(seeds).items() if n > 1)[:5]
        raise SeedListError(f"seed list {_shown(spec)} lists seed(s) "
                            f"{', '.join(map(str, twice))} more than once", "repeat")
    return seeds


def _shown(spec) -> str:
    text = repr(spec)
    return text if len(text) <= 80 else text[:77] + "..."


def _too_many(spec, max_seeds: int) -> SeedListError:
    return SeedListError(f"bad seed list {_shown(spec)}: more than {max_seeds:,} seeds; split the "
                         "job", "count", limit=max_seeds)


def _seed_integers(spec, max_seeds: int) -> list[int]:
    """An int or an iterable of ints as a list; bools, floats and other types refused."""
    if isinstance(spec, int) or (hasattr(spec, "__index__") and getattr(spec, "ndim", 1) == 0):
        spec = [spec]  # one seed: an int, a numpy integer, a 0-d tensor; a bool is refused below
    if not hasattr(spec, "__iter__"):
        raise SeedListError(f"seeds must be an integer, integers or a string like '0-63', "
                            f"got {spec!r}", "syntax")
    if hasattr(spec, "__len__") and len(spec) > max_seeds:
        raise _too_many(spec, max_seeds)  # before converting a huge range or array
    seeds = []
    for s in spec:
        value = s.item() if hasattr(s, "item") else s  # numpy / torch scalars
        if isinstance(value, bool) or not isinstance(value, int):
            raise SeedListError(f"seeds must be integers, got {s!r}", "syntax")
        seeds.append(value)
        if len(seeds) > max_seeds:  # an endless or huge iterator
            raise _too_many(spec, max_seeds)
    return seeds


def _expand_seed_string(spec: str, max_seeds: int) -> list[int]:
    """'0-3,10' -> [0, 1, 2, 3, 10]; the count of every well-formed part is checked first, so
    that a huge range is refused as such (and never allocated) whatever else the list holds."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    total = 0
    for part in parts:
        lo, sep, hi = part.partition("-")
        with contextlib.suppress(ValueError):  # malformed: refused below
            total += abs(int(hi) - int(lo)) + 1 if sep else int(bool(lo))
    if total > max_seeds:
        raise _too_many(spec, max_seeds)
    seeds: list[int] = []
    for part in parts:
        lo, sep, hi = part.partition("-")
        try:
            a = b = int(lo)
            if sep:
                b = int(hi)
        except ValueError:
            raise SeedListError(f"bad seed list {_shown(spec)}: use e.g. '0-63' or '1,5,9'",
                                "syntax") from None
        if b < a:
            raise SeedListError(f"bad seed list {_shown(spec)}: the range {part} decreases",
                                "syntax")
        seeds.extend(range(a, b + 1))
    return seeds
