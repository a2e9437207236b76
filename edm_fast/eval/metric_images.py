"""Image sets for the metrics: a folder of image files (searched recursively) or an .npz of
samples, read in batches of (N, 3, H, W) float tensors in [0, 255] with integer values, the
input of edm_fast.eval.feature_nets. Grey images are repeated to three channels.

An .npz holds either ``samples`` (N, C, H, W) in [-1, 1], as ``edm-fast sample --out X.npz``
writes (rounded to 8 bits, as a PNG of them would be), or ``arr_0`` (N, H, W, C) uint8, as
OpenAI's guided-diffusion and NVlabs' tools exchange samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import BadFileError, EdmFastError

__all__ = [
    "IMAGE_SUFFIXES",
    "compute_features",
    "count_images",
    "image_batches",
    "list_image_files",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_image_files(folder) -> list[Path]:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise EdmFastError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or its "
                           "subfolders")
    return files


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadFileError(f"{path}: not a readable image ({exc})") from None


def _npz_images(path: Path) -> np.ndarray:
    """(N, H, W, 3) uint8 from an .npz of samples."""
    from ..io.samples import to_uint8

    try:
        with np.load(path, allow_pickle=False) as data:
            if "samples" in data.files:
                samples = data["samples"]
                if samples.ndim != 4 or samples.shape[1] not in (1, 3):
                    raise BadFileError(f"{path}: 'samples' must be (N, 1 or 3, H, W), got "
                                       f"{samples.shape}")
                images = to_uint8(torch.from_numpy(samples))
            elif "arr_0" in data.files:
                images = data["arr_0"]
                if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
                    raise BadFileError(f"{path}: 'arr_0' must be uint8 (N, H, W, 1 or 3), got "
                                       f"{images.dtype} {images.shape}")
            else:
                raise BadFileError(f"{path} has neither 'samples' (N, C, H, W in [-1, 1]) nor "
                                   f"'arr_0' (N, H, W, C uint8); its keys: {', '.join(data.files)}")
    except (BadFileError, OSError):
        raise
    except Exception as exc:  # numpy's zip and format errors have no common base class
        raise BadFileError(f"{path} is not a readable .npz ({exc})") from None
    return images


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def count_images(source) -> int:
    source = Path(source)
    if source.is_dir():
        return len(list_image_files(source))
    return len(_npz_images(source))


def image_batches(source, batch: int) -> Iterator[torch.Tensor]:
    """Batches of at most ``batch`` images, each batch of one size (N, 3, H, W) in [0, 255]."""
    source = Path(source)
    if batch < 1:
        raise EdmFastError(f"batch must be >= 1, got {batch}")
    if source.is_dir():
        pending: list[np.ndarray] = []
        for path in list_image_files(source):
            image = _read_image(path)
            if pending and (image.shape != pending[0].shape or len(pending) == batch):
                yield _to_tensor(pending)
                pending = []
            pending.append(image)
        if pending:
            yield _to_tensor(pending)
    elif source.suffix == ".npz" and source.is_file():
        images = _npz_images(source)
        for lo in range(0, len(images), batch):
            yield _to_tensor(list(images[lo:lo + batch]))
    elif not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or file")
    else:
        raise EdmFastError(f"{source}: give a folder of images or an .npz of samples")


def compute_features(source, nets: dict, *, batch: int = 64, device="cpu",
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """{name: (N, D) float32 features on the CPU} of every image of ``source`` for each of the
    feature networks ``nets`` ({name: module with .features(images in [0, 255])})."""
    from tqdm import tqdm

    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in nets}
    for images in tqdm(image_batches(source, batch), desc=f"features of {Path(source).name}",
                       unit="batch", disable=not progress):
        images = images.to(device)
        for name, net in nets.items():
            chunks[name].append(net.features(images).float().cpu())
    return {name: torch.cat(parts) for name, parts in chunks.items()}
