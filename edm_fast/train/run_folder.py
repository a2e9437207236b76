"""The run folder and the process that writes it: device, rank and world size of this
process (torchrun), the JSONL log (rank 0 only), and the trimming of a log to a resumed step."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from ..device import resolve_device
from .config import TrainConfig
from .distributed import init_distributed, is_main, rank_device

__all__ = ["Run", "trim_log"]


class Run:
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


def trim_log(log: Path, step: int) -> None:
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
