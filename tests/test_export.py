"""edm_fast.io.export: the branch-free D(x, sigma[, labels]) and its AOTInductor / TorchScript files.

The exported function must equal ``precond.Denoiser`` for every batch size (dynamic batch),
carry the edm_fast metadata the C++ loader checks, and follow the labels convention (a labels
input only when label_dim > 0).
"""

from __future__ import annotations

import json
import os
from math import inf

import pytest
import torch
from torch import nn

from edm_fast.sampling import cpp_extension as ops
from edm_fast.io.export import (
    METADATA_FILE, ExportableDenoiser, export_aoti, export_torchscript, read_metadata,
)
from edm_fast.guidance import GuidedDenoiser
from edm_fast.nets import MLP
from edm_fast.precond import Denoiser, EDMPrecond, VEPrecond, VPPrecond

DIM, LABEL_DIM = 5, 3
REQUIRE_CPP = os.environ.get("EDM_FAST_REQUIRE_CPP", "0") == "1"
needs_cpp = pytest.mark.skipif(not ops._load() and not REQUIRE_CPP,
                               reason=f"edm_fast._C not built ({ops.load_error()})")


def make_denoiser(label_dim=LABEL_DIM, precond=None, device="cpu") -> Denoiser:
    """edm_fast.nets.MLP with re-drawn weights (its output layer starts at 1e-5 scale, which
    would leave F out of the comparison)."""
    torch.manual_seed(7)
    net = MLP(DIM, hidden=16, depth=2, label_dim=label_dim)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return Denoiser(net.eval(), precond or EDMPrecond()).to(device)


def batch_inputs(batch, label_dim=LABEL_DIM, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, DIM, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.randn(batch, generator=g, dtype=torch.float64) * 2.0)
    labels = None
    if label_dim:
        labels = nn.functional.one_hot(torch.arange(batch) % label_dim, label_dim).double()
        labels = labels.to(device, dtype)
    return x.to(device, dtype), sigma.to(device, dtype), labels


def rel_err(out, ref) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def aoti_device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device(request.param)


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory, aoti_device):
    """The conditional MLP compiled once per device (tens of seconds on a CPU)."""
    path = str(tmp_path_factory.mktemp("export") / f"mlp_{aoti_device.type}.pt2")
    export_aoti(make_denoiser(device=aoti_device), (4, DIM), device=aoti_device, path=path)
    return path


# ------------------------------------------------------------------------------------------
# The branch-free wrapper.

@pytest.mark.parametrize("precond", [EDMPrecond(), EDMPrecond(sigma_data=1.3), VPPrecond(),
                                     VEPrecond()], ids=["edm", "edm_sd1.3", "vp", "ve"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("label_dim", [0, LABEL_DIM])
def test_exportable_equals_denoiser(precond, dtype, label_dim):
    denoiser = make_denoiser(label_dim, precond)
    module = ExportableDenoiser(denoiser)
    for batch in (1, 4):
        x, sigma, labels = batch_inputs(batch, label_dim, dtype)
        with torch.no_grad():
            out = module(x, sigma, labels)
            ref = denoiser(x, sigma, labels)
        assert out.dtype == dtype
        assert torch.equal(out, ref)  # the same ATen ops in the same order


def test_exportable_rejects_guided_wrapper_and_others():
    with pytest.raises(TypeError, match="Denoiser"):
        ExportableDenoiser(GuidedDenoiser(make_denoiser(), 2.0))
    with pytest.raises(TypeError, match="Denoiser"):
        ExportableDenoiser(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------
# TorchScript.

@pytest.mark.parametrize("label_dim", [0, LABEL_DIM])
def test_torchscript_dynamic_batch_and_metadata(tmp_path, label_dim, device):
    denoiser = make_denoiser(label_dim, device=device)
    path = export_torchscript(denoiser, (3, DIM), device=device, path=tmp_path / "d.ts")
    module = torch.jit.load(path, map_location=device)
    for batch in (1, 2, 5, 16):
        x, sigma, labels = batch_inputs(batch, label_dim, device=device)
        args = (x, sigma) if labels is None else (x, sigma, labels)
        with torch.no_grad():
            # the trace runs eager's float32 kernels (measured: 0 here); 1e-6 leaves room for
            # other CPUs' kernel choices
            assert rel_err(module(*args), denoiser(x, sigma, labels)) < 1e-6
    meta = read_metadata(path)
    assert meta["edm_fast.label_dim"] == str(label_dim)
    assert meta["edm_fast.sample_shape"] == str(DIM)
    assert meta["edm_fast.dtype"] == "float32" and meta["edm_fast.precond"] == "edm"
    assert meta["edm_fast.device"] == device.type
    assert float(meta["edm_fast.sigma_min"]) == 0 and float(meta["edm_fast.sigma_max"]) == inf
    files = {METADATA_FILE: ""}
    torch.jit.load(path, _extra_files=files)
    assert b"edm_fast.label_dim=" in files[METADATA_FILE]


def test_metadata_carries_the_sigma_range_of_the_preconditioning(tmp_path):
    """VE and VP support a finite sigma range, which C++ samplers clip their schedule to."""
    for precond in (VEPrecond(), VPPrecond()):
        den = make_denoiser(precond=precond)
        meta = read_metadata(export_torchscript(den, (2, DIM), path=tmp_path / "p.ts"))
        assert float(meta["edm_fast.sigma_min"]) == precond.sigma_min
        assert float(meta["edm_fast.sigma_max"]) == precond.sigma_max < inf


def test_export_restores_training_mode_and_unwraps_guidance(tmp_path):
    denoiser = make_denoiser()
    denoiser.model.train()
    export_torchscript(GuidedDenoiser(denoiser, 2.0), (2, DIM), path=tmp_path / "g.ts")
    assert denoiser.model.training
    module = torch.jit.load(str(tmp_path / "g.ts"))
    x, sigma, labels = batch_inputs(3)
    denoiser.eval()
    with torch.no_grad():
        assert rel_err(module(x, sigma, labels), denoiser(x, sigma, labels)) < 1e-6  # as above


def test_export_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="label_dim"):
        export_torchscript(make_denoiser(), (2, DIM), label_dim=7, path=tmp_path / "a.ts")
    with pytest.raises(ValueError, match="batch shape"):
        export_torchscript(make_denoiser(), (DIM,), path=tmp_path / "b.ts")
    with pytest.raises(ValueError, match=".pt2"):
        export_aoti(make_denoiser(), (2, DIM), path=tmp_path / "c.zip")


# ------------------------------------------------------------------------------------------
# AOTInductor.

def test_aoti_dynamic_batch_matches_eager(aoti_package, aoti_device):
    device = aoti_device
    loaded = torch._inductor.aoti_load_package(aoti_package)
    denoiser = make_denoiser(device=device)
    for batch in (1, 3, 4, 16):
        x, sigma, labels = batch_inputs(batch, device=device)
        with torch.no_grad():
            out = loaded(x, sigma, labels)
            # Inductor fuses and reorders the float32 arithmetic: measured <= 2.4e-7 here
            assert rel_err(out, denoiser(x, sigma, labels)) < 1e-5


def test_aoti_metadata(aoti_package, aoti_device):
    meta = read_metadata(aoti_package)
    assert meta["AOTI_DEVICE_KEY"] == aoti_device.type
    assert meta["edm_fast.label_dim"] == str(LABEL_DIM)
    assert meta["edm_fast.sample_shape"] == str(DIM)
    assert meta["edm_fast.dynamic_batch"] == "1"


@needs_cpp
def test_aoti_loads_in_cpp_for_vector_data(aoti_package, aoti_device):
    """The C++ loader reads the metadata and runs (N, D) data (not just images)."""
    device = aoti_device
    sampler = ops.load_sampler(aoti_package, device=device)
    assert sampler.label_dim() == LABEL_DIM and sampler.sample_shape() == [DIM]
    x, sigma, labels = batch_inputs(6, device=device)
    ref = make_denoiser(device=device)(x, sigma, labels)
    assert rel_err(sampler.denoise(x, sigma, labels), ref) < 1e-5  # measured 7e-8 (Inductor)


@needs_cpp
def test_aoti_static_batch(tmp_path):
    """dynamic_batch=False bakes the batch in; the C++ executor says how to fix a mismatch."""
    from edm_fast.plan import SamplingPlan

    path = export_aoti(make_denoiser(0), (2, DIM), dynamic_batch=False,
                       path=tmp_path / "static.pt2")
    assert read_metadata(path)["edm_fast.dynamic_batch"] == "0"
    sampler = ops.load_sampler(path)
    program = ops.program_args(SamplingPlan.build(sigmas=[2.0, 1.0, 0.0]).program)
    out = sampler.run_program(torch.randn(2, DIM), *program, None, None, None)
    assert out.shape == (2, DIM)
    with pytest.raises(RuntimeError, match="static batch of 2"):
        sampler.run_program(torch.randn(3, DIM), *program, None, None, None)


# ------------------------------------------------------------------------------------------
# Output paths: missing parent folders are created, an existing folder is refused up front.

def test_export_aoti_creates_missing_folders_and_refuses_a_folder(tmp_path, monkeypatch):
    """Without compiling (tens of seconds): the package is written where the parent exists."""
    import torch._inductor

    def fake_package(program, package_path, inductor_configs):
        assert os.path.isdir(os.path.dirname(package_path)), "parent folder not created"
        with open(package_path, "wb") as f:
            f.write(b"pt2")
        return package_path

    monkeypatch.setattr(torch.export, "export", lambda *args, **kwargs: "program")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_package)
    out = tmp_path / "new" / "sub" / "d.pt2"
    assert export_aoti(make_denoiser(), (2, DIM), path=out) == str(out) and out.is_file()
    folder = tmp_path / "dir.pt2"
    folder.mkdir()
    monkeypatch.setattr(torch.export, "export", None)  # any export work would fail differently
    with pytest.raises(IsADirectoryError, match="existing folder"):
        export_aoti(make_denoiser(), (2, DIM), path=folder)


def test_export_torchscript_creates_missing_folders_and_refuses_a_folder(tmp_path, monkeypatch):
    out = tmp_path / "new" / "sub" / "d.ts"
    assert export_torchscript(make_denoiser(), (2, DIM), path=out) == str(out)
    assert read_metadata(out)["edm_fast.label_dim"] == str(LABEL_DIM)
    monkeypatch.setattr(torch.jit, "trace", None)  # refused before any tracing
    with pytest.raises(IsADirectoryError, match="existing folder"):
        export_torchscript(make_denoiser(), (2, DIM), path=tmp_path / "new")


# ------------------------------------------------------------------------------------------
# `edm-fast bench --models`: the names it takes, all checked before any run.

def test_bench_model_names_and_aliases():
    from edm_fast.eval.benchmark import bench_model, bench_model_names

    with pytest.raises(ValueError) as info:
        bench_model("nope", "cpu")
    message = str(info.value)
    assert "Unknown network preset 'nope'" in message
    for name in ("mlp", "bundled", "default", "default-ddpm", "tiny", "toy-mlp"):
        assert name in bench_model_names() and f" {name}," in f"{message},", name
    bundled, default = bench_model("bundled", "cpu"), bench_model("default", "cpu")
    assert bundled.label_dim == default.label_dim == 10
    assert torch.equal(next(bundled.model.parameters()), next(default.model.parameters()))
    assert isinstance(bench_model("mlp", "cpu").model, MLP)


def test_bench_cli_checks_every_model_before_running(monkeypatch, capsys):
    from edm_fast.eval import benchmark
    from edm_fast.cli.main import main

    def no_run(*_, **__):
        raise AssertionError("benchmarked before the --models check")

    monkeypatch.setattr(benchmark, "benchmark_case", no_run)
    assert main(["bench", "--models", "mlp,default,nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edm-fast bench: error: Unknown network preset")
    assert "mlp, bundled, default, default-ddpm" in err[0]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_interrupted_export_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch, fmt):
    """Exports are written to a temporary file and renamed: an export cut short (Ctrl-C, a full
    disk) after it began writing leaves the previous file at the path untouched and no partial
    or temporary file beside it (the backends' reuse_model would load a torn one)."""
    from edm_fast.io import onnx_export

    path = tmp_path / ("d.ts" if fmt == "torchscript" else "d.onnx")
    path.write_bytes(b"the previous export")

    def write_then_fail(module, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    if fmt == "torchscript":
        monkeypatch.setattr(torch.jit, "save", write_then_fail)
        with pytest.raises(KeyboardInterrupt):
            export_torchscript(make_denoiser(), (3, DIM), path=path)
    else:
        def metadata_fails(target, meta):
            assert os.path.getsize(target) > 0  # the graph was written to the temporary file
            raise KeyboardInterrupt

        monkeypatch.setattr(onnx_export, "_write_metadata", metadata_fails)
        with pytest.raises(KeyboardInterrupt):
            onnx_export.export_onnx(make_denoiser(), path, sample_shape=(DIM,), check=False)
    assert path.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ------------------------------------------------------------------------------------------
# Exported files loaded back into Python (edm_fast.io.exported).

def test_exported_aoti_package_samples_from_python_and_in_cpp(aoti_package, aoti_device):
    """A .pt2 loads as a denoiser in NVlabs' form: the Python executor samples with it what the
    original module gives (any solver, guided), and the cpp backend runs the same file without
    exporting it again."""
    from edm_fast.io.exported import ExportedDenoiser
    from edm_fast.io.models import load_denoiser
    from edm_fast.sampling.sampler import Sampler

    loaded = load_denoiser(aoti_package)
    assert isinstance(loaded, ExportedDenoiser) and loaded.sample_shape == (DIM,)
    assert loaded.label_dim == LABEL_DIM and loaded.kind == "aoti"
    opts = {"batch_size": 3, "solver": "unipc", "num_steps": 6, "guidance": 1.5,
            "device": aoti_device}
    want = Sampler(make_denoiser(device=aoti_device), backend="reference", **opts)(
        seeds=[4, 5, 6], class_labels=[0, 1, 2])
    got = Sampler(loaded, backend="reference", **opts)(seeds=[4, 5, 6], class_labels=[0, 1, 2])
    assert rel_err(got, want) < 1e-5  # Inductor's kernels against eager float32
    if ops.cpp_available():
        cpp = Sampler(loaded, backend="cpp", **opts)
        assert cpp.backend.model_path == aoti_package  # the file itself, not a new export
        assert rel_err(cpp(seeds=[4, 5, 6], class_labels=[0, 1, 2]), got) < 1e-6


def test_exported_torchscript_keeps_the_discrete_levels(tmp_path):
    """A TorchScript export of a DDPM-preconditioned net rounds sigma to the same trained
    levels (round_sigma from its metadata), so its plan is the original's; a static batch is
    refused by name, and a file without edm_fast metadata is refused."""
    from edm_fast.io.exported import ExportedDenoiser
    from edm_fast.precond import DDPMPrecond
    from edm_fast.sampling.sampler import Sampler

    den = make_denoiser(precond=DDPMPrecond())
    path = export_torchscript(den, (2, DIM), path=tmp_path / "ddpm.ts")
    loaded = ExportedDenoiser(path)
    opts = {"shape": (DIM,), "batch_size": 2, "solver": "dpmpp_2m", "num_steps": 8,
            "backend": "reference", "device": "cpu"}
    original, exported = Sampler(den, **opts), Sampler(loaded, **opts)
    assert exported.plan.sigmas == original.plan.sigmas != Sampler(  # rounded levels
        make_denoiser(), **opts).plan.sigmas
    assert rel_err(exported(seeds=[1, 2]), original(seeds=[1, 2])) < 1e-6
    loaded.static_batch = 2
    with pytest.raises(ValueError, match="static batch of 2"):
        loaded(torch.zeros(3, DIM), torch.ones(3))
    (tmp_path / "plain.ts").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    with pytest.raises(ValueError, match="no edm_fast metadata"):
        ExportedDenoiser(tmp_path / "plain.ts", trusted=True)


def test_exports_carry_the_class_names(tmp_path):
    """The checkpoint's class names travel in the exported metadata (label i is name i), so a
    loaded export samples a class by name like the checkpoint; ONNX files carry them too."""
    from edm_fast.io.models import load_denoiser
    from edm_fast.io.onnx_export import export_onnx, read_onnx_metadata
    from edm_fast.sampling.sampler import Sampler

    den = load_denoiser("default")
    names = [str(k) for k in range(10)]
    path = export_torchscript(den, (2, 1, 16, 16), path=tmp_path / "digits.ts")
    assert json.loads(read_metadata(path)["edm_fast.class_names"]) == names
    sampler = Sampler(load_denoiser(path), backend="reference", device="cpu", num_steps=4)
    assert sampler.class_names == names
    assert torch.equal(sampler(seeds=[3], class_labels="7"), sampler(seeds=[3], class_labels=7))
    export_onnx(den, tmp_path / "digits.onnx", sample_shape=(1, 16, 16), check=False)
    assert json.loads(read_onnx_metadata(tmp_path / "digits.onnx")["edm_fast.class_names"]) \
        == names
