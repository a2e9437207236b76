"""MNIST from its IDX files (http://yann.lecun.com/exdb/mnist/ format), plain or gzip.

MNIST is padded with background (-1) around the centre when the target is >= 28 (the
quick-convergence trick of padding 28x28 to 64x64) and resized with antialiasing otherwise.
Hostile or malformed files raise ``BadFileError`` before costing memory.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..errors import BadFileError
from .datasets import ArrayDataset, fitter

__all__ = ["IDX_MAX_BYTES", "MNIST_MAX_CLASSES", "MNIST_MAX_SIDE", "load_mnist", "read_idx"]

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_MAX_BYTES = 1 << 31  # 2 GiB of data per IDX file (MNIST's largest file holds 47 MB)
MNIST_MAX_SIDE = 4096    # pixels per image side in an IDX images file (MNIST: 28)
MNIST_MAX_CLASSES = 10_000


def _read_up_to(f, limit: int, path: Path) -> bytearray:
    """At most `limit` bytes from f, in chunks, so memory grows with the data actually there (a
    gzip header announcing terabytes costs only what its stream really holds)."""
    buf = bytearray()
    try:
        while len(buf) < limit:
            chunk = f.read(min(1 << 24, limit - len(buf)))
            if not chunk:
                break
            buf += chunk
    except (OSError, EOFError, zlib.error) as e:
        raise BadFileError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    return buf


def read_idx(path, *, ndim: int | None = None, max_bytes: int = IDX_MAX_BYTES) -> np.ndarray:
    """Parse one IDX file (plain or gzip) into an array of its header's dims; clear errors.

    The header is checked before the data are read: the declared dims x item size must equal the
    bytes after the header (for a plain file: its length on disk) and be at most `max_bytes`.
    Every refusal raises ``BadFileError`` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as plain:
            is_gz = plain.read(2) == b"\x1f\x8b"
            plain.seek(0)
            size_on_disk = os.fstat(plain.fileno()).st_size
            with gzip.GzipFile(fileobj=plain) if is_gz else nullcontext(plain) as f:
                dims, dtype, payload = _read_idx_parts(f, path, ndim, max_bytes,
                                                       None if is_gz else size_on_disk)
    except OSError as e:  # reading errors are BadFileErrors already: this is open() failing
        raise BadFileError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    arr = np.frombuffer(payload, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def _read_idx_parts(f, path: Path, ndim: int | None, max_bytes: int, size_on_disk: int | None):
    """(dims, dtype, payload) of an open IDX stream, the header checked before the payload is
    read; size_on_disk (None for gzip) is the file's length, checked against the header."""
    head = _read_up_to(f, 4, path)
    if len(head) < 4:
        raise BadFileError(f"{path}: truncated IDX file ({len(head)} bytes, no header)")
    zero, code, n_dims = struct.unpack(">HBB", head)
    if zero != 0 or code not in _IDX_DTYPES or n_dims == 0:
        raise BadFileError(f"{path}: not an IDX file (bad magic number 0x{head.hex()}; "
                           f"expected 0x0000 then a type code in {sorted(_IDX_DTYPES)} and ndim)")
    if ndim is not None and n_dims != ndim:
        raise BadFileError(f"{path}: IDX file has {n_dims} dimensions, expected {ndim} "
                           f"(magic 0x{head.hex()})")
    raw_dims = _read_up_to(f, 4 * n_dims, path)
    if len(raw_dims) < 4 * n_dims:
        raise BadFileError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{n_dims}I", raw_dims)
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    if expected > max_bytes:
        raise BadFileError(f"{path}: header declares dims {dims} = {expected} data bytes, more "
                           f"than the limit of {max_bytes} (max_bytes)")
    got = None if size_on_disk is None else size_on_disk - 4 - 4 * n_dims
    if got is None:  # gzip: read at most one byte past the declared data
        payload = _read_up_to(f, expected + 1, path)
        got = len(payload) if len(payload) <= expected else f"more than {expected}"
    if got != expected:
        what = "truncated" if isinstance(got, int) and got < expected else "has trailing bytes"
        raise BadFileError(f"{path}: {what}: header says dims {dims} = {expected} data bytes, "
                           f"file has {got}")
    if size_on_disk is not None:
        payload = _read_up_to(f, expected, path)
        if len(payload) != expected:  # the file shrank while being read
            raise BadFileError(f"{path}: truncated: header says dims {dims} = {expected} data "
                               f"bytes, read {len(payload)}")
    return dims, dtype, payload


def _check_mnist_images(img: np.ndarray, path: Path) -> np.ndarray:
    """IDX images -> uint8; refuses huge sides, non-finite or out-of-range (0..255) values."""
    if max(img.shape[1:]) > MNIST_MAX_SIDE:
        raise BadFileError(f"{path}: images of {img.shape[1]}x{img.shape[2]} pixels; at most "
                           f"{MNIST_MAX_SIDE} per side")
    if img.dtype.kind == "f":
        bad = ~np.isfinite(img)
        if bad.any():
            first = int(np.flatnonzero(bad.reshape(len(img), -1).any(1))[0])
            raise BadFileError(f"{path}: {int(bad.sum())} pixel values are NaN or infinite "
                               f"(first in image {first}); pixels must be finite 0..255")
    if img.dtype == np.uint8:
        return img
    if img.size and (img.min() < 0 or img.max() > 255):
        raise BadFileError(f"{path}: pixel values span {img.min()}..{img.max()}; expected "
                           "0..255")
    return img.astype(np.uint8)


def _mnist_classes(labels: np.ndarray, paths: list[Path]) -> int:
    """The class count: 10 when every label is a digit 0..9 (MNIST, Fashion-MNIST), otherwise
    the number of distinct labels K, which must be exactly 0..K-1 and at most
    MNIST_MAX_CLASSES, so that a stray huge label can neither build millions of classes nor
    give a conditional net labels it never sees in training."""
    where = " / ".join(str(p) for p in paths)
    if labels.dtype.kind not in "iu":
        raise BadFileError(f"{where}: labels are {labels.dtype} values; expected integers")
    if len(labels) == 0:
        return 10
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise BadFileError(f"{where}: negative label {low}; labels must be 0..K-1")
    if high <= 9:
        return 10
    present = np.unique(labels)
    k = len(present)
    if high >= k:
        missing = np.setdiff1d(np.arange(min(high, k + 1000)), present)[:5]
        raise BadFileError(f"{where}: label {high} among only {k} distinct labels in "
                           f"{len(labels)} images; labels must be 0..K-1 with every class "
                           f"present (missing e.g. {', '.join(map(str, missing))})")
    if k > MNIST_MAX_CLASSES:
        raise BadFileError(f"{where}: {k} classes; at most {MNIST_MAX_CLASSES}")
    return k


def _find_idx(root: Path, stem: str) -> Path:
    """The IDX file for `stem` in root: stem or stem with '.idx' spelled with a dot, .gz or not."""
    dotted = stem.replace("-idx", ".idx")
    candidates = [root / (s + gz) for s in (stem, dotted) for gz in ("", ".gz")]
    for p in candidates:
        if p.is_file():
            return p
    raise FileNotFoundError(f"{root}: no MNIST file {stem}[.gz] (looked for "
                            f"{', '.join(p.name for p in candidates)})")


def load_mnist(path, *, split: str = "train", pad_to: int | None = None,
               resolution: int | None = None, channels: int | None = None) -> ArrayDataset:
    """MNIST (or Fashion-MNIST) from the IDX files in directory `path` -> (1, R, R) in [-1, 1].

    split: 'train' (train-*), 'test' (t10k-*) or 'all'. pad_to: pad 28x28 around the centre
    with background (-1); resolution: then resize (bilinear, antialiased) if it differs.
    Hostile or malformed files raise ``BadFileError`` before costing memory (see read_idx); the
    pixels must be finite 0..255 and the labels 0..9 (10 classes) or exactly 0..K-1.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory; expected a folder holding "
                                "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]")
    prefixes = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}
    if split not in prefixes:
        raise ValueError(f"split must be one of {sorted(prefixes)}, got {split!r}")
    images, labels, label_paths = [], [], []
    for prefix in prefixes[split]:
        img_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        lab_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        img, lab = read_idx(img_path, ndim=3), read_idx(lab_path, ndim=1)
        if len(img) == 0:  # a valid header with 0 images: say so, not an IndexError later
            raise BadFileError(f"{img_path}: holds no images (header dims {img.shape})")
        img = _check_mnist_images(img, img_path)
        if len(img) != len(lab):
            raise BadFileError(f"{img_path} has {len(img)} images but {lab_path} has "
                               f"{len(lab)} labels")
        images.append(torch.from_numpy(img)[:, None])
        labels.append(lab)
        label_paths.append(lab_path)
    labels = np.concatenate(labels)
    num_classes = _mnist_classes(labels, label_paths)
    labels = torch.from_numpy(labels.astype(np.int64))
    return ArrayDataset(torch.cat(images), labels, name="mnist",
                        class_names=[str(i) for i in range(num_classes)],
                        transform=fitter(pad_to=pad_to, resolution=resolution, channels=channels))
