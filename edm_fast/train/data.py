"""Training data: image folders, MNIST IDX files, scikit-learn digits and toy 1-D/2-D data.

Every dataset is a ``torch.utils.data.Dataset`` whose items are ``(x, label)``:

    x      float32 in [-1, 1], (C, H, W) for images or (D,) for toy data
    label  int64 scalar tensor (0 when the data are unlabelled)

and which carries the attributes ``name``, ``shape`` ((C, H, W) or (D,)), ``resolution`` (None
for toy data), ``num_channels`` (None for toy data), ``dim`` (values per sample), ``num_classes``
(0 when unlabelled) and ``class_names``. EDM assumes sigma_data = 0.5; ``dataset_stats`` measures
it. ``load_dataset`` parses the CLI's ``--data`` value; ``infinite_loader`` feeds the training
loop with an endless, resumable, rank-sharded stream of batches.

Resampling choices: digits (8x8) are upsampled bilinearly (align_corners=False), MNIST is padded
with background (-1) around the centre when the target is >= 28 (the quick-convergence trick of
padding 28x28 to 64x64) and resized with antialiasing otherwise; folder images have their shorter
side resized with Lanczos (Pillow, ``reducing_gap=3``) and are then centre-cropped.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import BadFileError
from ..nets.toy import bimodal_mixture_1d, ring_mixture_2d

__all__ = [
    "ArrayDataset", "ImageFolderDataset", "InfiniteSampler", "BatchStream", "IMAGE_EXTENSIONS",
    "load_dataset", "load_digits", "load_mnist", "load_toy", "read_idx", "gmm1d", "gmm2d",
    "dataset_stats", "infinite_loader",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TOY_NAMES = ("gmm1d", "gmm2d", "moons", "swissroll")
_FOLDER_LAYOUT = "<root>/<label>/<image>.jpg (one subfolder per class, e.g. cat/cat1.jpg)"

#----------------------------------------------------------------------------
# In-memory datasets (digits, MNIST, toy data, preloaded image folders).


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 [-1, 1]; floating data pass through as float32."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 127.5 - 1
    return x.to(torch.float32)


class ArrayDataset(Dataset):
    """In-memory samples (uint8 0..255 or float in [-1, 1]) with labels and a batch transform.

    data: (N, C, h, w) or (N, D); labels: (N,) int64; transform maps a float batch in [-1, 1]
    to the final (B, C, H, W) or (B, D) batch (e.g. padding or resizing), applied on access.
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, *, name: str,
                 class_names: list[str] | None = None, transform=None):
        if len(data) == 0:  # the first-sample probe below would raise a bare IndexError
            raise ValueError(f"{name}: no samples")
        self.data = data
        self.labels = (torch.zeros(len(data), dtype=torch.int64) if labels is None
                       else torch.as_tensor(labels, dtype=torch.int64))
        if len(self.labels) != len(data):
            raise ValueError(f"{len(data)} samples but {len(self.labels)} labels")
        self.transform = transform
        self.name = name
        self.class_names = list(class_names or [])
        self.num_classes = len(self.class_names)
        first, _ = self.get_batch(torch.zeros(1, dtype=torch.int64))
        _set_shape_attrs(self, tuple(first.shape[1:]))

    def __len__(self) -> int:
        return len(self.data)

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples at `indices` (B,) -> (x (B, *shape) float32, labels (B,) int64)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        x = _to_unit_range(self.data[indices])
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([int(i)]))
        return x[0], y[0]


def _set_shape_attrs(ds, shape: tuple[int, ...]) -> None:
    """Set shape/resolution/num_channels/dim from one sample's shape."""
    ds.shape = shape
    ds.dim = math.prod(shape)
    is_image = len(shape) == 3
    ds.resolution = shape[-1] if is_image else None
    ds.num_channels = shape[0] if is_image else None


def _fit_images(x: torch.Tensor, *, pad_to: int | None, resolution: int | None,
                channels: int | None) -> torch.Tensor:
    """Pad (centred, with -1) then resize a batch (B, C, h, w) in [-1, 1]; 1 -> 3 channels."""
    if pad_to is not None:
        h, w = x.shape[-2:]
        if pad_to < max(h, w):
            raise ValueError(f"pad_to={pad_to} is smaller than the images ({h}x{w})")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        x = F.pad(x, (left, pad_to - w - left, top, pad_to - h - top), value=-1.0)
    if resolution is not None and tuple(x.shape[-2:]) != (resolution, resolution):
        shrink = resolution < x.shape[-1]
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=shrink).clamp(-1, 1)
    if channels is not None and channels != x.shape[1]:
        if x.shape[1] != 1 or channels != 3:
            raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x


def _fitter(**kwargs):
    """The batch transform for these options, or None; picklable for DataLoader workers."""
    return None if all(v is None for v in kwargs.values()) else partial(_fit_images, **kwargs)

#----------------------------------------------------------------------------
# scikit-learn digits: 1797 real 8x8 handwritten digits, bundled with scikit-learn.


def load_digits(resolution: int = 16, *, pad_to: int | None = None,
                channels: int | None = None) -> ArrayDataset:
    """scikit-learn's digits (1797 images, 10 classes) as (1, R, R) in [-1, 1], R in {8, 16, 32}.

    The 8x8 images are upsampled bilinearly to `resolution`; with `pad_to` they are first padded
    with background around the centre instead (then resized to `resolution` if that differs).
    """
    from ..optional import require

    sk_datasets = require("sklearn.datasets", "the digits data set")
    if resolution not in (8, 16, 32):
        raise ValueError(f"digits resolution must be 8, 16 or 32, got {resolution}")
    bunch = sk_datasets.load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32)[:, None] / 8.0 - 1.0  # 0..16
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    return ArrayDataset(images, labels, name="digits",
                        class_names=[str(int(n)) for n in bunch.target_names],
                        transform=_fitter(pad_to=pad_to, resolution=resolution, channels=channels))

#----------------------------------------------------------------------------
# MNIST from its IDX files (http://yann.lecun.com/exdb/mnist/ format).

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
                        transform=_fitter(pad_to=pad_to, resolution=resolution, channels=channels))

#----------------------------------------------------------------------------
# Image folder: root/<label>/<file>.{jpg,jpeg,png,bmp,webp}.


# Greyscale modes wider than 8 bits. Pillow opens a 16-bit greyscale PNG as 'I;16' (or
# 'I;16B'/'I;16L'), and older Pillow as 'I' (32-bit int); none of IMAGE_EXTENSIONS decodes to
# 'I' otherwise, so 'I' holds 16-bit data too. 'F' (float) has no bit depth: like Pillow's own
# convert('L') its values are taken as 8-bit levels.
_WIDE_GREY_SCALE = {"I;16": 257.0, "I;16B": 257.0, "I;16L": 257.0, "I": 257.0, "F": 1.0}


def _wide_grey_to_8bit(im):
    """A 16-bit / float greyscale image -> 'L' (or 'LA' with a transparency key).

    The scale comes from the mode, never from the pixel values: 0..65535 maps onto 0..255
    (divide by 257) for every image, so levels stay monotonic across images and a dark 16-bit
    image stays dark (scaling by each image's own maximum did neither).
    """
    from PIL import Image

    raw = np.asarray(im)
    grey = Image.fromarray((raw.astype(np.float64) / _WIDE_GREY_SCALE[im.mode])
                           .clip(0, 255).round().astype(np.uint8))
    key = im.info.get("transparency")
    if isinstance(key, (int, float)):  # a tRNS grey level: keep it as alpha, composited below
        alpha = Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8))
        grey = Image.merge("LA", (grey, alpha))
    return grey


def _to_mode(im, channels: int):
    """Any Pillow image -> 'RGB' (channels=3) or 'L' (channels=1); alpha composited on white."""
    from PIL import Image

    if im.mode in _WIDE_GREY_SCALE:
        im = _wide_grey_to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("RGB" if channels == 3 else "L")


MAX_PIXELS = 100_000_000  # per image, checked from the header before decoding


def _too_many_pixels(im, max_pixels: int) -> str | None:
    """The reason to skip a lazily opened image whose header declares over max_pixels, or None."""
    w, h = im.size
    if w * h > max_pixels:
        return (f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels} (max_pixels; a "
                "decompression bomb?), not decoded")
    return None


def _allow_pixels(max_pixels: int) -> None:
    """Pillow refuses images over twice its Image.MAX_IMAGE_PIXELS itself (a process-wide
    setting): a max_pixels raised past that raises Pillow's limit to match, never lowers it."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


class _TooLarge(ValueError):
    pass


def _decode(path: Path, resolution: int, channels: int,
            max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode, resize the shorter side to `resolution` (Lanczos), centre-crop -> uint8 (C, R, R)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        reason = _too_many_pixels(im, max_pixels)
        if reason:
            raise _TooLarge(reason)
        im.draft("RGB" if channels == 3 else "L", (resolution, resolution))  # JPEG DCT scaling
        im = _to_mode(ImageOps.exif_transpose(im), channels)
        w, h = im.size
        s = resolution / min(w, h)
        size = (max(resolution, round(w * s)), max(resolution, round(h * s)))
        if size != im.size:
            im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        arr = np.array(im.crop((left, top, left + resolution, top + resolution)), np.uint8)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _verify(path: Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """None if Pillow can open and verify the file cheaply (and its header declares at most
    max_pixels pixels), else the reason it cannot."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # lazy: reads the header only
            reason = _too_many_pixels(im, max_pixels)
            if reason:
                return reason
            im.verify()
    except Exception as e:  # noqa: BLE001 -- any failure means "skip this file"
        return f"{type(e).__name__}: {e}"
    return None


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted subfolders holding images) and (path, label) pairs, sorted."""
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory; expected {_FOLDER_LAYOUT}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory; expected {_FOLDER_LAYOUT}")

    def visible_files(folder: Path) -> list[Path]:
        """Files under folder, skipping hidden files and anything inside hidden folders."""
        return sorted(p for p in folder.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts))

    def is_image(p: Path) -> bool:
        return p.suffix.lower() in IMAGE_EXTENSIONS

    subdirs = _class_folders(root)
    in_class = {d.name: visible_files(d) for d in subdirs}
    found = {name: [p for p in paths if is_image(p)] for name, paths in in_class.items()}
    class_names = [name for name in found if found[name]]
    loose = sum(1 for p in root.iterdir()  # they have no class folder
                if p.is_file() and is_image(p) and not p.name.startswith("."))
    _warn_unread_formats(root, [p for paths in in_class.values() for p in paths])
    if not class_names:
        hint = f" ({loose} images lie directly in it: move them into subfolders)" if loose else ""
        raise ValueError(f"{root}: no class subfolders with images "
                         f"({', '.join(IMAGE_EXTENSIONS)}){hint}; expected {_FOLDER_LAYOUT}")
    if loose:  # the labels come from the subfolders, so a loose image has none: say so once
        warnings.warn(f"{root}: skipped {loose} image file(s) lying directly in the folder, "
                      f"outside any class subfolder (so without a label); expected "
                      f"{_FOLDER_LAYOUT}", stacklevel=3)
    for name, paths in found.items():
        if not paths:
            warnings.warn(f"{root / name}: no images ({', '.join(IMAGE_EXTENSIONS)}), "
                          "folder ignored", stacklevel=3)
    files = [(p, label) for label, name in enumerate(class_names) for p in found[name]]
    return class_names, files


def _class_folders(root: Path) -> list[Path]:
    """Sorted visible subfolders of root; one that is a symlink resolving inside root (a loop
    or a duplicate class) or to a folder already listed is skipped with a warning."""
    real_root = root.resolve()
    candidates = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    seen = {d.resolve(): d for d in candidates if not d.is_symlink()}
    out = [d for d in candidates if not d.is_symlink()]
    for d in (d for d in candidates if d.is_symlink()):
        target = d.resolve()
        if target == real_root or real_root in target.parents:
            why = "inside the data root"
        elif target in seen:
            why = f"the folder already read as {seen[target]}"
        else:
            seen[target] = d
            out.append(d)
            continue
        warnings.warn(f"{d}: class folder is a symlink to {target}, {why}; skipped (its "
                      "images would be duplicates)", stacklevel=4)
    return sorted(out)


def _warn_unread_formats(root: Path, paths: list[Path]) -> None:
    """One warning for image files (by Pillow's list of extensions) in formats not read here,
    such as .gif or .tiff, so that a class made of them is not silently thinned or dropped.
    Other files (notes, metadata) are ignored without a word."""
    from PIL import Image

    pillow = {ext.lower() for ext in Image.registered_extensions()}
    counts = Counter(p.suffix.lower() for p in paths
                     if p.suffix.lower() in pillow and p.suffix.lower() not in IMAGE_EXTENSIONS)
    if counts:
        listed = ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items()))
        warnings.warn(f"{root}: ignored {sum(counts.values())} image file(s) in formats not read "
                      f"here ({listed}); convert them to one of {', '.join(IMAGE_EXTENSIONS)}",
                      stacklevel=4)


class ImageFolderDataset(Dataset):
    """Images in root/<label>/<file> as (C, R, R) float32 in [-1, 1] with labels from folder names.

    Files Pillow cannot open are reported (``warnings.warn``) and listed in ``skipped`` as
    (path, reason). cache=True decodes everything up front into uint8 (tqdm progress); cache=None
    does so when that takes at most `cache_limit_bytes`; otherwise images are decoded on access,
    and one that fails then is reported and replaced by the next readable one (deterministic).
    An image whose header declares more than `max_pixels` pixels (default 100 million) is
    skipped the same way without being decoded (a decompression bomb); a folder of nothing but
    unreadable or oversized images raises ``BadFileError``. A class folder that is a symlink
    into the data root, or to a folder already seen, is skipped with a warning.
    """

    def __init__(self, root, *, resolution: int = 64, channels: int = 3,
                 cache: bool | None = None, cache_limit_bytes: int = 1 << 30,
                 progress: bool = True, num_threads: int | None = None,
                 max_pixels: int = MAX_PIXELS):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.root = Path(root).expanduser()
        self.name = self.root.name
        self.class_names, files = _scan_folder(self.root)
        self.skipped: list[tuple[str, str]] = []
        self._channels, self._resolution = channels, resolution
        self._max_pixels = max_pixels
        _allow_pixels(max_pixels)
        self._threads = num_threads or min(8, os.cpu_count() or 1)
        reasons = self._map(lambda f: _verify(f[0], max_pixels), files, "verifying", progress)
        self.files = [f for f, reason in zip(files, reasons) if not self._skip(f[0], reason)]
        if not self.files:
            raise BadFileError(f"{self.root}: none of the {len(files)} image files could be "
                               f"read (e.g. {self.skipped[0][0]}: {self.skipped[0][1]})")
        self._drop_empty_classes()
        self._bad: set[int] = set()
        self.data = None
        if cache or (cache is None and
                     len(self.files) * channels * resolution**2 <= cache_limit_bytes):
            self._preload(progress)
        _set_shape_attrs(self, (channels, resolution, resolution))

    def _map(self, fn, items, what: str, progress: bool) -> list:
        """fn over items in order, on a thread pool (Pillow releases the GIL), with tqdm."""
        from PIL import Image
        from tqdm.auto import tqdm

        # max_pixels is checked on every header; Pillow's own generic warning past its
        # MAX_IMAGE_PIXELS would only repeat it for the images that pass
        with ThreadPoolExecutor(self._threads) as pool, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return list(tqdm(pool.map(fn, items), total=len(items), disable=not progress,
                             desc=f"{what} {self.name}", unit="img", leave=False))

    def _skip(self, path: Path, reason: str | None) -> bool:
        """Record and warn about an unreadable file; returns whether it was skipped."""
        if reason is None:
            return False
        self.skipped.append((str(path), reason))
        warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=3)
        return True

    def _drop_empty_classes(self) -> None:
        """Set labels and num_classes from self.files. A class none of whose images could be
        read is dropped, with a warning, and the labels after it renumbered: a conditional net
        must not get a label it never sees in training."""
        present = sorted({label for _, label in self.files})
        for label, name in enumerate(self.class_names):
            if label not in present:
                warnings.warn(f"{self.root / name}: none of its images could be read, "
                              "class dropped", stacklevel=4)
        new_label = {old: new for new, old in enumerate(present)}
        self.class_names = [self.class_names[old] for old in present]
        self.num_classes = len(self.class_names)
        self.files = [(path, new_label[label]) for path, label in self.files]
        self.labels = torch.tensor([label for _, label in self.files], dtype=torch.int64)

    def _try_decode(self, path: Path):
        try:
            return _decode(path, self._resolution, self._channels, self._max_pixels), None
        except _TooLarge as e:
            return None, str(e)
        except Exception as e:  # noqa: BLE001 -- report and skip, never crash a long run
            return None, f"{type(e).__name__}: {e}"

    def _preload(self, progress: bool) -> None:
        """Decode every file into self.data, uint8 (N, C, R, R); drop the ones that fail."""
        out = self._map(lambda f: self._try_decode(f[0]), self.files, "loading", progress)
        keep = [i for i, (_, reason) in enumerate(out)
                if not self._skip(self.files[i][0], reason)]
        if not keep:
            raise BadFileError(f"{self.root}: none of the {len(out)} image files could be "
                               f"decoded (e.g. {self.skipped[-1][0]}: {self.skipped[-1][1]})")
        self.files = [self.files[i] for i in keep]
        self._drop_empty_classes()
        self.data = torch.from_numpy(np.stack([out[i][0] for i in keep]))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i)
        if self.data is not None:
            return _to_unit_range(self.data[i]), self.labels[i]
        for k in range(len(self.files)):  # lazy: fall back to the next readable file
            j = (i + k) % len(self.files)
            if j in self._bad:
                continue
            arr, reason = self._try_decode(self.files[j][0])
            if arr is not None:
                return _to_unit_range(torch.from_numpy(arr)), self.labels[j]
            self._bad.add(j)
            self._skip(self.files[j][0], reason)
        raise RuntimeError(f"{self.root}: no readable images left")

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples at `indices` (B,) -> (x (B, C, R, R) float32, labels (B,) int64)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if self.data is not None:
            return _to_unit_range(self.data[indices]), self.labels[indices]
        items = [self[i] for i in indices.tolist()]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

#----------------------------------------------------------------------------
# Toy 1-D / 2-D distributions, scaled so the RMS per-coordinate std is about sigma_data = 0.5.


def gmm1d():
    """The standard 1-D bimodal mixture (``edm_fast.nets.toy.bimodal_mixture_1d``)."""
    return bimodal_mixture_1d()


def gmm2d(num_modes: int = 8, radius: float = 0.7, std: float = 0.05):
    """The standard 2-D ring mixture (``edm_fast.nets.toy.ring_mixture_2d``)."""
    return ring_mixture_2d(num_modes, radius, std)


def _standardize(x: np.ndarray) -> torch.Tensor:
    """Centre and scale so the RMS per-coordinate std is 0.5."""
    x = x - x.mean(axis=0)
    return torch.from_numpy(x * (0.5 / x.std())).to(torch.float32)


def load_toy(name: str, *, num_samples: int = 100_000, seed: int = 0) -> ArrayDataset:
    """A fixed draw of `num_samples` points (seed `seed`) from a toy distribution -> (D,) items."""
    if name in ("gmm1d", "gmm2d"):
        mixture = gmm1d() if name == "gmm1d" else gmm2d()
        gen = torch.Generator().manual_seed(seed)
        data = mixture.sample(num_samples, generator=gen).to(torch.float32)
    elif name == "moons":
        from ..optional import require

        make_moons = require("sklearn.datasets", "the moons toy data").make_moons
        data = _standardize(make_moons(num_samples, noise=0.05, random_state=seed)[0])
    elif name == "swissroll":
        from ..optional import require

        make_swiss_roll = require("sklearn.datasets", "the swiss-roll toy data").make_swiss_roll
        roll = make_swiss_roll(num_samples, noise=0.3, random_state=seed)[0]
        data = _standardize(roll[:, [0, 2]])  # the (x, z) plane
    else:
        raise ValueError(f"unknown toy dataset {name!r}; choose from {', '.join(TOY_NAMES)}")
    return ArrayDataset(data, None, name=f"toy:{name}")

#----------------------------------------------------------------------------
# The CLI's --data value.


def load_dataset(spec: str, *, resolution: int | None = None, channels: int | None = None,
                 pad_to: int | None = None, split: str = "train", cache: bool | None = None,
                 num_samples: int = 100_000, seed: int = 0, progress: bool = True,
                 max_pixels: int = MAX_PIXELS) -> Dataset:
    """Dataset for a --data value: 'digits[:R]', 'mnist:DIR', 'toy:NAME' or an image folder DIR.

    digits: resolution 8/16/32 (default 16). mnist: native 28x28; a resolution >= 28 pads around
    the centre (like pad_to), a smaller one resizes. folder: resolution default 64, channels 3.
    toy: gmm1d, gmm2d, moons, swissroll; `num_samples` points drawn with `seed`.
    max_pixels: the folder loader's cap on the pixels of one image (see ImageFolderDataset).
    """
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind == "digits" and (arg == "" or arg.isdigit()):
        if arg and resolution is not None and int(arg) != resolution:
            raise ValueError(f"{spec!r} conflicts with resolution={resolution}")
        res = int(arg) if arg else (resolution or 16)
        return load_digits(res, pad_to=pad_to, channels=channels)
    if kind == "mnist" and arg:
        if pad_to is None and resolution is not None and resolution >= 28:
            pad_to = resolution
        return load_mnist(arg, split=split, pad_to=pad_to, resolution=resolution,
                          channels=channels)
    if kind == "toy":
        if resolution is not None or channels is not None or pad_to is not None:
            raise ValueError(f"{spec!r}: toy data have no resolution, channels or padding")
        return load_toy(arg, num_samples=num_samples, seed=seed)
    path = Path(spec).expanduser()
    looks_like_scheme = len(kind) > 1 and "/" not in kind and "\\" not in kind and arg != ""
    if not path.exists() and (kind in ("digits", "mnist", "toy") or looks_like_scheme):
        raise ValueError(f"cannot parse --data {spec!r}; expected 'digits', 'digits:32', "
                         "'mnist:DIR', 'toy:NAME' or an image folder DIR")
    if pad_to is not None:
        raise ValueError("pad_to applies to digits and MNIST only")
    if path.is_dir() and any(path.glob("*-idx[13]-ubyte*")):
        raise ValueError(f"{spec!r} holds MNIST IDX files, not an image folder "
                         f"(label/file.jpg): use --data mnist:{spec}")
    return ImageFolderDataset(path, resolution=resolution or 64, channels=channels or 3,
                              cache=cache, progress=progress, max_pixels=max_pixels)


def dataset_stats(ds, max_items: int = 10_000, batch_size: int = 512) -> dict:
    """Per-channel (per-coordinate for toy data) mean/std of up to `max_items` evenly spaced items.

    Returns {'mean': [C], 'std': [C], 'sigma_data': overall std, 'num_items': n}.
    """
    n = min(len(ds), max_items)
    indices = torch.linspace(0, len(ds) - 1, n).round().to(torch.int64).unique()
    s1 = s2 = 0.0
    count = 0
    for start in range(0, len(indices), batch_size):
        x, _ = _fetch(ds, indices[start:start + batch_size])
        x = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*H*W)
        s1, s2, count = s1 + x.sum(1), s2 + (x**2).sum(1), count + x.shape[1]
    mean = s1 / count
    var = (s2 / count - mean**2).clamp_min(0)
    overall = (s2.sum() / (count * len(mean)) - (s1.sum() / (count * len(mean)))**2).clamp_min(0)
    return {"mean": mean.tolist(), "std": var.sqrt().tolist(),
            "sigma_data": float(overall.sqrt()), "num_items": len(indices)}

#----------------------------------------------------------------------------
# Endless, resumable, rank-sharded batches.


def _fetch(ds, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
            batch = _fetch(self.dataset, self.sampler.next_batch())
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
