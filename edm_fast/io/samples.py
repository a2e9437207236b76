"""Writing samples: image grids, per-seed PNGs, .npz arrays, and toy-data scatter plots.

Holds the package's one image-grid tiler (``tile_images``) and its one PNG encoder
(``png_bytes``); the comparison's sample sheets and the server's PNG responses use them too.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write

__all__ = ["to_uint8", "to_pil_images", "tile_images", "png_bytes", "save_grid", "save_per_seed",
           "save_npz", "save_samples", "plot_toy", "save_figure"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 (values clipped)."""
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    x = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def to_pil_images(samples: torch.Tensor) -> list:
    """Samples (N, C, H, W) in [-1, 1] (values outside are clipped), as a Sampler returns them,
    -> N PIL images: mode 'L' for one channel, 'RGB' for three. E.g.
    ``to_pil_images(sampler(seeds=range(4)))[0].save("seed0.png")``; for one tiled PNG of
    them all use ``save_grid``."""
    if not torch.is_tensor(samples):
        samples = torch.as_tensor(np.asarray(samples))
    if samples.ndim == 3:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(samples.shape)}: "
                         "for one image use samples[None]")
    if samples.ndim == 4 and samples.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels in (N, C, H, W), got shape "
                         f"{tuple(samples.shape)}")
    return [_pil(array) for array in to_uint8(samples)]


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W, C) uint8, C = 1 or 3, as ``to_uint8`` gives one image -> PNG bytes (greyscale
    for C = 1, RGB for C = 3)."""
    buf = io.BytesIO()
    _pil(array).save(buf, format="PNG")
    return buf.getvalue()


def tile_images(images: torch.Tensor, ncol: int, *, padding: int = 1,
                background: float = -1.0) -> torch.Tensor:
    """Images (N, C, H, W) -> one float32 image (C, H', W'): ``ncol`` per row in order,
    ``padding`` pixels of ``background`` between and around them (-1 is black and 1 white for
    images in [-1, 1]). The values are copied as they are, not clipped."""
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    images = images.detach().float().cpu()
    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    grid = torch.full((c, nrow * (h + padding) + padding, ncol * (w + padding) + padding),
                      float(background))
    for k in range(n):
        r, q = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y:y + h, x:x + w] = images[k]
    return grid


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG (atomically, creating the folder) and close it. Neither
    imports pyplot nor changes its backend (see ``edm_fast.optional.figures``)."""
    from ..optional import Figures

    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    Figures.close(fig)
    return path


MAX_GRID_PIXELS = 89_478_485  # Pillow's decompression-bomb limit: larger PNGs do not open


def _check_png_channels(images: torch.Tensor) -> None:
    """A PNG holds grey or RGB images: other channel counts (EDM2 latents) are refused."""
    if images.ndim == 4 and images.shape[1] not in (1, 3):
        raise ValueError(f"a PNG needs 1 or 3 channels, got {images.shape[1]}: write an .npz "
                         "(latents: decode them first, edm_fast.io.latents)")


def save_grid(images: torch.Tensor, path, *, nrow: int | None = None, padding: int = 1,
              scale: int | None = None) -> Path:
    """Tile (N, C, H, W) images into one PNG, nrow per row (default: a square-ish grid), on
    black padding."""
    path = Path(path)
    n = len(images)
    _check_png_channels(images)
    nrow = nrow or math.ceil(math.sqrt(n))
    grid = to_uint8(tile_images(images, nrow, padding=padding)[None])[0]
    h, w = images.shape[-2:]
    # small tiles are enlarged for viewing, but the grid's longer side stays within 4096 px
    scale = scale or max(1, min(256 // max(h, w), 4096 // max(grid.shape[:2])))
    if grid.shape[0] * grid.shape[1] * scale**2 > MAX_GRID_PIXELS:
        warnings.warn(f"a grid of {n} images is {grid.shape[1] * scale} x "
                      f"{grid.shape[0] * scale} px, more than image viewers open; write a "
                      "folder or an .npz instead", stacklevel=2)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest-neighbour
    atomic_write(path, lambda p: p.write_bytes(png_bytes(grid)))
    return path


def save_per_seed(images: torch.Tensor, seeds, folder) -> list[Path]:
    """One PNG per sample, named seed<seed:06d>.png."""
    _check_png_channels(images)
    folder = Path(folder)
    paths = []
    for array, seed in zip(to_uint8(images), seeds):
        p = folder / f"seed{int(seed):06d}.png"
        atomic_write(p, lambda q, a=array: q.write_bytes(png_bytes(a)))
        paths.append(p)
    return paths


def save_npz(samples: torch.Tensor, path, **arrays) -> Path:
    """Samples (N, ...) under 'samples' in float32 (float64 ones stay float64: a golden
    reference), plus any extra named arrays."""
    path = Path(path)
    extra = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    keep = samples.dtype == torch.float64
    data = (samples.detach() if keep else samples.detach().float()).cpu().numpy()

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # closed (flushed) before the rename
            np.savez(f, samples=data, **extra)

    atomic_write(path, save)
    return path


def plot_toy(samples: torch.Tensor, path, mixture=None, *, title: str = "") -> Path:
    """Scatter (2-D) or histogram (1-D) of samples over the true density when it is known."""
    from ..optional import figures

    plt = figures("a .png plot of toy samples")  # files only: the session's backend stays
    x = samples.detach().double().cpu().reshape(samples.shape[0], -1)
    fig, ax = plt.subplots(figsize=(5, 5) if x.shape[1] == 2 else (6, 3.5), dpi=120)
    if x.shape[1] == 2:
        lim = float(x.abs().quantile(0.995)) * 1.15 + 0.1
        if mixture is not None:
            g = torch.linspace(-lim, lim, 240, dtype=torch.float64)
            xx, yy = torch.meshgrid(g, g, indexing="xy")
            dens = mixture.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
            ax.contourf(xx, yy, dens.reshape(xx.shape), levels=20, cmap="Blues")
        ax.scatter(x[:, 0], x[:, 1], s=2, c="crimson", alpha=0.5, label="samples")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    elif x.shape[1] == 1:
        ax.hist(x[:, 0].numpy(), bins=100, density=True, alpha=0.6, color="crimson",
                label="samples")
        if mixture is not None:
            g = torch.linspace(float(x.min()) - 0.2, float(x.max()) + 0.2, 400, dtype=torch.float64)
            ax.plot(g, mixture.log_prob(g[:, None]).exp(), color="navy", label="true density")
    else:
        raise ValueError("plot_toy draws 1-D or 2-D samples only")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (where a write would
    create the missing folders)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder: Path, out) -> None:
    """ValueError unless ``folder``, or the nearest existing folder above it (where the missing
    ones would be created), is a writable folder; the message names ``out``."""
    ancestor = existing_ancestor(Path(folder))
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {out}: {ancestor} is not a writable folder")


def output_kind(out) -> str:
    """'.png', '.npz' (suffix in any case) or '' for a folder of per-seed PNGs: a name without
    a suffix, one ending in '/' (so 'run.v2/' is a folder), or an existing folder."""
    text = os.fspath(out)
    if not text.strip():
        raise ValueError("the output path is empty: name a .png grid, an .npz file or a folder")
    path = Path(text)
    if text.endswith(("/", os.sep)):
        return ""
    if path.name.lower() in (".png", ".npz"):
        raise ValueError(f"output {text!r} has no file name (it would be a hidden folder): "
                         f"name the file, e.g. samples{path.name.lower()}")
    suffix = path.suffix.lower()
    if suffix in (".png", ".npz"):
        return suffix
    if suffix == "" or path.is_dir():
        return ""
    raise ValueError(f"unsupported output {text}: use .png (grid), .npz or a folder (end a "
                     "folder name that has a dot with '/')")


def check_output(out, *, toy: bool = False) -> Path:
    """Raise ValueError now, before any sampling, if ``save_samples`` could not write ``out``:
    an unsupported suffix, a file where a folder is meant (or the reverse), a parent that is
    not a writable folder."""
    suffix = output_kind(out)
    out = Path(out)
    if toy and suffix == "":
        raise ValueError("toy samples are written as a .png plot or an .npz file")
    if toy and suffix == ".png":
        from ..optional import require

        require("matplotlib", "a .png plot of toy samples (.npz needs nothing more)")
    if suffix and out.is_dir():
        raise ValueError(f"output {out} is an existing folder, not a {suffix} file")
    if not suffix and out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is an existing file, not a folder (or name a .png "
                         "grid or an .npz file)")
    check_writable_folder(out.parent if suffix else out, out)
    return out


def seed_array(seeds) -> np.ndarray:
    """Seeds as integers: int64, or uint64 when one is >= 2^63 (seeds span [0, 2^64); numpy
    would turn such a mix into float64 and round the large ones)."""
    seeds = [int(s) for s in seeds]
    return np.asarray(seeds, dtype=np.uint64 if seeds and max(seeds) >= 2**63 else np.int64)


def save_samples(samples: torch.Tensor, out, *, seeds, labels=None, mixture=None,
                 title: str = "") -> Path:
    """Dispatch on ``out`` (suffix in any case): *.npz -> arrays; *.png -> grid (images) or
    scatter (toy data); no suffix -> a folder of per-seed PNGs."""
    suffix = output_kind(out)
    out = check_output(out, toy=samples.ndim == 2)
    if suffix == ".npz":
        return save_npz(samples, out, seeds=seed_array(seeds),
                        labels=None if labels is None else np.asarray(labels))
    if samples.ndim == 2:
        return plot_toy(samples, out, mixture, title=title)
    if suffix == ".png":
        return save_grid(samples, out)
    save_per_seed(samples, seeds, out)
    return out
