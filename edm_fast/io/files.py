"""The one way edm-fast writes a file: atomically, so that a crash or Ctrl-C never leaves a
partial file under the final name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # the mode open() gives a new file here (0644 with umask 022)


def atomic_write(path, write: Callable[[Path], object], *, durable: bool = False) -> Path:
    """``write(tmp)`` to a temporary file beside ``path`` (same suffix, so writers that go by
    the suffix still work), then rename it to ``path``. Creates missing folders; gives the file
    the mode of any other new file (some writers create 0600 files); ``durable`` also flushes
    it to disk before the rename (checkpoints). The temporary file never outlives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        try:
            write(tmp)
        except Exception as exc:  # safetensors reports a full disk as its own error type
            if type(exc).__name__ != "SafetensorError":
                raise
            raise OSError(f"could not write {path}: {exc}") from exc
        os.chmod(tmp, _FILE_MODE)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
