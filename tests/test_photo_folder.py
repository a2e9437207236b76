"""bench/photo_folder.py: the labelled RGB folder cut from the photos inside scikit-image and
scikit-learn, which the own-pictures recipe (bench/own_pictures_recipe.py) trains on."""

import hashlib
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from edm_fast.train.data import load_dataset  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "photo_folder.py"


@pytest.fixture(scope="module")
def photo_folder():
    spec = importlib.util.spec_from_file_location("photo_folder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digest(folder: Path) -> str:
    files = sorted(folder.rglob("*.jpg"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def test_the_folder_loads_as_six_labelled_rgb_classes(photo_folder, tmp_path):
    assert photo_folder.main(["--out", str(tmp_path / "a"), "--per-class", "3"]) == 0
    data = load_dataset(str(tmp_path / "a"), resolution=64, progress=False)
    assert len(data) == 18 and data.num_classes == 6
    assert data.class_names == ["astronaut", "cat", "coffee", "flower", "rocket", "temple"]
    x, label = data[0]
    assert tuple(x.shape) == (3, 64, 64) and -1 <= float(x.min()) < float(x.max()) <= 1
    # the crops are random but drawn from --seed: the same seed writes the same files
    assert photo_folder.main(["--out", str(tmp_path / "b"), "--per-class", "3"]) == 0
    assert photo_folder.main(["--out", str(tmp_path / "c"), "--per-class", "3",
                              "--seed", "1"]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_bad_sizes_are_refused(photo_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        photo_folder.main(["--out", str(tmp_path), "--per-class", "0"])
    assert exit_info.value.code == 2 and "--per-class" in capsys.readouterr().err
