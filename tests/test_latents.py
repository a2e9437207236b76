"""Decoding the latents of official EDM2 img512 models with a user's VAE (edm_fast.io.latents,
``edm-fast sample --vae``).

A tiny random diffusers AutoencoderKL (4 latent channels, 2x upsampling) saved with
``save_pretrained`` stands in for stabilityai/sd-vae-ft-mse, and a 4-channel tiny-edm2
checkpoint carrying an official StabilityVAEEncoder record (NVlabs' raw mean/std for that VAE)
stands in for an img512 snapshot.
"""

import json
import sys

import numpy as np
import pytest
import torch

from edm_fast.cli.main import main
from edm_fast.io.checkpoints import net_spec, save_checkpoint
from edm_fast.io.latents import (LatentDecodingError, VaeFolderError, check_vae, decode_latents,
                                 encoder_record, load_vae)
from edm_fast.io.model_card import ModelCard
from edm_fast.optional import MissingDependency
from edm_fast.precond import EDMPrecond

RAW_MEAN, RAW_STD = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]  # NVlabs' defaults
SCALE = [0.5 / s for s in RAW_STD]
ENCODER = {"class": "StabilityVAEEncoder", "vae_name": "stabilityai/sd-vae-ft-mse",
           "scale": SCALE, "bias": [-m * s for m, s in zip(RAW_MEAN, SCALE)], "batch_size": 8}
CARD = ModelCard(source="edm2-img8-tiny", sample_shape=(4, 8, 8),
                 config={"official": {"encoder": ENCODER}})


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


def _checkpoint(path, encoder=ENCODER):
    """A 4-channel 8x8 tiny-edm2 checkpoint; ``encoder`` is its official encoder record."""
    torch.manual_seed(0)
    from edm_fast.nets import build_net

    spec = net_spec("tiny-edm2", img_resolution=8, img_channels=4, label_dim=0)
    net = build_net("tiny-edm2", img_resolution=8, img_channels=4, label_dim=0)
    meta = {"net": spec, "precond": EDMPrecond().config(), "sample_shape": [4, 8, 8]}
    if encoder is not None:
        meta["official"] = {"encoder": encoder}
    save_checkpoint(path, {f"ema.{k}": v for k, v in net.state_dict().items()}, meta)
    return path


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("model") / "latent.safetensors")


def _latents(n=3, dtype=torch.float64):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_decode_equals_the_manual_diffusers_decode(vae_dir, dtype, tol):
    """decode_latents in chunks of 2 = one diffusers decode of (x - bias) / scale over the whole
    batch, mapped from [0, 1] to [-1, 1]. The two differ only in summation order (batching):
    1e-12 in float64, 1e-5 in float32 (outputs are O(1))."""
    vae = load_vae(vae_dir)
    x = _latents(dtype=dtype)
    got = decode_latents(x, vae, CARD, batch_size=2)
    assert got.dtype == dtype and next(vae.parameters()).dtype == dtype  # dtype follows x
    scale = torch.tensor(SCALE, dtype=dtype).reshape(1, 4, 1, 1)
    bias = torch.tensor(ENCODER["bias"], dtype=dtype).reshape(1, 4, 1, 1)
    with torch.no_grad():
        want = vae.decode((x - bias) / scale).sample * 2 - 1
    assert got.shape == (3, 3, 16, 16)
    assert (got - want).abs().max().item() <= tol
    assert want.std().item() > 0.05  # a decoder that ignored its input would not pass above


class PassThroughVae(torch.nn.Module):
    """A VAE whose decode returns its input: decode_latents then shows z = (x - bias) / scale."""

    class config:
        latent_channels = 4

    def decode(self, z):
        class Output:
            sample = z
        return Output


def test_scale_and_bias_are_per_channel_and_in_order():
    """Latents made the way NVlabs' encoder makes them, x = z * scale + bias per channel, give
    back z exactly (to 1e-12 in float64). Swapping scale and bias, applying them in the other
    order ((x / scale) - bias) or to the wrong channels misses z by more than 0.1."""
    z = _latents()
    scale = torch.tensor(SCALE, dtype=torch.float64).reshape(1, 4, 1, 1)
    bias = torch.tensor(ENCODER["bias"], dtype=torch.float64).reshape(1, 4, 1, 1)
    x = z * scale + bias
    got = (decode_latents(x, PassThroughVae(), CARD) + 1) / 2
    assert (got - z).abs().max().item() <= 1e-12
    wrong = {"swapped": (x - scale) / bias, "other order": x / scale - bias,
             "channels reversed": (x - bias.flip(1)) / scale.flip(1)}
    for name, value in wrong.items():
        assert (value - z).abs().max().item() > 0.1, name


def test_card_denoiser_and_record_are_all_accepted(latent_ckpt):
    from edm_fast.io.models import load_model

    denoiser, card = load_model(latent_ckpt)
    assert encoder_record(card)["scale"] == SCALE
    assert encoder_record(denoiser)["bias"] == ENCODER["bias"]
    x = _latents(n=1)
    a = decode_latents(x, PassThroughVae(), card)
    b = decode_latents(x, PassThroughVae(), ENCODER)
    assert torch.equal(a, b)


def test_cli_decodes_into_png_grid_folder_and_npz(vae_dir, latent_ckpt, tmp_path, capsys):
    """--vae writes RGB images of the VAE's output size (16x16 from 8x8 latents), and its .npz
    equals decode_latents of the latents the same command writes without --vae (same seeds,
    same batches: 1e-5, float32 summation order inside the VAE)."""
    from PIL import Image

    common = ["sample", "--ckpt", str(latent_ckpt), "--seeds", "0-2", "--steps", "2",
              "--device", "cpu", "--backend", "reference", "--batch", "2"]
    assert main([*common, "--vae", str(vae_dir), "--out", str(tmp_path / "grid.png")]) == 0
    assert "VAE decoding" in capsys.readouterr().out
    with Image.open(tmp_path / "grid.png") as img:
        assert img.mode == "RGB"
    assert main([*common, "--vae", str(vae_dir), "--out", str(tmp_path / "seeds/")]) == 0
    for seed in range(3):
        with Image.open(tmp_path / "seeds" / f"seed{seed:06d}.png") as img:
            assert img.mode == "RGB" and img.size == (16, 16)
    assert main([*common, "--vae", str(vae_dir), "--vae-batch", "1",
                 "--out", str(tmp_path / "images.npz")]) == 0
    assert main([*common, "--out", str(tmp_path / "latents.npz")]) == 0
    images = torch.from_numpy(np.load(tmp_path / "images.npz")["samples"])
    latents = torch.from_numpy(np.load(tmp_path / "latents.npz")["samples"])
    assert latents.shape == (3, 4, 8, 8) and images.shape == (3, 3, 16, 16)
    want = decode_latents(latents, load_vae(vae_dir), CARD)
    assert (images - want).abs().max().item() <= 1e-5


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_refusals(vae_dir, latent_ckpt, tmp_path, capsys, monkeypatch):
    base = ["sample", "--ckpt", str(latent_ckpt), "--seeds", "0", "--steps", "2",
            "--device", "cpu", "--backend", "reference"]
    # a PNG of latents without --vae names --vae (a grid and a folder alike)
    for out in ("x.png", "folder/"):
        err = _error([*base, "--out", str(tmp_path / out)], capsys)
        assert "4-channel latents of the VAE stabilityai/sd-vae-ft-mse" in err and "--vae" in err
    # a missing folder, a folder without config.json, another class, no safetensors weights
    with pytest.raises(VaeFolderError, match="does not exist: expected a local diffusers"):
        load_vae(tmp_path / "nowhere")
    err = _error([*base, "--vae", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a.png")],
                 capsys)
    assert "VAE folder" in err and "does not exist" in err
    empty = tmp_path / "empty"
    (empty / "vae").mkdir(parents=True)
    (empty / "vae" / "config.json").write_text("{}")
    with pytest.raises(VaeFolderError, match="no config.json.*name its vae/ subfolder"):
        load_vae(empty)
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(VaeFolderError, match="holds a UNet2DModel, not an AutoencoderKL"):
        load_vae(other)
    (other / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(VaeFolderError, match="no diffusion_pytorch_model.safetensors"):
        load_vae(other)
    # a model without an encoder record, and one whose encoder gives pixels
    plain = _checkpoint(tmp_path / "plain.safetensors", encoder=None)
    err = _error(["sample", "--ckpt", str(plain), "--seeds", "0", "--steps", "2", "--device",
                  "cpu", "--vae", str(vae_dir), "--out", str(tmp_path / "p.png")], capsys)
    assert "records no VAE encoder: it is not a latent model" in err
    assert not (tmp_path / "p.png").exists()
    with pytest.raises(LatentDecodingError, match="not StabilityVAEEncoder"):
        decode_latents(_latents(), PassThroughVae(), {"class": "StandardRGBEncoder"})
    # channels: a record of 3 channels against a 4-channel VAE and latents
    three = dict(ENCODER, scale=SCALE[:3], bias=ENCODER["bias"][:3])
    with pytest.raises(LatentDecodingError, match="VAE has 4 latent channels, the model's "
                       "encoder record 3, the latents 4"):
        check_vae(PassThroughVae(), three, 4)
    with pytest.raises(LatentDecodingError, match="the latents 3"):
        decode_latents(_latents()[:, :3], PassThroughVae(), CARD)
    # diffusers missing: the error names the vae extra, in the API and the CLI
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with pytest.raises(MissingDependency, match='python -m pip install "edm-fast\\[vae\\]"'):
        load_vae(vae_dir)
    err = _error([*base, "--vae", str(vae_dir), "--out", str(tmp_path / "b.png")], capsys)
    assert "needs diffusers" in err and 'pip install "edm-fast[vae]"' in err
