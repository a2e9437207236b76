"""`edm-fast bench` output (rows as they finish, legend, samplers that are not installed), its
child processes ending with it, and the CPU thread options and notes of `edm-fast sample`."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from edm_fast.eval import benchmark
from edm_fast import device as device_mod
from edm_fast.cli.main import main


def _fake_row(model, batch, sampler):
    row = dict.fromkeys(benchmark.COLUMNS, "1.0")
    row.update({"model": model, "batch": batch, "sampler": sampler})
    return row


def test_bench_prints_rows_as_they_finish_then_legend(monkeypatch, capsys):
    """Each row reaches stdout as soon as benchmark_case hands it over (not at the end); a
    missing k-diffusion gets a 'not installed' row; a legend explains the columns."""
    monkeypatch.setattr(benchmark, "load_k_diffusion_sampling", lambda: None)
    seen, errs = [], []

    def fake_case(model, batch, *, on_row, on_start, **kw):
        rows = [_fake_row(model, batch, name) for name in ("ours/reference", "nvlabs-eager")]
        for row in rows:
            on_start(row["sampler"])
            on_row(row)
            out, err = capsys.readouterr()  # printed already, before the next measurement
            seen.append(out)
            errs.append(err)
            assert f"| {model} | {batch} | {row['sampler']} |" in out
        return rows

    monkeypatch.setattr(benchmark, "benchmark_case", fake_case)
    assert main(["bench", "--models", "mlp,tiny", "--batches", "1,4", "--device", "cpu",
                 "--threads", str(torch.get_num_threads())]) == 0
    assert len(seen) == 8 and seen[0].startswith("| model | batch | sampler |")
    rest = capsys.readouterr()
    lines = rest.out.splitlines()
    missing = [line for line in lines if "| k-diffusion |" in line]
    assert len(missing) == 1 and "not installed" in missing[0]
    skipped = [line for line in lines if "| ours/compiled |" in line or "| ours/cpp |" in line]
    assert len(skipped) == 2 and all("skipped" in line for line in skipped)  # CPU default
    for text in ("NFE", "ms/NFE", "one batch call's time / NFE", "img/s", "t_F", "overhead %",
                 "can be negative", "host %", "GFLOP/s", "% peak", "thread(s)"):
        assert text in rest.out, text
    assert f"{torch.get_num_threads()} thread(s)" in errs[0]  # stated before the first row
    assert "[1/4] mlp batch 1: ours/reference ..." in errs[0]  # what runs now, on stderr
    assert "[4/4] tiny batch 4: nvlabs-eager ..." in errs[-1]


def test_bench_with_k_diffusion_has_no_missing_row(monkeypatch):
    monkeypatch.setattr(benchmark, "load_k_diffusion_sampling", lambda: object())
    assert benchmark.missing_outside_samplers() == {}
    monkeypatch.setattr(benchmark, "load_k_diffusion_sampling", lambda: None)
    assert "not installed" in benchmark.missing_outside_samplers()["k-diffusion"]


def _descendants(pid):
    """Every live process below ``pid`` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bench_children_end_with_the_parent():
    """SIGTERM (the parent kills its measurement on the way out) or even SIGKILL
    (PR_SET_PDEATHSIG in the child) to `edm-fast bench`: no measurement process outlives it.
    Both parents run at once, to keep the test short."""
    command = [sys.executable, "-m", "edm_fast", "bench", "--models", "mlp", "--batches", "1",
               "--steps", "2", "--repeats", "1", "--backends", "reference", "--device", "cpu",
               "--threads", "1"]
    parents = {sig: subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
               for sig in (signal.SIGTERM, signal.SIGKILL)}
    try:
        kids = {}
        deadline = time.monotonic() + 120
        while len(kids) < len(parents) and time.monotonic() < deadline:
            for sig, parent in parents.items():
                if sig in kids:
                    continue
                assert parent.poll() is None, "bench ended before it started a measurement"
                if _descendants(parent.pid):
                    time.sleep(0.2)  # let the child get past its fork into Python
                    kids[sig] = _descendants(parent.pid)
                    parent.send_signal(sig)
            time.sleep(0.05)
        assert len(kids) == len(parents), "bench started no measurement process"
        for parent in parents.values():
            parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(k) for ks in kids.values() for k in ks) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = {sig.name: [k for k in ks if _alive(k)] for sig, ks in kids.items()}
        assert not any(survivors.values()), f"children outlived edm-fast bench: {survivors}"
        assert parents[signal.SIGTERM].returncode == 143
    finally:
        for parent in parents.values():
            if parent.poll() is None:
                parent.kill()
                parent.wait()


class _Stop(ValueError):
    pass


def _capture_sampler(monkeypatch):
    """Replace Sampler with one that records its arguments and stops the command."""
    import edm_fast.sampling.sampler

    calls = []

    def fake(*args, **kwargs):
        calls.append((torch.get_num_threads(), kwargs))
        raise _Stop("stop here")

    monkeypatch.setattr(edm_fast.sampling.sampler, "Sampler", fake)
    return calls


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_sample_threads_option_is_applied(monkeypatch, keep_threads, tmp_path):
    """--threads N sets torch's threads before the sampler is built and reaches ONNX Runtime
    as the onnx backend's ``threads``; other backends get no extra option."""
    calls = _capture_sampler(monkeypatch)
    out = str(tmp_path / "x.npz")
    assert main(["sample", "--threads", "1", "--backend", "onnx", "--steps", "2", "--seeds",
                 "0-1", "--device", "cpu", "--out", out]) == 2
    assert calls[-1][0] == 1 and calls[-1][1]["backend_options"] == {"threads": 1}
    assert main(["sample", "--threads", "1", "--steps", "2", "--seeds", "0-1", "--device",
                 "cpu", "--out", out]) == 2
    assert calls[-1][0] == 1 and not calls[-1][1]["backend_options"]
    assert main(["sample", "--threads", "0", "--device", "cpu", "--out", out]) == 2


def test_sample_threads_end_to_end(keep_threads, tmp_path):
    """A real run with --threads 1 (the bundled model, 2 steps)."""
    assert main(["sample", "--threads", "1", "--steps", "2", "--seeds", "0-1", "--device",
                 "cpu", "--out", str(tmp_path / "x.npz")]) == 0
    assert torch.get_num_threads() == 1 and (tmp_path / "x.npz").exists()


def test_load_note(monkeypatch, keep_threads, capsys, tmp_path):
    """A loaded machine (load average >= cores) and several threads: a one-line note on
    stderr suggesting --threads 1; none when unloaded, on one thread or with --threads."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
    note = device_mod.busy_cpu_note(torch.device("cpu"))
    assert note and "--threads 1" in note and "\n" not in note
    assert device_mod.busy_cpu_note(torch.device("cuda")) is None
    _capture_sampler(monkeypatch)
    out = str(tmp_path / "x.npz")
    assert main(["sample", "--device", "cpu", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--threads 1" in err and err.count("note:") == 1
    assert main(["sample", "--threads", "2", "--device", "cpu", "--out", out]) == 2
    assert "note:" not in capsys.readouterr().err
    torch.set_num_threads(1)
    assert device_mod.busy_cpu_note("cpu") is None
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 0.5, 0.0, 0.0))
    assert device_mod.busy_cpu_note("cpu") is None


def test_setup_note():
    note = device_mod.setup_note(110.0, "compiled", "cpu")
    assert note == ("note: set-up took 110 s (compile); for small jobs --backend reference "
                    "needs none")
    assert device_mod.setup_note(5.0, "compiled", "cpu") is None
    assert device_mod.setup_note(50.0, "reference", "cpu") is None
    assert device_mod.setup_note(50.0, "compiled", "cuda") is None
    assert "export" in device_mod.setup_note(11.0, "onnx", "cpu")


def test_train_and_compare_take_threads(monkeypatch, keep_threads, capsys, tmp_path):
    """train and compare apply --threads before their work starts (checked where it would
    begin), refuse 0 by name, and give the loaded-machine note only without --threads."""
    import edm_fast.cli.compare as compare_cli
    import edm_fast.train.loop as train_loop

    seen = []

    def stop(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise _Stop("stop here")

    monkeypatch.setattr(train_loop, "train", stop)
    monkeypatch.setattr(compare_cli, "_load_models", stop)
    run = str(tmp_path / "run")
    report = str(tmp_path / "report")
    assert main(["train", "--threads", "1", "--out", run]) == 2
    assert main(["compare", "--threads", "1", "--out", report]) == 2
    assert seen == [1, 1]
    for command in (["train", "--out", run], ["compare", "--out", report]):
        assert main([*command, "--threads", "0"]) == 2
        assert "--threads must be >= 1" in capsys.readouterr().err
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
    torch.set_num_threads(2)
    assert main(["train", "--out", run]) == 2
    assert capsys.readouterr().err.count("note: this machine is loaded") == 1
    assert main(["train", "--threads", "2", "--out", run]) == 2
    assert "note:" not in capsys.readouterr().err
    torch.set_num_threads(2)
    assert main(["compare", "--out", report]) == 2
    assert capsys.readouterr().err.count("note: this machine is loaded") == 1
