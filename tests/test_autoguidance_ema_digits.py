"""bench/autoguidance_ema_digits.py: what it refuses before any training or sampling (a main run
without power-EMA snapshots, a main run that is not an EDM2 class-conditional digits run,
option values that cannot work), the options --quick sets, and the rows it measures."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from edm_fast.io.checkpoints import net_spec
from edm_fast.train.phema_snapshots import save_snapshot

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "autoguidance_ema_digits.py"


@pytest.fixture(scope="module")
def agema():
    spec = importlib.util.spec_from_file_location("autoguidance_ema_digits", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclass
    spec.loader.exec_module(module)  # resolves its annotations through sys.modules
    return module


def _fake_run(folder: Path, *, preset="tiny-edm2", label_dim=10, data="digits") -> Path:
    """A run folder holding two power-EMA snapshots whose metadata describes ``preset`` on
    ``data``; the tensors are placeholders (only the metadata is read before training)."""
    folder.mkdir(parents=True)
    meta = {"net": net_spec(preset, img_resolution=16, img_channels=1, label_dim=label_dim),
            "data": {"name": data, "spec": data, "num_classes": 10}, "sample_shape": [1, 16, 16]}
    for sigma_rel in (0.05, 0.10):
        save_snapshot(folder, {"placeholder": torch.zeros(1)}, meta, nimg=512,
                      sigma_rel=sigma_rel)
    return folder


def _refusal(agema, capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        agema.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("make", ["empty", "missing", "checkpoints only"])
def test_a_main_run_without_snapshots_is_refused_in_one_line(agema, capsys, tmp_path, make):
    run = tmp_path / "run"
    if make != "missing":
        run.mkdir()
    if make == "checkpoints only":  # an EDM run: checkpoints, no phema-*.safetensors
        (run / "ckpt-00000001.safetensors").write_bytes(b"not read")
    err = _refusal(agema, capsys, ["--main-run", str(run), "--out", str(tmp_path / "out")])
    assert len(err.strip().splitlines()) == 1 and "must be an EDM2 run with snapshots" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("kind,expected", [
    (dict(preset="tiny"), "'ddpmpp' net"),
    (dict(label_dim=0), "not a class-conditional digits run"),
])
def test_a_main_run_of_another_kind_is_refused(agema, capsys, tmp_path, kind, expected):
    run = _fake_run(tmp_path / "run", **kind)
    err = _refusal(agema, capsys, ["--main-run", str(run), "--out", str(tmp_path / "out")])
    assert len(err.strip().splitlines()) == 1 and expected in err


@pytest.mark.parametrize("option,value,expected", [
    ("--guide-channels", "4", "heads"),          # tiny-edm2's attention heads are 16 wide
    ("--nfe", "34", "--nfe must be odd"),
    ("--main-sigma-rel", "0.05,0.4", "sigma_rel must lie in"),
    ("--weights", "", "--weights is empty"),
    ("--interval", "0.3", "--interval takes 'lo,hi'"),
    ("--guide-kimg", "0", "--guide-kimg must be > 0"),
])
def test_option_values_that_cannot_work_are_refused(agema, capsys, tmp_path, option, value,
                                                    expected):
    run = _fake_run(tmp_path / "run")
    err = _refusal(agema, capsys, ["--main-run", str(run), "--out", str(tmp_path / "out"),
                                   option, value])
    assert expected in err


def test_the_default_guide_has_a_quarter_of_the_main_nets_parameters(agema, tmp_path):
    args = agema.parse_args(["--main-run", str(_fake_run(tmp_path / "run")), "--out", "x"])
    assert (args.main_params, args.guide_params) == (300_832, 75_432)  # exact: fixed nets
    assert args.main_srs == [0.05, 0.1, 0.15] and args.guide_srs == [0.05, 0.1, 0.2]
    assert args.weight_list == [1.2, 1.5, 2.0] and args.interval_pair is None


def test_quick_keeps_one_sigma_rel_each_and_one_weight(agema, tmp_path):
    args = agema.parse_args(["--main-run", str(_fake_run(tmp_path / "run")), "--out", "x",
                             "--quick", "--main-sigma-rel", "0.1,0.15"])
    assert (args.guide_kimg, args.samples, args.repeats, args.nfe) == (1.0, 60, 2, 7)
    assert args.main_srs == [0.1] and args.guide_srs == [0.05] and args.weight_list == [1.5]


def test_rows_cover_every_ema_pair_and_weight(agema):
    rows = agema.make_variants([0.05, 0.1], [0.05, 0.2], [1.2, 2.0], (0.28, 5.42))
    kinds = [v.kind for v in rows]
    assert kinds.count("unguided") == 2 and kinds.count("guide alone") == 2
    guided = {(v.main_sigma_rel, v.guide_sigma_rel, v.weight, v.interval)
              for v in rows if v.kind == "autoguidance"}
    assert len(guided) == kinds.count("autoguidance") == 2 * 2 * 2 * 2  # x (plain, interval)
    assert len({v.name for v in rows}) == len(rows)  # names key the paired differences
