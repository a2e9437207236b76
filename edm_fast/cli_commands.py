"""The CLI's commands other than ``sample`` (each imports its heavy modules lazily)."""

from __future__ import annotations

__all__ = ["add_commands"]


def add_commands(sub, formatter, add_sampling_options) -> None:
    """Register train, export, convert, bench, compare and serve on the subparsers ``sub``."""
