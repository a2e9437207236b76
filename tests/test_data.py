"""Tests for edm_fast.train.data: IDX parsing, image folders, digits, toy data, the infinite loader."""

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import fake_mnist, idx_bytes, make_image_folder, write_mnist

from edm_fast.train import data, datasets, image_folder

#----------------------------------------------------------------------------
# MNIST IDX files, written byte by byte by data_fixtures (independently of the parser).


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    images, labels = fake_mnist()
    write_mnist(tmp_path, images, labels, gz=gz)
    ds = data.load_mnist(tmp_path)
    assert len(ds) == 5 and ds.shape == (1, 28, 28) and ds.num_classes == 10
    x, y = ds[3]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.ndim == 0
    np.testing.assert_allclose(((x[0] + 1) * 127.5).round().numpy(), images[3])
    assert int(y) == labels[3]
    parsed = data.read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    np.testing.assert_array_equal(parsed, images)


def test_mnist_padding_centres_digit(tmp_path):
    images = np.full((2, 28, 28), 255, dtype=np.uint8)  # a "digit" that fills its 28x28 box
    write_mnist(tmp_path, images, np.array([3, 7], dtype=np.uint8))
    ds = data.load_dataset(f"mnist:{tmp_path}", resolution=64)  # resolution >= 28 pads
    x, y = ds[1]
    assert x.shape == (1, 64, 64) and ds.resolution == 64 and int(y) == 7
    assert torch.all(x[:, 18:46, 18:46] == 1.0)  # 18 = (64 - 28) / 2 on every side
    border = torch.ones_like(x, dtype=torch.bool)
    border[:, 18:46, 18:46] = False
    assert torch.all(x[border] == -1.0)
    assert data.load_mnist(tmp_path, pad_to=32, resolution=16)[0][0].shape == (1, 16, 16)


def test_mnist_split_all_and_test(tmp_path):
    write_mnist(tmp_path, *fake_mnist(5))
    write_mnist(tmp_path, *fake_mnist(3, seed=1), prefix="t10k", gz=True)
    assert len(data.load_mnist(tmp_path, split="test")) == 3
    assert len(data.load_mnist(tmp_path, split="all")) == 8


def test_idx_errors(tmp_path):
    images, labels = fake_mnist()
    good = idx_bytes(images)
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad_magic)
    truncated = tmp_path / "trunc"
    truncated.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(truncated)
    labels_file = tmp_path / "labels"
    labels_file.write_bytes(idx_bytes(labels))
    with pytest.raises(ValueError, match="dimensions"):
        data.read_idx(labels_file, ndim=3)  # a labels file where images are expected
    corrupt_gz = tmp_path / "corrupt.gz"
    corrupt_gz.write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(ValueError, match="corrupt.gz"):
        data.read_idx(corrupt_gz)
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    write_mnist(mismatch, images, labels[:4])
    with pytest.raises(ValueError, match="5 images .* 4 labels"):
        data.load_mnist(mismatch)
    with pytest.raises(FileNotFoundError, match="train-images"):
        data.load_mnist(tmp_path)  # a folder without MNIST files


def test_mnist_without_images_names_the_file(tmp_path):
    write_mnist(tmp_path, np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))  # valid, empty
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: holds no images"):
        data.load_mnist(tmp_path)

#----------------------------------------------------------------------------
# Image folders.


@pytest.mark.parametrize("cache", [True, False])
def test_image_folder(tmp_path, cache):
    make_image_folder(tmp_path)
    ds = data.load_dataset(str(tmp_path), resolution=32, cache=cache, progress=False)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 6
    assert ds.shape == (3, 32, 32) and ds.resolution == 32 and ds.num_channels == 3
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
        expect = 0 if "/cat/" in ds.files[i][0].as_posix() else 1
        assert int(y) == expect
        assert (x.mean() > 0.3) if expect == 0 else (x.mean() < -0.5)  # pixels match labels
    assert ds.skipped == []
    gray = data.ImageFolderDataset(tmp_path, resolution=16, channels=1, progress=False)
    assert gray[0][0].shape == (1, 16, 16)


def test_image_folder_skips_corrupt_files(tmp_path):
    from PIL import Image

    make_image_folder(tmp_path)
    junk = tmp_path / "dog" / "junk.jpg"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    full = tmp_path / "full.jpg"
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(full)
    truncated = tmp_path / "cat" / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    full.unlink()
    for cache in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = data.ImageFolderDataset(tmp_path, resolution=16, cache=cache, progress=False)
            if not cache:  # lazy: the truncated file fails only on access and is replaced
                i_bad = [str(p) for p, _ in ds.files].index(str(truncated))
                x, y = ds[i_bad]
                i_next = (i_bad + 1) % len(ds)
                assert x.shape == (3, 16, 16) and torch.equal(x, ds[i_next][0])
                assert int(y) == int(ds.labels[i_next])
                assert torch.equal(ds[i_bad][0], x)  # deterministic fallback, reported once
        messages = [str(w.message) for w in caught]
        for bad in (junk, truncated):  # reported by path
            assert sum(str(bad) in m for m in messages) == 1, messages
        skipped = {Path(p).name for p, _ in ds.skipped}
        assert skipped == {"junk.jpg", "truncated.jpg"}
        assert all(reason for _, reason in ds.skipped)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        data.load_dataset(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="<label>"):
        data.load_dataset(str(empty))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="directly"):
        data.load_dataset(str(flat))
    (flat / "only_bad").mkdir()
    (flat / "only_bad" / "y.jpg").write_bytes(b"garbage")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="none of the"):
        warnings.simplefilter("ignore")
        data.load_dataset(str(flat))
    with pytest.raises(ValueError, match="cannot parse"):
        data.load_dataset("toyy:gmm")


def test_16bit_png_scaled_by_bit_depth_not_content(tmp_path):
    from PIL import Image

    (tmp_path / "grey").mkdir()
    levels = [0, 255, 256, 257 * 100, 40000, 65535]  # 16-bit values; 8-bit expected = v / 257
    for i, v in enumerate(levels):
        path = tmp_path / "grey" / f"{i}.png"
        Image.fromarray(np.full((8, 8), v, np.uint16)).save(path)
        with Image.open(path) as im:  # a real 16-bit PNG, opened in a 16-bit mode
            assert im.mode in ("I;16", "I;16B", "I;16L", "I") and np.asarray(im).max() == v
    for channels in (1, 3):
        ds = data.ImageFolderDataset(tmp_path, resolution=8, channels=channels, progress=False)
        got = [int(ds.data[i].max()) for i in range(len(levels))]  # uint8 cache, in file order
        assert got == [round(v / 257) for v in levels] == [0, 1, 1, 100, 156, 255]
        assert all(ds.data[i].min() == ds.data[i].max() for i in range(len(levels)))
    dark = Image.fromarray(np.linspace(0, 1000, 64, dtype=np.uint16).reshape(8, 8))
    assert np.asarray(image_folder.to_mode(dark, 1)).max() == 4  # a dark image stays dark
    as_int32 = Image.fromarray(np.full((8, 8), 257 * 100, np.int32))  # older Pillow: mode 'I'
    assert as_int32.mode == "I" and np.asarray(image_folder.to_mode(as_int32, 1)).max() == 100
    keyed = np.zeros((8, 8), np.uint16)
    keyed[0] = 5
    Image.fromarray(keyed).save(tmp_path / "keyed.png", transparency=5)  # tRNS grey key
    with Image.open(tmp_path / "keyed.png") as im:
        out = np.asarray(image_folder.to_mode(im, 1))
    assert (out[0] == 255).all() and (out[1:] == 0).all()  # transparent -> white background


def test_image_folder_warns_about_loose_images(tmp_path):
    from PIL import Image

    make_image_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.ImageFolderDataset(tmp_path, resolution=8, progress=False)
    assert not any("directly" in str(w.message) for w in caught)
    for name in ("loose1.png", "loose2.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "readme.txt").write_text("not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.ImageFolderDataset(tmp_path, resolution=8, progress=False)
    loose = [str(w.message) for w in caught if "directly" in str(w.message)]
    assert len(loose) == 1 and "skipped 2 image" in loose[0] and "<label>" in loose[0]
    assert len(ds) == 6 and ds.class_names == ["cat", "dog"]



def test_image_folder_drops_a_class_with_no_readable_image(tmp_path):
    """A class whose only files are unreadable is dropped with a warning, and the labels after
    it renumbered, so a conditional net never gets a label without training images."""
    from PIL import Image

    for name, level in (("a", 10), ("c", 240)):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), (level,) * 3).save(tmp_path / name / "good.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "corrupt.jpg").write_bytes(b"not a jpeg")
    for cache in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = data.ImageFolderDataset(tmp_path, resolution=8, cache=cache, progress=False)
        assert ds.class_names == ["a", "c"] and ds.num_classes == 2
        assert ds.labels.tolist() == [0, 1] and [label for _, label in ds.files] == [0, 1]
        assert ds[1][0].mean() > 0.8 and int(ds[1][1]) == 1  # the bright image is class "c"
        dropped = [str(w.message) for w in caught if "class dropped" in str(w.message)]
        assert len(dropped) == 1 and str(tmp_path / "b") in dropped[0]


def test_image_folder_skips_hidden_folders_and_names_unread_formats(tmp_path):
    """Images inside a hidden folder of a class (.thumbs/) are not training data; image files in
    formats not read here (.gif, .tiff) are named in one warning; a note file raises nothing."""
    from PIL import Image

    make_image_folder(tmp_path)
    (tmp_path / "cat" / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / ".thumbs" / "a.jpg")
    for name in ("dog/g.gif", "dog/h.gif", "cat/i.tiff"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.ImageFolderDataset(tmp_path, resolution=8, progress=False)
    assert len(ds) == 6 and not any(".thumbs" in str(path) for path, _ in ds.files)
    messages = [str(w.message) for w in caught]
    unread = [m for m in messages if "formats not read" in m]
    assert len(unread) == 1 and "3 image file(s)" in unread[0]
    assert "2 .gif" in unread[0] and "1 .tiff" in unread[0]
    assert not any("notes.txt" in m for m in messages)  # the fixture's text file: no warning
    (tmp_path / "tiffs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "tiffs" / "only.tif")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.ImageFolderDataset(tmp_path, resolution=8, progress=False)
    ignored = [str(w.message) for w in caught if "folder ignored" in str(w.message)]
    assert ds.class_names == ["cat", "dog"] and len(ignored) == 1 and ".jpg" in ignored[0]

#----------------------------------------------------------------------------
# scikit-learn digits (real data).


def test_digits():
    ds = data.load_dataset("digits")
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.shape == (1, 16, 16)
    x, y = ds.get_batch(torch.arange(len(ds)))
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.99 and x.max() > 0.99
    means = torch.stack([x[y == c].mean(0).flatten() for c in range(10)])  # (10, 256)
    dist = torch.cdist(means, means)
    assert dist[~torch.eye(10, dtype=torch.bool)].min() > 1.0  # every class looks different
    assert data.load_dataset("digits:32")[0][0].shape == (1, 32, 32)
    assert data.load_dataset("digits", resolution=8)[5][0].shape == (1, 8, 8)
    assert data.load_dataset("digits", resolution=32, channels=3)[0][0].shape == (3, 32, 32)
    raw = data.load_digits(8)[0][0]
    padded = data.load_digits(16, pad_to=16)[0][0]
    assert torch.equal(padded[:, 4:12, 4:12], raw) and padded[:, :4].eq(-1).all()
    with pytest.raises(ValueError):
        data.load_dataset("digits", resolution=12)
    stats = data.dataset_stats(ds, max_items=500)
    assert stats["num_items"] == 500 and len(stats["mean"]) == 1
    assert 0.3 < stats["sigma_data"] < 0.9 and -1 < stats["mean"][0] < 0

#----------------------------------------------------------------------------
# Toy distributions.


@pytest.mark.parametrize("name,dim", [("gmm1d", 1), ("gmm2d", 2), ("moons", 2),
                                      ("swissroll", 2)])
def test_toy(name, dim):
    ds = data.load_dataset(f"toy:{name}", num_samples=4000, seed=3)
    x, y = ds[0]
    assert x.shape == (dim,) and ds.dim == dim and ds.resolution is None and ds.num_classes == 0
    assert int(y) == 0 and y.dtype == torch.int64
    again = data.load_dataset(f"toy:{name}", num_samples=4000, seed=3)
    assert torch.equal(ds.data, again.data)
    stats = data.dataset_stats(ds)
    assert 0.4 < stats["sigma_data"] < 0.6


def test_toy_mixtures_match_their_definition():
    m1, m2 = data.gmm1d(), data.gmm2d()
    assert m1.dim == 1 and m2.dim == 2
    x = data.load_toy("gmm2d", num_samples=20000).data.double()
    np.testing.assert_allclose(x.norm(dim=1).mean(), 0.7, atol=0.01)  # the ring of modes
    np.testing.assert_allclose(x.mean(0), m2.mean(), atol=0.02)
    x1 = data.load_toy("gmm1d", num_samples=20000).data.double()
    np.testing.assert_allclose((x1 < 0).double().mean(), 0.4, atol=0.02)  # weights 0.4 / 0.6
    with pytest.raises(ValueError, match="toy data have no resolution"):
        data.load_dataset("toy:gmm2d", resolution=64)
    with pytest.raises(ValueError, match="unknown toy"):
        data.load_dataset("toy:nope")

#----------------------------------------------------------------------------
# The infinite loader.


def test_rank_shards_disjoint_and_cover_epoch():
    size, b, world = 48, 4, 3
    seen = []
    for rank in range(world):
        s = data.InfiniteSampler(size, b, seed=7, rank=rank, world_size=world)
        seen.append(torch.cat([s.next_batch() for _ in range(size // (b * world))]))
    flat = torch.cat(seen)
    assert sorted(flat.tolist()) == list(range(size))  # disjoint and covering
    s0 = data.InfiniteSampler(size, b, seed=7)
    s0.next_batch()
    assert s0.state_dict()["position"] == b


def test_epochs_reshuffle_and_drop_last():
    s = data.InfiniteSampler(10, 3, seed=0)  # 9 of 10 used per epoch
    epochs = [torch.cat([s.next_batch() for _ in range(3)]) for _ in range(3)]
    assert all(len(set(e.tolist())) == 9 for e in epochs)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert s.epoch == 2 and s.position == 9
    t = data.InfiniteSampler(10, 3, seed=0, drop_last=False)  # batches run across epochs
    stream = torch.cat([t.next_batch() for _ in range(10)])  # 30 = 3 whole epochs
    for e in range(3):
        assert sorted(stream[10 * e:10 * e + 10].tolist()) == list(range(10))
    with pytest.raises(ValueError, match="smaller than one global batch"):
        data.InfiniteSampler(5, 3, world_size=2)


def test_resume_reproduces_batches():
    ds = data.load_toy("gmm2d", num_samples=50)
    a = data.infinite_loader(ds, 8, seed=11)
    for _ in range(9):  # past the first epoch boundary (6 batches per epoch)
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(5)]
    b = data.infinite_loader(ds, 8, seed=11)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, (next(b) for _ in range(5))):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    other = data.infinite_loader(ds, 8, seed=12)
    assert not torch.equal(next(other)[0], next(data.infinite_loader(ds, 8, seed=11))[0])
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_resume_with_workers_matches_in_process(tmp_path):
    ds = data.load_digits(8)
    ref = data.infinite_loader(ds, 16, seed=1)
    batches = [next(ref) for _ in range(6)]
    w = data.infinite_loader(data.load_digits(8), 16, seed=1, num_workers=1)
    first = [next(w) for _ in range(3)]
    state = w.state_dict()  # describes the 3 batches handed out, not the workers' prefetch
    resumed = data.infinite_loader(ds, 16, seed=1)
    resumed.load_state_dict(state)
    for (x, y), (xr, yr) in zip(first + [next(resumed) for _ in range(3)], batches):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def _tiny_images(n=24):
    """Small uint8 images resized and converted on access, like MNIST with a transform."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=gen)
    return data.ArrayDataset(x, torch.arange(n) % 3, name="tiny", class_names=["a", "b", "c"],
                             transform=datasets.fitter(pad_to=None, resolution=6, channels=3))


def test_workers_leave_global_rng_alone_and_match_in_process():
    ds = _tiny_images()
    ref = data.infinite_loader(ds, 4, seed=5)
    expected = [next(ref) for _ in range(8)]  # crosses the epoch boundary (6 batches/epoch)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    w = data.infinite_loader(ds, 4, seed=5, num_workers=2)
    got = [next(w) for _ in range(8)]
    assert torch.equal(torch.get_rng_state(), before)  # creating/iterating drew nothing
    for (x, y), (xw, yw) in zip(expected, got):
        assert xw.shape == (4, 3, 6, 6) and torch.equal(x, xw) and torch.equal(y, yw)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        data.infinite_loader(ds, 4, seed=5, num_workers=-1)


def test_resume_with_workers_is_bit_exact():
    ds = _tiny_images()
    torch.manual_seed(0)  # uninterrupted run: a batch, then training noise, each step
    full = data.infinite_loader(ds, 4, seed=9, num_workers=2)
    steps, saved = [], None
    for i in range(7):
        if i == 4:  # a checkpoint mid-epoch: stream and RNG state
            saved = full.state_dict(), torch.get_rng_state()
        x, y = next(full)
        steps.append((x, y, torch.randn(3)))
    resumed = data.infinite_loader(ds, 4, seed=9, num_workers=2)
    resumed.load_state_dict(saved[0])
    torch.set_rng_state(saved[1])
    for x, y, noise in steps[4:]:
        xr, yr = next(resumed)
        assert torch.equal(x, xr) and torch.equal(y, yr)
        assert torch.equal(noise, torch.randn(3))  # the loader's start did not shift the noise


def test_an_idx_folder_given_as_an_image_folder_gets_the_mnist_hint(tmp_path):
    """--data DIR where DIR holds MNIST IDX files: the error says to use mnist:DIR (it said the
    folder held no images)."""
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03")
    with pytest.raises(ValueError, match=f"use --data mnist:{tmp_path}"):
        data.load_dataset(str(tmp_path))
