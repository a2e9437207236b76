"""In-memory data sets and the batch transforms that bring samples to the training format.

Every dataset is a ``torch.utils.data.Dataset`` whose items are ``(x, label)``:

    x      float32 in [-1, 1], (C, H, W) for images or (D,) for toy data
    label  int64 scalar tensor (0 when the data are unlabelled)

and which carries the attributes ``name``, ``shape`` ((C, H, W) or (D,)), ``resolution`` (None
for toy data), ``num_channels`` (None for toy data), ``dim`` (values per sample), ``num_classes``
(0 when unlabelled) and ``class_names``.

``ArrayDataset`` holds the digits, MNIST and toy data; ``fit_images`` pads (with background -1),
resizes and converts channels, ``fitter`` makes that a picklable batch transform.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["ArrayDataset", "fit_images", "fitter", "set_shape_attrs", "to_unit_range"]


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
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
        set_shape_attrs(self, tuple(first.shape[1:]))

    def __len__(self) -> int:
        return len(self.data)

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples at `indices` (B,) -> (x (B, *shape) float32, labels (B,) int64)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        x = to_unit_range(self.data[indices])
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([int(i)]))
        return x[0], y[0]


def set_shape_attrs(ds, shape: tuple[int, ...]) -> None:
    """Set shape/resolution/num_channels/dim from one sample's shape."""
    ds.shape = shape
    ds.dim = math.prod(shape)
    is_image = len(shape) == 3
    ds.resolution = shape[-1] if is_image else None
    ds.num_channels = shape[0] if is_image else None


def fit_images(x: torch.Tensor, *, pad_to: int | None, resolution: int | None,
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


def fitter(**kwargs):
    """The batch transform for these options, or None; picklable for DataLoader workers."""
    return None if all(v is None for v in kwargs.values()) else partial(fit_images, **kwargs)
