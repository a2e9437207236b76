"""Exported programs (.pt2 / .ts) run code when loaded: only those edm-fast wrote on this
machine (their digest recorded at export) load without the user vouching for them."""

import shutil
import subprocess
import sys

import pytest
import torch

from edm_fast.errors import BadFileError
from edm_fast.io.export import export_torchscript, read_metadata
from edm_fast.io.exported import ExportedDenoiser
from edm_fast.io.model_card import model_card
from edm_fast.io.models import load_denoiser
from edm_fast.io.trusted_exports import UntrustedExportError, check_trusted, file_digest, store_path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    den = load_denoiser("default")
    return export_torchscript(den, (2, *model_card(den).sample_shape),
                              path=tmp_path_factory.mktemp("trust") / "d.ts")


def test_an_export_edm_fast_wrote_loads_and_its_copy_too(exported, tmp_path):
    """The digest is of the bytes: a copy under another name is the same program."""
    assert file_digest(exported) in store_path().read_text()
    copy = shutil.copy(exported, tmp_path / "copy.ts")
    loaded = ExportedDenoiser(copy)
    x = torch.zeros(3, *loaded.sample_shape)
    assert loaded(x, torch.ones(3)).shape == x.shape


def test_a_foreign_or_altered_program_is_refused_unless_trusted(exported, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("EDM_FAST_TRUSTED_EXPORTS", str(tmp_path / "empty-store"))
    with pytest.raises(UntrustedExportError, match="did not write this file") as info:
        ExportedDenoiser(exported)
    assert "\n" not in str(info.value) and isinstance(info.value, BadFileError)
    ExportedDenoiser(exported, trusted=True)  # the caller vouches for it
    monkeypatch.setenv("EDM_FAST_TRUST_EXPORTS", "1")
    ExportedDenoiser(exported)
    monkeypatch.delenv("EDM_FAST_TRUST_EXPORTS")
    monkeypatch.undo()  # the real store again: one changed byte is another program
    altered = tmp_path / "altered.ts"
    data = bytearray(open(exported, "rb").read())
    data[-30] ^= 1
    altered.write_bytes(bytes(data))
    with pytest.raises(UntrustedExportError):
        check_trusted(altered)


def test_cli_sample_of_a_foreign_program_is_one_line(exported, tmp_path):
    env_store = tmp_path / "other-store"
    res = subprocess.run([sys.executable, "-m", "edm_fast", "sample", "--ckpt", str(exported),
                          "--seeds", "0-1", "--steps", "2", "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ,
                              "EDM_FAST_TRUSTED_EXPORTS": str(env_store)})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "EDM_FAST_TRUST_EXPORTS=1" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_metadata_entry_size_is_checked_before_reading(tmp_path):
    """A zip whose metadata entry declares a huge size (a zip bomb) is refused from the zip
    directory, before anything is decompressed."""
    import zipfile

    bomb = tmp_path / "bomb.ts"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/extra/edm_fast_metadata.txt", b"\0" * (4 << 20))
    with pytest.raises(BadFileError, match="declares"):
        read_metadata(bomb)
