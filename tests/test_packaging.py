"""Packaging promises: lean import, the CLI entry point, README and CI agree."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_does_not_initialise_cuda_or_load_extension():
    code = ("import sys, torch, edm_fast, edm_fast.sampling.reference, edm_fast.precond, edm_fast.sampling.sampler; "
            "assert not torch.cuda.is_initialized(); "
            "assert 'edm_fast._C' not in sys.modules; assert 'triton' not in sys.modules; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b and "pip install" in b).strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [line.strip() for line in ci]


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "edm_fast", "sample", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--S-churn" in out.stdout


def test_cli_toy_sample(tmp_path):
    """The newcomer command of the README, at a small size: writes a plot and an .npz."""
    for out in ("s.png", "s.npz"):
        res = subprocess.run([sys.executable, "-m", "edm_fast", "sample", "--model", "toy-gmm",
                              "--steps", "8", "--seeds", "0-199", "--backend", "reference",
                              "--out", str(tmp_path / out)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert (tmp_path / out).stat().st_size > 1000
    import numpy as np

    data = np.load(tmp_path / "s.npz")
    assert data["samples"].shape == (200, 2) and list(data["seeds"][:3]) == [0, 1, 2]


def test_cli_reports_bad_input(tmp_path):
    res = subprocess.run([sys.executable, "-m", "edm_fast", "sample", "--ckpt",
                          str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert res.returncode == 2 and "no model or checkpoint" in res.stderr
    res = subprocess.run([sys.executable, "-m", "edm_fast", "sample", "--model", "toy-gmm",
                          "--seeds", "5-1"], capture_output=True, text=True)
    assert res.returncode == 2 and "bad seed list" in res.stderr
