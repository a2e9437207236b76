"""Training data: what ``--data`` names, and the measure of a data set's spread.

Every dataset is a ``torch.utils.data.Dataset`` whose items are ``(x, label)``:

    x      float32 in [-1, 1], (C, H, W) for images or (D,) for toy data
    label  int64 scalar tensor (0 when the data are unlabelled)

and which carries the attributes ``name``, ``shape`` ((C, H, W) or (D,)), ``resolution`` (None
for toy data), ``num_channels`` (None for toy data), ``dim`` (values per sample), ``num_classes``
(0 when unlabelled) and ``class_names``. EDM assumes sigma_data = 0.5; ``dataset_stats`` measures
it. ``load_dataset`` parses the CLI's ``--data`` value.

The loaders live in modules of their own and are re-exported here:

    datasets.py      ArrayDataset (in-memory data) and the pad / resize / channel transforms
    small_sets.py    scikit-learn's digits and the toy 1-D / 2-D distributions
    mnist.py         MNIST from its IDX files
    image_folder.py  image folders root/<label>/<file>
    batch_stream.py  the endless, resumable, rank-sharded batches that feed the training loop
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from .batch_stream import BatchStream, InfiniteSampler, fetch_batch, infinite_loader
from .datasets import ArrayDataset
from .image_folder import IMAGE_EXTENSIONS, MAX_PIXELS, ImageFolderDataset
from .mnist import load_mnist, read_idx
from .small_sets import TOY_NAMES, gmm1d, gmm2d, load_digits, load_toy

__all__ = [
    "ArrayDataset", "ImageFolderDataset", "InfiniteSampler", "BatchStream", "IMAGE_EXTENSIONS",
    "load_dataset", "load_digits", "load_mnist", "load_toy", "read_idx", "gmm1d", "gmm2d",
    "dataset_stats", "infinite_loader", "MAX_PIXELS", "TOY_NAMES",
]


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
        x, _ = fetch_batch(ds, indices[start:start + batch_size])
        x = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*H*W)
        s1, s2, count = s1 + x.sum(1), s2 + (x**2).sum(1), count + x.shape[1]
    mean = s1 / count
    var = (s2 / count - mean**2).clamp_min(0)
    overall = (s2.sum() / (count * len(mean)) - (s1.sum() / (count * len(mean)))**2).clamp_min(0)
    return {"mean": mean.tolist(), "std": var.sqrt().tolist(),
            "sigma_data": float(overall.sqrt()), "num_items": len(indices)}
