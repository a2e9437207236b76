"""Which exported programs may be loaded: the AOTInductor (.pt2) and TorchScript (.ts) files that
edm-fast itself wrote on this machine, or files the user vouches for.

Loading such a file runs the code inside it (compiled kernels, TorchScript bytecode), so the rule
that a file never runs code cannot hold for them. Every export edm-fast writes records the
SHA-256 of its bytes in a per-user store; a loader checks the digest before it opens the file and
refuses one that is not there, unless the caller trusts it (``trusted=True``, or the environment
variable ``EDM_FAST_TRUST_EXPORTS=1``). The store is one line per file, ``<sha256> <path>``, in
``$EDM_FAST_TRUSTED_EXPORTS`` or else ``$XDG_CACHE_HOME/edm-fast/trusted-exports`` (by default
``~/.cache/edm-fast/trusted-exports``). ONNX files are data, not code, and are not listed here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import BadFileError

__all__ = ["UntrustedExportError", "check_trusted", "file_digest", "record_export",
           "store_path"]

TRUST_ENV = "EDM_FAST_TRUST_EXPORTS"


class UntrustedExportError(BadFileError):
    """An exported program that edm-fast did not write here, loaded without being trusted."""


def store_path() -> Path:
    """The per-user file that lists the digests of the exports edm-fast wrote."""
    explicit = os.environ.get("EDM_FAST_TRUSTED_EXPORTS")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "edm-fast" / "trusted-exports"


def file_digest(path) -> str:
    """SHA-256 of the file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def record_export(path) -> None:
    """Add a file edm-fast has just written to the store (one appended line; the folder is
    private to the user)."""
    store = store_path()
    store.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = f"{file_digest(path)} {os.path.abspath(path)}\n"
    fd = os.open(store, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _recorded_digests() -> set[str]:
    try:
        text = store_path().read_text(errors="replace")
    except FileNotFoundError:
        return set()
    return {line.split(" ", 1)[0] for line in text.splitlines() if line}


def check_trusted(path, *, trusted: bool = False) -> None:
    """Raise UntrustedExportError unless ``path`` is an export edm-fast recorded (same bytes),
    ``trusted`` is set, or EDM_FAST_TRUST_EXPORTS=1."""
    if trusted or os.environ.get(TRUST_ENV, "0") == "1":
        return
    if file_digest(path) in _recorded_digests():
        return
    raise UntrustedExportError(
        f"{path}: an exported program runs as code when loaded, and edm-fast did not write "
        f"this file here (its SHA-256 is not in {store_path()}); if you trust its source, set "
        f"{TRUST_ENV}=1 (or pass trusted=True), or export the model again with `edm-fast "
        "export`")
