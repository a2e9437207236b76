"""Hostile and malformed model files (tests/hostile_files.py) cost bounded memory and time:
``edm-fast convert`` and ``edm-fast sample --ckpt`` refuse each one with exit code 2, exactly
one error line naming the file, no traceback, and no output file, in a process capped at 2 GB
of address space (resource.RLIMIT_AS).

One subprocess runs every case in-process through ``edm_fast.cli.main.main`` (torch starts once);
a few cases also run as real ``python -m edm_fast.cli.main`` processes under the same cap.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from hostile_files import make_corpus

CAP = 2 << 30  # bytes of address space per process (torch itself imports in < 1 GB)
SECONDS_PER_CASE = 20  # generous for a loaded 2-core CPU; every refusal takes well under 1 s


def _cap():
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


DRIVER = textwrap.dedent('''
    import contextlib, io, json, resource, sys, time
    from edm_fast.cli.main import main

    for line in sys.stdin:
        case, argv = json.loads(line)
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code
            except BaseException as exc:  # what would reach the user as a traceback
                rc = f"raised {type(exc).__name__}: {str(exc)[:300]}"
        # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's across exec)
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
        peak = (int(hwm[0].split()[1]) if hwm
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) // 1024
        print(json.dumps({"case": case, "argv": argv, "rc": rc, "stdout": out.getvalue(),
                          "stderr": err.getvalue(), "seconds": time.perf_counter() - start,
                          "peak_mb": peak}), flush=True)
''')


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("hostile"))


def _commands(name: str, path: Path, outdir: Path) -> list[list[str]]:
    convert = ["convert", str(path), "--out", str(outdir / f"{name}.convert.safetensors")]
    sample = ["sample", "--ckpt", str(path), "--seeds", "0", "--steps", "1", "--threads", "1",
              "--out", str(outdir / f"{name}.sample.png")]
    return [convert, sample]


def _run_driver(jobs: list[tuple[str, list[str]]], timeout: float) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", DRIVER], preexec_fn=_cap, env=_env(),
                          input="".join(json.dumps(job) + "\n" for job in jobs),
                          capture_output=True, text=True, timeout=timeout, check=False)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(jobs), (proc.returncode, proc.stderr[-3000:])
    return results


def _assert_refused(result: dict, path: Path, outdir: Path) -> None:
    where = f"{result['case']}: {' '.join(result['argv'][:1])}"
    assert result["rc"] == 2, (where, result)
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1, (where, result["stderr"])
    command = result["argv"][0]
    assert lines[0].startswith(f"edm-fast {command}: error: "), (where, lines[0])
    assert str(path) in lines[0], (where, lines[0])
    assert "Traceback" not in result["stderr"] + result["stdout"], where
    assert not [p.name for p in outdir.iterdir() if p.name.startswith(result["case"])], where
    assert result["seconds"] < SECONDS_PER_CASE, (where, result["seconds"])


def test_every_hostile_file_is_refused_in_one_line(corpus, tmp_path):
    """All cases through convert and sample, in one capped process."""
    outdir = tmp_path / "out"
    outdir.mkdir()
    jobs = [(name, argv) for name, path in corpus.items()
            for argv in _commands(name, path, outdir)]
    results = _run_driver(jobs, timeout=60 + 2 * len(jobs))
    report = [f"{r['case']:38s} {r['argv'][0]:8s} rc={r['rc']} {r['seconds']:.2f}s "
              f"peak={r['peak_mb']}MB" for r in results]
    print("\n".join(report))
    for result in results:
        _assert_refused(result, corpus[result["case"]], outdir)


def test_legitimate_files_work_under_the_cap(tmp_path):
    """The cap is not what refuses: a real convert and sample of the bundled model pass."""
    from hostile_files import DIGITS

    out = tmp_path / "digits.safetensors"
    png = tmp_path / "digits.png"
    results = _run_driver([
        ("convert", ["convert", str(DIGITS), "--out", str(out), "--dtype", "float16"]),
        ("sample", ["sample", "--ckpt", str(out), "--seeds", "0", "--steps", "1",
                    "--threads", "1", "--out", str(png)]),
    ], timeout=240)
    for result in results:
        assert result["rc"] == 0, result
    assert out.is_file() and png.is_file()


@pytest.mark.parametrize("name, command", [
    ("stride0-view.pkl", "convert"), ("billion-laughs.pkl", "convert"),
    ("zipbomb-storage.pt", "sample"), ("huge-sample-shape.safetensors", "sample"),
])
def test_real_cli_processes(corpus, tmp_path, name, command):
    """The installed entry point, as a user runs it, under the same cap."""
    path = corpus[name]
    argv = _commands(name, path, tmp_path)[0 if command == "convert" else 1]
    entry = "import sys; from edm_fast.cli.main import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", entry, *argv], preexec_fn=_cap, env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    result = {"case": name, "argv": argv, "rc": proc.returncode, "stdout": proc.stdout,
              "stderr": proc.stderr, "seconds": 0.0}
    _assert_refused(result, path, tmp_path)


def test_refusals_are_bad_file_errors_and_the_parameter_limit_is_a_keyword(corpus):
    """In-process API: each refusal is an edm_fast.errors.BadFileError (a ValueError) naming
    the file; max_params= lowers or raises the network-size limit."""
    from edm_fast.io.checkpoints import DEFAULT_MAX_PARAMS, load_denoiser_checkpoint
    from edm_fast.errors import BadFileError
    from edm_fast.io.official import read_official
    from hostile_files import DIGITS

    for name in ("stride0-view.pkl", "set-growth.pkl", "length-2e62.pkl", "zipbomb-pickle.pt"):
        with pytest.raises(BadFileError, match=name):
            read_official(corpus[name])
    with pytest.raises(BadFileError, match="more than the limit of 10 "):
        load_denoiser_checkpoint(DIGITS, max_params=10)
    with pytest.raises(BadFileError, match="parameters, more than the limit"):
        load_denoiser_checkpoint(corpus["huge-model-channels.safetensors"])
    assert load_denoiser_checkpoint(DIGITS, max_params=DEFAULT_MAX_PARAMS) is not None


def test_the_parameter_limit_is_an_environment_setting_for_every_command(monkeypatch,
                                                                         tmp_path):
    """EDM_FAST_MAX_PARAMS lowers or raises the network-size limit where no max_params= is
    passed (the CLI commands): a refusal names the variable; a bad value is one line."""
    import subprocess
    import sys

    from edm_fast.io.checkpoints import load_denoiser_checkpoint
    from edm_fast.errors import BadFileError
    from hostile_files import DIGITS

    monkeypatch.setenv("EDM_FAST_MAX_PARAMS", "10")
    with pytest.raises(BadFileError, match="EDM_FAST_MAX_PARAMS=N"):
        load_denoiser_checkpoint(DIGITS)
    assert load_denoiser_checkpoint(DIGITS, max_params=10**9) is not None  # the keyword wins
    res = subprocess.run([sys.executable, "-m", "edm_fast", "sample", "--ckpt", str(DIGITS),
                          "--out", str(tmp_path / "x.png")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "more than the limit of 10 " in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x.png").exists()
    monkeypatch.setenv("EDM_FAST_MAX_PARAMS", "lots")
    with pytest.raises(ValueError, match="not a positive parameter count"):
        load_denoiser_checkpoint(DIGITS)


def test_weight_files_for_the_metric_networks_get_the_same_bounds(corpus, tmp_path):
    """`official.read_state_dict` (the metrics' .pth weight files) reads through the same
    restricted, budgeted unpickler: hostile archives are one-line BadFileErrors; a plain
    torch.save state dict (an OrderedDict with its _metadata) loads."""
    import torch

    from edm_fast.errors import BadFileError
    from edm_fast.io.official import read_state_dict

    for name in ("stride0-view.pkl", "set-growth.pkl", "zipbomb-pickle.pt", "length-2e62.pkl"):
        with pytest.raises(BadFileError) as info:
            read_state_dict(corpus[name])
        assert name in str(info.value) and "\n" not in str(info.value)
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "w.pth")
    state = read_state_dict(tmp_path / "w.pth")
    assert sorted(state) == ["bias", "weight"] and state["weight"].shape == (2, 3)
