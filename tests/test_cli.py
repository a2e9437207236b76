"""The CLI end to end: bundled-model sampling, outputs, and torchrun seed sharding."""

import subprocess
import sys

import numpy as np


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "edm_fast", *args], capture_output=True,
                          text=True, **kw)


def test_default_sample_command_writes_a_grid(tmp_path):
    """`edm-fast sample --steps 18` with the bundled model: a PNG grid, in seconds."""
    out = tmp_path / "samples.png"
    res = _run(["sample", "--steps", "18", "--seeds", "0-15", "--out", str(out)])
    assert res.returncode == 0, res.stderr
    from PIL import Image

    img = Image.open(out)
    assert img.size[0] > 64 and "16 samples" in res.stdout


def test_sample_outputs_npz_and_folder(tmp_path):
    res = _run(["sample", "--steps", "4", "--seeds", "3,5", "--class", "7", "--out",
                str(tmp_path / "x.npz")])
    assert res.returncode == 0, res.stderr
    data = np.load(tmp_path / "x.npz")
    assert data["samples"].shape == (2, 1, 16, 16) and list(data["labels"]) == [7, 7]
    res = _run(["sample", "--steps", "4", "--seeds", "3,5", "--out", str(tmp_path / "dir")])
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["seed000003.png",
                                                                     "seed000005.png"]
    res = _run(["sample", "--steps", "4", "--class", "12", "--out", str(tmp_path / "y.png")])
    assert res.returncode != 0 and "--class must be in 0..9" in res.stderr


def test_torchrun_shards_seeds_and_matches_single_process(tmp_path):
    """torchrun --nproc_per_node=2 -m edm_fast sample: each rank samples seeds[rank::2] and
    writes its own file; together they equal a single-process run seed for seed (to float
    rounding of the net at a different batch size: 1e-5)."""
    single = tmp_path / "one.npz"
    res = _run(["sample", "--steps", "6", "--seeds", "0-7", "--out", str(single)])
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "edm_fast", "sample", "--steps", "6",
                          "--seeds", "0-7", "--device", "cpu", "--out", str(tmp_path / "d.npz")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ref = np.load(single)
    by_seed = dict(zip(ref["seeds"].tolist(), ref["samples"]))
    seen = []
    for rank in (0, 1):
        part = np.load(tmp_path / f"d.rank{rank}.npz")
        assert part["seeds"].tolist() == list(range(rank, 8, 2))
        for seed, sample in zip(part["seeds"].tolist(), part["samples"]):
            assert np.allclose(sample, by_seed[seed], atol=1e-5), seed
            seen.append(seed)
    assert sorted(seen) == list(range(8))
    assert "8 samples" in res.stdout


def test_compare_command_writes_report(tmp_path):
    """`edm-fast compare` on the bundled EDM and DDPM models, tiny sample counts."""
    res = _run(["compare", "--samples", "10", "--repeats", "2", "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    table = (tmp_path / "digits_table.md").read_text()
    assert "DDPM ancestral" in table and "EDM Heun" in table and "real data" in table
    assert (tmp_path / "digits_quality_vs_nfe.png").stat().st_size > 1000
