"""Small data fixtures written from scratch, shared by the data and notebook tests: MNIST IDX
files (byte by byte, independently of the parser) and an image folder ``<label>/<file>``."""

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(root: Path, images: np.ndarray, labels: np.ndarray, *, prefix="train",
                 gz=False) -> None:
    for kind, arr, n in (("images", images, 3), ("labels", labels, 1)):
        name = f"{prefix}-{kind}-idx{n}-ubyte" + (".gz" if gz else "")
        raw = idx_bytes(arr)
        (root / name).write_bytes(gzip.compress(raw) if gz else raw)


def fake_mnist(n=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return images, rng.integers(0, 10, size=n).astype(np.uint8)


def make_image_folder(root: Path) -> dict[str, tuple[str, int]]:
    """Two classes, files of several sizes/modes/formats; returns {file: (class, label)}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    specs = {
        "cat/a.jpg": ("RGB", (80, 60), 200),   # bright
        "cat/b.png": ("RGBA", (40, 50), 200),
        "cat/sub/c.bmp": ("L", (64, 64), 200),
        "dog/d.JPEG": ("RGB", (30, 90), 30),   # dark
        "dog/e.png": ("P", (70, 70), 30),
        "dog/f.webp": ("RGB", (100, 100), 30),
    }
    for name, (mode, size, level) in specs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = np.clip(level + rng.integers(-20, 20, size=(size[1], size[0], 3)), 0, 255)
        im = Image.fromarray(arr.astype(np.uint8))
        if mode == "RGBA":
            im = im.convert("RGBA")  # opaque alpha
        elif mode == "P":
            im = im.quantize(16)
        elif mode == "L":
            im = im.convert("L")
        im.save(path)
    (root / "cat" / "notes.txt").write_text("not an image")
    return {name: (name.split("/")[0], 0 if name.startswith("cat") else 1) for name in specs}
