"""Write a labelled 64x64 RGB image folder, ``OUT/<label>/<n>.jpg``, from the real photographs
that ship inside scikit-image and scikit-learn (no download).

    python bench/photo_folder.py --out data/photos                 # 6 classes x 300 crops
    python bench/photo_folder.py --out /tmp/photos --per-class 20  # a quick one

No labelled RGB data set ships inside a package on PyPI that we could find (CIFAR-10, STL-10,
Tiny ImageNet, MedMNIST and friends are downloaders), so this folder is the stand-in for "your
own pictures": each class is one photograph (``cat`` is scikit-image's Chelsea, ``coffee`` its
coffee cup, ``rocket``, ``astronaut``; ``temple`` and ``flower`` are scikit-learn's sample
images), and each image is a random square crop of it (side 30-70% of the shorter side, random
position, mirrored with probability 1/2) resized to --resolution with Lanczos and saved as JPEG.
It is real RGB texture and colour, not object categories: the crops of one class overlap, so a
classifier's held-out accuracy on it is optimistic, and a generator can reach it by copying
textures. The crops are drawn from --seed, so the folder is the same on every machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _photos() -> dict[str, np.ndarray]:
    """The class name -> (H, W, 3) uint8 photograph."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        sys.exit(f"error: this script needs scikit-image and scikit-learn ({err.name} is missing): "
                 "python -m pip install scikit-image scikit-learn")
    temple, flower = load_sample_images().images
    return {"cat": skimage.data.chelsea(), "coffee": skimage.data.coffee(),
            "rocket": skimage.data.rocket(), "astronaut": skimage.data.astronaut(),
            "temple": temple, "flower": flower}


def random_crops(photo: np.ndarray, count: int, resolution: int,
                 rng: np.random.Generator) -> list:
    """`count` random square crops of `photo` (side 30-70% of its shorter side, mirrored with
    probability 1/2), each resized to `resolution` x `resolution`, as PIL images."""
    from PIL import Image

    height, width = photo.shape[:2]
    image = Image.fromarray(photo[..., :3])
    crops = []
    for _ in range(count):
        side = int(rng.uniform(0.3, 0.7) * min(height, width))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = image.crop((left, top, left + side, top + side))
        crop = crop.resize((resolution, resolution), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(crop)
    return crops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (label/<n>.jpg)")
    parser.add_argument("--per-class", type=int, default=300, help="crops per class")
    parser.add_argument("--resolution", type=int, default=64, help="side of each image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crop positions")
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.resolution < 8:
        parser.error("--per-class must be >= 1 and --resolution >= 8")
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    for label, photo in _photos().items():
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for n, crop in enumerate(random_crops(photo, args.per_class, args.resolution, rng)):
            crop.save(folder / f"{n:04d}.jpg", quality=95)
    print(f"wrote {6 * args.per_class} images of {args.resolution}x{args.resolution} in 6 classes "
          f"to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
