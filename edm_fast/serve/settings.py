"""What an operator sets: the app's limits and defaults (ServeSettings) and uvicorn's
(UvicornLimits), checked by pydantic; ``checked`` turns a refusal into one line for the CLI."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError
from pydantic.dataclasses import dataclass

from ..solvers import SOLVERS
from .limits import DEFAULT_MAX_COST, MAX_GUIDANCE, MAX_STEPS

# The batch worker drops the GIL in each network call and needs it back for the step math while
# the event loop's thread answers requests; with Python's default switch interval (5 ms) each
# hand-back can wait that long, once per evaluation. A serving process (server.run, a Ray
# replica) runs with this interval instead.
SWITCH_INTERVAL_S = 0.0005

__all__ = ["DEFAULT_MAX_COST", "MAX_GUIDANCE", "MAX_STEPS", "ServeSettings", "UvicornLimits",
           "checked"]


def bounded(default, lo, hi):
    """A setting in [lo, hi] (NaN and inf refused); its description names the range."""
    return Field(default, ge=lo, le=hi, allow_inf_nan=False, description=f"in [{lo}, {hi}]")


@dataclass(frozen=True)
class ServeSettings:
    """The app's limits and defaults. A value out of range is a ValidationError (a ValueError)
    naming it; numbers given as strings (``serve run`` args) are read."""

    max_batch: int = bounded(64, 1, 4096)
    max_wait_ms: float = bounded(10.0, 0, 60_000)
    max_seeds: int = bounded(256, 1, 10**6)
    max_queue: int = bounded(4096, 1, 10**7)
    max_cost: int = bounded(DEFAULT_MAX_COST, 1, 10**12)  # seeds x evaluations, x2 if guided
    max_batch_cost: int | None = bounded(None, 1, 10**12)  # None: max_batch x a default seed's
    request_timeout_s: float = bounded(60.0, 1e-3, 86_400)
    body_timeout_s: float = bounded(10.0, 1e-3, 3600)
    max_body_bytes: int = bounded(65536, 64, 2**30)
    max_headers: int = bounded(100, 8, 10**4)
    max_header_bytes: int = bounded(16384, 1024, 2**20)  # request line + headers
    default_steps: int = bounded(18, 1, MAX_STEPS)
    default_solver: Literal[tuple(SOLVERS)] = "heun"
    default_guidance: float | None = bounded(None, -MAX_GUIDANCE, MAX_GUIDANCE)

    def __post_init__(self):
        if self.max_seeds > self.max_queue:
            raise ValueError(f"max_seeds ({self.max_seeds}) is over max_queue "
                             f"({self.max_queue}): such a request could never be queued")


@dataclass(frozen=True)
class UvicornLimits:
    """uvicorn's limits (``server.make_server``); graceful_timeout_s None: the request
    deadline + the longest batch + 5 s."""

    limit_concurrency: int = bounded(512, 1, 10**6)
    keep_alive_s: float = bounded(5.0, 1e-3, 86_400)
    graceful_timeout_s: float | None = bounded(None, 1e-3, 86_400)


def checked(cls, **kwargs):
    """``cls(**kwargs)``; a ValidationError as a one-line ValueError naming the first setting
    out of range and its range."""
    try:
        return cls(**kwargs)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
    if not error["loc"]:  # a check across settings (__post_init__)
        raise ValueError(str(error["ctx"]["error"]))
    name = error["loc"][0]
    field = cls.__pydantic_fields__[name]
    kind = "a finite number " if "float" in str(field.annotation) else ""
    raise ValueError(f"{name} must be {kind}{field.description}, got {error['input']!r}")
