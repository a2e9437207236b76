"""Image folders: root/<label>/<file>.{jpg,jpeg,png,bmp,webp}, one subfolder per class.

Decoding (Pillow): EXIF orientation applied, wide greyscale scaled to 8 bits, the pixel count
checked from the header before decoding; the shorter side resized with Lanczos
(``reducing_gap=3``), then centre-cropped.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import BadFileError
from .datasets import set_shape_attrs, to_unit_range

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "ImageFolderDataset", "to_mode"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_FOLDER_LAYOUT = "<root>/<label>/<image>.jpg (one subfolder per class, e.g. cat/cat1.jpg)"

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


def to_mode(im, channels: int):
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
        im = to_mode(ImageOps.exif_transpose(im), channels)
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
        set_shape_attrs(self, (channels, resolution, resolution))

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
            return to_unit_range(self.data[i]), self.labels[i]
        for k in range(len(self.files)):  # lazy: fall back to the next readable file
            j = (i + k) % len(self.files)
            if j in self._bad:
                continue
            arr, reason = self._try_decode(self.files[j][0])
            if arr is not None:
                return to_unit_range(torch.from_numpy(arr)), self.labels[j]
            self._bad.add(j)
            self._skip(self.files[j][0], reason)
        raise RuntimeError(f"{self.root}: no readable images left")

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples at `indices` (B,) -> (x (B, C, R, R) float32, labels (B,) int64)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if self.data is not None:
            return to_unit_range(self.data[indices]), self.labels[indices]
        items = [self[i] for i in indices.tolist()]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
