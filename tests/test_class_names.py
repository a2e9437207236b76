"""The Python API by class name: ``Sampler.class_names`` (the names a checkpoint stores, e.g. an
image folder's subfolders), ``class_labels`` given as a name or a list of names, and
``images.to_pil_images`` for PIL images of the samples."""

import numpy as np
import pytest
import torch
from PIL import Image

from edm_fast import Sampler
from edm_fast.io.checkpoints import read_checkpoint, save_checkpoint
from edm_fast.io.samples import save_grid, to_pil_images
from edm_fast.io.models import bundled_path

SEEDS = range(4)


def _sampler(model="default"):
    return Sampler(model, num_steps=3, batch_size=4, device="cpu", backend="reference")


@pytest.fixture(scope="module")
def digits():
    return _sampler()


def _with_names(tmp_path, names) -> str:
    """The bundled digits model saved again with other stored class names (as a training run
    on an image folder stores its subfolder names)."""
    tensors, meta = read_checkpoint(bundled_path("default"))
    meta["data"]["class_names"] = names
    return str(save_checkpoint(tmp_path / "named.safetensors", tensors, meta))


def test_digits_model_lists_its_classes(digits):
    assert digits.class_names == [str(k) for k in range(10)]
    assert digits.class_index("7") == 7


def test_a_name_or_a_list_of_names_samples_like_the_indices(digits):
    assert torch.equal(digits(SEEDS, class_labels="3"), digits(SEEDS, class_labels=3))
    by_index = digits(SEEDS, class_labels=[1, 2, 3, 4])
    assert torch.equal(digits(SEEDS, class_labels=["1", "2", "3", "4"]), by_index)
    assert torch.equal(digits(SEEDS, class_labels=("1", "2", "3", "4")), by_index)
    assert torch.equal(digits(SEEDS, class_labels=np.array(["1", "2", "3", "4"])), by_index)


def test_folder_names_select_their_classes(tmp_path):
    names = ["cat", "dog", *(f"class{k}" for k in range(2, 10))]
    sampler = _sampler(_with_names(tmp_path, names))
    assert sampler.class_names == names
    assert torch.equal(sampler(SEEDS, class_labels="dog"), sampler(SEEDS, class_labels=1))
    assert torch.equal(sampler(SEEDS, class_labels=["cat", "dog", "cat", "dog"]),
                       sampler(SEEDS, class_labels=[0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"unknown class 'bird'.*'cat', 'dog', 'class2'"):
        sampler(SEEDS, class_labels="bird")
    with pytest.raises(ValueError, match=r"unknown class 'bird'"):  # one bad name in a list
        sampler(SEEDS, class_labels=["cat", "bird", "dog", "cat"])


def test_model_without_names_says_so(tmp_path):
    sampler = _sampler(_with_names(tmp_path, []))
    assert sampler.class_names == []
    with pytest.raises(ValueError, match=r"stores no class names: pass indices 0\.\.9"):
        sampler(SEEDS, class_labels="cat")
    assert sampler(SEEDS, class_labels=2).shape == (4, 1, 16, 16)


def test_unconditional_model_has_no_classes():
    sampler = Sampler("toy-gmm", num_steps=3, batch_size=4, device="cpu")
    assert sampler.class_names == []
    with pytest.raises(ValueError, match="unconditional"):
        sampler(SEEDS, class_labels="cat")


def test_to_pil_images(digits, tmp_path):
    samples = digits(SEEDS, class_labels="5")
    images = to_pil_images(samples)
    assert len(images) == 4 and all(isinstance(im, Image.Image) for im in images)
    assert images[0].mode == "L" and images[0].size == (16, 16)
    expected = ((samples[0, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(images[0]), expected)
    rgb = to_pil_images(torch.linspace(-2, 2, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5))
    assert rgb[1].mode == "RGB" and rgb[1].size == (5, 4)
    assert np.asarray(rgb[0]).min() == 0 and np.asarray(rgb[1]).max() == 255  # clipped
    with pytest.raises(ValueError, match="for one image use samples"):
        to_pil_images(samples[0])
    path = save_grid(samples, tmp_path / "grid.png", nrow=4)  # all of them in one PNG
    with Image.open(path) as grid:
        assert grid.width > grid.height
