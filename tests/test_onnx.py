"""ONNX export of D(x; sigma, labels), the ONNX Runtime backend, and ``edm-fast export``.

Export: SongUNet, DhariwalUNet and the MLP (tiny configs, re-drawn weights so that F matters:
the nets' output layers start at 1e-5 scale) reproduce PyTorch in ONNX Runtime (relative error
max|D_ort - D_torch| / max|D_torch| <= 1e-4 in float32, 1e-2 in float16), with sigma and labels
as graph inputs and a dynamic batch.

Backend: the tolerance rule of tests/test_backends.py,
    rel_err(onnx32, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64)),
holds for ONNX Runtime's kernels too (measured on the tiny SongUNet over the 16 cases below:
rel_err(onnx32, ref64) = 2.8e-7 .. 2.3e-6, 0.74-1.22 times rel_err(ref32, ref64), with the
backend's step math rearranged into fewer ops).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edm_fast.sampling.backends import available_backends, resolve_backend
from edm_fast.sampling.backends.onnx import OnnxBackend
from edm_fast.plan import SamplingPlan
from edm_fast.sampling.backends.reference import ReferenceBackend
from edm_fast.cli.export import add_export_command
from edm_fast.io.export import read_metadata
from edm_fast.guidance import GuidedDenoiser
from edm_fast.nets import build_net
from edm_fast.noise import SeedNoise
from edm_fast.io.onnx_export import (
    OnnxCheckError,
    _worst,
    check_onnx,
    export_onnx,
    make_session,
    read_onnx_metadata,
)
from edm_fast.precond import Denoiser, EDMPrecond
from edm_fast.sampling.sampler import Sampler
from edm_fast.sampling.reference import NonFiniteError

LABEL_DIM = 3
IMAGE = (1, 8, 8)


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Weights ~ N(0, 1/fan_in), biases and norm gains near their defaults: F of unit scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                gain = "norm" in name and name.endswith("weight")
                p.copy_(noise * 0.1 + (1.0 if gain else 0.0))
    return net.eval()


NETS = {
    "song": (lambda: build_net("tiny", img_resolution=8, channel_mult=[1, 2], attn_resolutions=[4],
                               label_dim=LABEL_DIM, dropout=0), IMAGE),
    "adm": (lambda: build_net("tiny-adm", img_resolution=8, channel_mult=[1, 2],
                              attn_resolutions=[4], label_dim=LABEL_DIM, dropout=0), IMAGE),
    "mlp": (lambda: build_net("toy-mlp", hidden=32, depth=2, label_dim=LABEL_DIM), (2,)),
}


def make_denoiser(kind: str) -> Denoiser:
    make, _ = NETS[kind]
    torch.manual_seed(0)
    return Denoiser(randomize(make()), EDMPrecond()).eval()


@pytest.fixture(scope="module")
def song():
    return make_denoiser("song")


@pytest.fixture(scope="module")
def song_onnx(song, tmp_path_factory):
    """The SongUNet exported once at batch 2 (dynamic batch), with its report."""
    path = tmp_path_factory.mktemp("onnx") / "song.onnx"
    return export_onnx(song, path, sample_shape=IMAGE, label_dim=LABEL_DIM, batch=2)


def torch_denoise(den, x, sigma, labels):
    with torch.no_grad():
        return den(x, sigma, labels)


def rel_max(out, ref) -> float:
    out, ref = torch.as_tensor(out).double(), torch.as_tensor(ref).double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def case_inputs(batch, shape, label_dim=LABEL_DIM, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *shape), generator=gen) * 2.0
    sigma = torch.exp(torch.randn(batch, generator=gen) * 2.0)
    labels = nn.functional.one_hot(torch.arange(batch) % label_dim, label_dim).float()
    return x, sigma, labels


# ------------------------------------------------------------------------------------------
# Export.

def test_song_export_report_and_graph_inputs(song_onnx):
    """sigma and class_labels are graph inputs (not folded constants), batch is symbolic."""
    report = song_onnx
    assert report.exporter == "torchscript" and report.opset == 17
    assert len(report.checks) == 2 * 5  # batches 1, 3 x five sigmas
    assert {b for b, _, _ in report.checks} == {1, 3}
    assert 0 < report.max_rel_err <= report.tolerance == 1e-4
    model = onnx.load(report.path)
    onnx.checker.check_model(model)
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["x", "sigma", "class_labels"]
    assert not set(inputs) & {init.name for init in model.graph.initializer}
    for name, rank in (("x", 4), ("sigma", 1), ("class_labels", 2)):
        dims = inputs[name].type.tensor_type.shape.dim
        assert len(dims) == rank and dims[0].dim_param == "batch"
        assert inputs[name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.opset_import[0].version == 17
    meta = read_onnx_metadata(report.path)
    assert meta["edm_fast.label_dim"] == "3" and meta["edm_fast.sample_shape"] == "1,8,8"
    assert meta["edm_fast.net_dtype"] == "float32" and meta["edm_fast.dynamic_batch"] == "1"


def test_dynamic_batch_and_inputs_drive_the_output(song, song_onnx):
    """Exported at batch 2, run at 1 and 5; changing sigma or labels changes D as in torch."""
    session = make_session(song_onnx.path, threads=1)
    for batch in (1, 5):
        x, sigma, labels = case_inputs(batch, IMAGE, seed=batch)
        feeds = {"x": x.numpy(), "sigma": sigma.numpy(), "class_labels": labels.numpy()}
        out = session.run(None, feeds)[0]
        assert out.shape == (batch, *IMAGE)
        assert rel_max(out, torch_denoise(song, x, sigma, labels)) <= 1e-4
    x, _, labels = case_inputs(2, IMAGE, seed=9)
    sigma = torch.ones(2)  # c_out(1) = 0.45: F's share of D is large
    base = session.run(None, {"x": x.numpy(), "sigma": sigma.numpy(),
                              "class_labels": labels.numpy()})[0]
    for sigma2, labels2 in ((sigma * 3, labels), (sigma, labels.flip(0))):
        out = session.run(None, {"x": x.numpy(), "sigma": sigma2.numpy(),
                                 "class_labels": labels2.numpy()})[0]
        assert np.abs(out - base).max() > 1e-3 * np.abs(base).max()
        assert rel_max(out, torch_denoise(song, x, sigma2, labels2)) <= 1e-4


@pytest.mark.parametrize("kind", ["adm", "mlp"])
def test_dhariwal_and_mlp_export(kind, tmp_path):
    den = make_denoiser(kind)
    shape = NETS[kind][1]
    report = export_onnx(den, tmp_path / f"{kind}.onnx", sample_shape=shape, label_dim=LABEL_DIM)
    assert 0 < report.max_rel_err <= 1e-4
    session = make_session(report.path, threads=1)
    x, sigma, labels = case_inputs(5, shape, seed=5)
    out = session.run(None, {"x": x.numpy(), "sigma": sigma.numpy(),
                             "class_labels": labels.numpy()})[0]
    assert rel_max(out, torch_denoise(den, x, sigma, labels)) <= 1e-4


def test_unconditional_static_batch_export(tmp_path):
    """label_dim = 0: exactly (x, sigma); dynamic_batch=False fixes the batch."""
    torch.manual_seed(1)
    den = Denoiser(randomize(build_net("toy-mlp", hidden=32, depth=2)), EDMPrecond()).eval()
    report = export_onnx(den, tmp_path / "mlp.onnx", sample_shape=(2,), dynamic_batch=False,
                         batch=3, opset=13)
    assert report.input_names == ["x", "sigma"] and report.max_rel_err <= 1e-4
    assert {b for b, _, _ in report.checks} == {3}
    session = make_session(report.path, threads=1)
    assert [i.shape for i in session.get_inputs()] == [[3, 2], [3]]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"x": np.zeros((2, 2), np.float32), "sigma": np.ones(2, np.float32)})


def test_float16_export(tmp_path):
    """float16 network inside float32 inputs/outputs; ORT's float16 error is no worse than
    twice torch's own float16 error against float64 (plus 1e-3), and within 1e-2 of torch."""
    den = make_denoiser("song")
    report = export_onnx(den, tmp_path / "song16.onnx", sample_shape=IMAGE, label_dim=LABEL_DIM,
                         dtype=torch.float16)
    assert report.dtype == "float16" and report.max_rel_err <= 1e-2
    x, sigma, labels = case_inputs(3, IMAGE, seed=3)
    ref64 = torch_denoise(copy.deepcopy(den).double(), x.double(), sigma.double(),
                          labels.double())
    ref16 = torch_denoise(copy.deepcopy(den).half(), x, sigma, labels)  # F in float16
    session = make_session(report.path, threads=1)
    assert session.get_inputs()[0].type == "tensor(float)"
    out = session.run(None, {"x": x.numpy(), "sigma": sigma.numpy(),
                             "class_labels": labels.numpy()})[0]
    assert rel_max(out, ref64) <= 2 * rel_max(ref16, ref64) + 1e-3


def test_check_detects_a_wrong_model(song, song_onnx):
    """The check can fail: the file against a perturbed copy of the network."""
    other = make_denoiser("song")
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cases = check_onnx(song, song_onnx.path, sample_shape=IMAGE, label_dim=LABEL_DIM)
    assert max(err for _, _, err in cases) <= 1e-4
    with pytest.raises(OnnxCheckError, match="differs from PyTorch"):
        check_onnx(other, song_onnx.path, sample_shape=IMAGE, label_dim=LABEL_DIM,
                   tolerance=1e-4)


def test_export_that_fails_its_check_writes_no_file(tmp_path):
    """A NaN weight (a broken checkpoint) fails the check, which had passed it (NaN > tol is
    False), and a failed check leaves nothing at the path (the file was renamed into place
    before the check ran)."""
    nan_net = make_denoiser("mlp")
    with torch.no_grad():
        next(nan_net.model.parameters()).view(-1)[0] = float("nan")
    path = tmp_path / "nan.onnx"
    with pytest.raises(OnnxCheckError, match="NaN/Inf") as caught:
        export_onnx(nan_net, path, sample_shape=(2,), label_dim=LABEL_DIM)
    assert math.isnan(caught.value.report.max_rel_err)
    strict = tmp_path / "strict.onnx"
    with pytest.raises(OnnxCheckError, match="> tolerance 1e-30"):
        export_onnx(make_denoiser("mlp"), strict, sample_shape=(2,), label_dim=LABEL_DIM,
                    tolerance=1e-30)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no model, no temporary file
    assert math.isnan(_worst([(1, 0.5, 1e-3), (3, 0.5, float("nan")), (1, 2.0, 0.1)])[2])


def test_dynamo_exporter(tmp_path):
    """The dynamo exporter (opset >= 18; asked for 17, it warns and writes 18)."""
    pytest.importorskip("onnxscript")
    den = make_denoiser("mlp")
    with pytest.warns(RuntimeWarning, match="opset 18"):
        report = export_onnx(den, tmp_path / "mlp_dynamo.onnx", sample_shape=(2,),
                             label_dim=LABEL_DIM, exporter="dynamo")
    assert report.exporter == "dynamo" and report.opset == 18
    assert report.input_names == [i.name for i in onnx.load(report.path).graph.input]
    assert report.input_names == ["x", "sigma", "class_labels"]  # the backend binds by name
    assert report.max_rel_err <= 1e-4


def test_auto_exporter_does_not_retry_a_file_it_cannot_write(monkeypatch):
    """An OSError (missing folder, no permission, full disk) is raised as it is: the dynamo
    exporter could not write the file either."""
    from edm_fast.io import onnx_export

    def unwritable(*_):
        raise PermissionError(13, "Permission denied", "x.onnx")

    def dynamo(*_):
        raise AssertionError("retried with the dynamo exporter")

    monkeypatch.setattr(onnx_export, "_export_torchscript", unwritable)
    monkeypatch.setattr(onnx_export, "_export_dynamo", dynamo)
    with pytest.raises(PermissionError, match="Permission denied"):
        onnx_export._run_exporter("auto", None, (), "x.onnx", ["x", "sigma"], 17, True)


def test_export_onnx_creates_missing_folders_and_refuses_a_folder(tmp_path, monkeypatch):
    from edm_fast.io import onnx_export

    path = tmp_path / "new" / "sub" / "mlp.onnx"
    report = export_onnx(make_denoiser("mlp"), path, sample_shape=(2,), check=False)
    assert report.path == str(path) and read_onnx_metadata(path)["edm_fast.label_dim"] == "3"
    monkeypatch.setattr(onnx_export, "_run_exporter", None)  # refused before any export work
    with pytest.raises(IsADirectoryError, match="existing folder"):
        export_onnx(make_denoiser("mlp"), tmp_path / "new", sample_shape=(2,))


# ------------------------------------------------------------------------------------------
# The ONNX Runtime backend.

def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_backend(cls, den, plan, batch, dtype, labels, **opts):
    noise = SeedNoise(range(50, 50 + batch), IMAGE)
    latents, draws = noise.draw(), noise.draw_many(plan.num_noise)
    be = cls(den, plan, (batch, *IMAGE), dtype=dtype, device=torch.device("cpu"),
             label_dim=LABEL_DIM, **opts)
    return be.run(latents, draws if plan.num_noise else None, labels)


@pytest.mark.parametrize("solver, S_churn, guidance, batch",
                         list(itertools.product(["heun", "euler"], [0.0, 30.0], [None, 2.0],
                                                [1, 3])))
def test_backend_matches_reference(song, song_onnx, solver, S_churn, guidance, batch):
    # S_noise != 1 catches a loop that drops it; batch 3 churns from step 0 (S_max = inf)
    plan = SamplingPlan.build(num_steps=6, S_churn=S_churn, S_min=0.05, S_noise=1.007,
                              S_max=math.inf if batch == 3 else 20.0, solver=solver,
                              guidance=guidance)
    labels = nn.functional.one_hot(torch.arange(batch) % LABEL_DIM, LABEL_DIM).float()
    ref64 = run_backend(ReferenceBackend, song, plan, batch, torch.float64, labels)
    ref32 = run_backend(ReferenceBackend, song, plan, batch, torch.float32, labels)
    out = run_backend(OnnxBackend, song, plan, batch, torch.float32, labels,
                      model_path=song_onnx.path, reuse_model=True, threads=1)
    assert out.dtype == torch.float32 and out.shape == (batch, *IMAGE)
    bound = max(1e-5, 2 * rel_err(ref32, ref64))
    assert rel_err(out, ref64) <= bound, (rel_err(out, ref64), bound)


def test_backend_reuses_its_bound_buffers_safely(song, song_onnx):
    """The buffers bound once per batch size: runs at other sizes and labels in between change
    nothing (bit for bit), and a returned sample never aliases a buffer."""
    plan = SamplingPlan.build(num_steps=4, guidance=1.5)
    opts = {"model_path": song_onnx.path, "reuse_model": True, "threads": 1}
    latents = SeedNoise(range(3), IMAGE).draw()
    labels_a, labels_b = torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0])

    def backend(n):
        return OnnxBackend(song, plan, (n, *IMAGE), device=torch.device("cpu"),
                           label_dim=LABEL_DIM, **opts)

    def fresh(n, labels):
        return backend(n).run(latents[:n], None, labels)

    be = backend(3)
    first = be.run(latents, None, labels_a)
    kept = first.clone()
    small = be.run(latents[:1], None, labels_b[:1])
    second = be.run(latents, None, labels_b)
    assert torch.equal(first, kept)  # not overwritten by later runs
    assert torch.equal(be.run(latents, None, labels_a), kept)
    assert torch.equal(second, fresh(3, labels_b)) and torch.equal(small, fresh(1, labels_b[:1]))
    assert not torch.equal(second, kept)  # the labels reach the graph


class BadAt(nn.Module):
    """A network F that outputs ``value`` (NaN or Inf) at the evaluations with sigma in
    (lo, hi) and, everywhere else, F with non-finite entries replaced by 0: so a bad value can
    reach the end of a run only through the sampler's own updates, never through the net."""

    def __init__(self, den: Denoiser, lo: float, hi: float, value: float):
        super().__init__()
        self.inner, self.value, self.label_dim = den.model, value, den.label_dim
        c_noise = den.precond.coefficients(torch.tensor([lo, hi]))[3]  # increasing in sigma
        self.lo, self.hi = float(c_noise[0]), float(c_noise[1])

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        out = self.inner(x, noise_labels, class_labels, augment_labels)
        out = torch.where(torch.isfinite(out), out, torch.zeros_like(out))
        c = noise_labels.reshape(-1, 1, 1, 1)
        return torch.where((c > self.lo) & (c < self.hi), torch.full_like(out, self.value), out)


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_backend_reports_non_finite_values(song, tmp_path, solver, value):
    """NaN/Inf in one latent entry, or from the net at the first, a middle or the last
    evaluations, raise NonFiniteError. The executor flags every non-finite D and checks once,
    at the end; the network F here maps non-finite inputs to finite outputs, so a bad latent
    reaches D only through the skip connection c_skip x."""
    plan = SamplingPlan.build(num_steps=6, solver=solver)

    def backend(lo, hi, name):
        faulty = Denoiser(BadAt(song, lo, hi, value), song.precond)
        path = tmp_path / f"{name}.onnx"
        export_onnx(faulty, path, sample_shape=IMAGE, label_dim=LABEL_DIM, batch=2, check=False)
        return OnnxBackend(faulty, plan, (2, *IMAGE), device=torch.device("cpu"),
                           label_dim=LABEL_DIM, model_path=path, reuse_model=True, threads=1)

    latents = SeedNoise(range(2), IMAGE).draw()
    clean = backend(1e3, 2e3, "clean")  # the window holds no sigma of the run
    assert torch.isfinite(clean.run(latents)).all()
    bad = latents.clone()
    bad[1, 0, 3, 4] = value
    # F does not spread the bad entry: D = c_skip x + c_out F is non-finite only where x is
    assert (~torch.isfinite(clean.evaluate_once(bad, 1.0))).sum() == 1
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        clean.run(bad)
    for j in (0, 3, plan.num_steps - 1):  # evaluations at t_0 (first), t_3, t_{N-1} (last)
        t = plan.sigmas[j]
        with pytest.raises(NonFiniteError, match="NaN/Inf"):
            backend(0.99 * t, 1.01 * t, f"bad{j}").run(latents)


def test_backend_exports_at_construction_and_through_sampler(song):
    """Default construction exports (timed as warm-up) into a private file; the Sampler picks
    the backend by name; a GuidedDenoiser is unwrapped into the plan's guidance."""
    assert available_backends()["onnx"] is None
    assert resolve_backend("onnx", torch.device("cpu")) is OnnxBackend
    guided = GuidedDenoiser(song, 2.0)
    opts = {"threads": 1}
    sampler = Sampler(guided, shape=IMAGE, batch_size=2, num_steps=5, S_churn=10, S_max=20,
                      device="cpu", backend="onnx", backend_options=opts)
    be = sampler.backend
    assert be.plan.guidance == 2.0 and be.export_report.max_rel_err <= 1e-4
    assert be.warmup_seconds >= be.export_report.export_seconds > 0
    out = sampler(seeds=range(3), class_labels=torch.tensor([0, 1, 2]))  # 2 chunks, 1 padded
    ref = Sampler(song, shape=IMAGE, batch_size=3, num_steps=5, S_churn=10, S_max=20,
                  guidance=2.0, device="cpu", backend="reference", dtype=torch.float64)
    ref64 = ref(seeds=range(3), class_labels=torch.tensor([0, 1, 2]))
    assert rel_err(out, ref64) <= 1e-5
    x, sigma, labels = case_inputs(2, IMAGE)
    once = be.evaluate_once(x, sigma[0].item(), labels)
    assert rel_max(once, GuidedDenoiser(song, 2.0)(x, sigma[0].item(), labels)) <= 1e-4


def test_float64_state_warns_that_the_network_stays_float32(song, song_onnx):
    """dtype=float64 on onnx runs only the step math in float64: a user who asked for a float64
    sampler is told, and the result still meets the float32 tolerance."""
    plan = SamplingPlan.build(num_steps=3)
    opts = {"model_path": song_onnx.path, "reuse_model": True, "label_dim": LABEL_DIM}
    with pytest.warns(UserWarning, match="runs the network in float32"):
        be = OnnxBackend(song, plan, (2, *IMAGE), dtype=torch.float64, **opts)
    latents = SeedNoise(range(2), IMAGE).draw()
    labels = torch.eye(LABEL_DIM)[[0, 2]]
    out = be.run(latents, None, labels)
    ref = ReferenceBackend(song, plan, (2, *IMAGE), dtype=torch.float64, device="cpu",
                           label_dim=LABEL_DIM)
    assert out.dtype == torch.float64
    assert rel_err(out, ref.run(latents, None, labels)) <= 1e-5


def test_backend_device_errors(song, song_onnx):
    """CUDA without onnxruntime-gpu and unsupported devices fail at construction, clearly."""
    plan = SamplingPlan.build(num_steps=2)
    opts = {"model_path": song_onnx.path, "reuse_model": True, "label_dim": LABEL_DIM}
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        OnnxBackend(song, plan, (2, *IMAGE), device=torch.device("meta"), **opts)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            OnnxBackend(song, plan, (2, *IMAGE), device=torch.device("cuda"), **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("S_churn, guidance", [(0.0, None), (30.0, 2.0)])
def test_backend_cuda_io_binding_matches_reference(song, song_onnx, S_churn, guidance):
    """The CUDA execution provider with I/O binding on torch's CUDA tensors (TF32 off)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    plan = SamplingPlan.build(num_steps=6, S_churn=S_churn, S_min=0.05, S_max=20.0,
                              guidance=guidance)
    batch = 3
    labels = nn.functional.one_hot(torch.arange(batch) % LABEL_DIM, LABEL_DIM).float()
    ref64 = run_backend(ReferenceBackend, song, plan, batch, torch.float64, labels)
    ref32 = run_backend(ReferenceBackend, song, plan, batch, torch.float32, labels)
    be = OnnxBackend(song, plan, (batch, *IMAGE), dtype=torch.float32,
                     device=torch.device("cuda"), label_dim=LABEL_DIM,
                     model_path=song_onnx.path, reuse_model=True)
    assert be.session.get_providers()[0] == "CUDAExecutionProvider"
    noise = SeedNoise(range(50, 50 + batch), IMAGE, device="cuda")
    latents, churn = noise.draw(), noise.draw_many(len(plan.churn_steps))
    out = be.run(latents, churn if len(plan.churn_steps) else None, labels.cuda())
    assert out.device.type == "cuda"
    bound = max(1e-5, 2 * rel_err(ref32, ref64))
    assert rel_err(out.cpu(), ref64) <= bound, (rel_err(out.cpu(), ref64), bound)


def test_backend_unavailable_without_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "onnxruntime" in OnnxBackend.unavailable_reason()


# ------------------------------------------------------------------------------------------
# edm-fast export.

def export_cli(*argv):
    parser = argparse.ArgumentParser(prog="edm-fast")
    add_export_command(parser.add_subparsers(dest="command"), argparse.HelpFormatter)
    args = parser.parse_args(["export", *argv])
    return args.func(args)


def test_cli_export_onnx(tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "digits.onnx"  # missing folders are created
    assert export_cli("--ckpt", "default", "--format", "onnx", "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "max relative error" in text and "inputs x, sigma, class_labels" in text
    error = float(text.split("max relative error ")[1].split()[0])
    assert 0 < error <= 1e-4
    session = make_session(out, threads=1)
    assert [i.shape for i in session.get_inputs()] == [["batch", 1, 16, 16], ["batch"],
                                                       ["batch", 10]]


def test_cli_export_onnx_static_float16(tmp_path, capsys):
    out = tmp_path / "digits16.onnx"
    assert export_cli("--format", "onnx", "--out", str(out), "--dtype", "float16", "--batch",
                      "4", "--opset", "18") == 0
    assert "max relative error" in capsys.readouterr().out
    meta = read_onnx_metadata(out)
    assert meta["edm_fast.net_dtype"] == "float16" and meta["edm_fast.batch"] == "4"
    assert make_session(out, threads=1).get_inputs()[0].shape == [4, 1, 16, 16]


def test_cli_export_torchscript(tmp_path):
    out = tmp_path / "new" / "sub" / "digits.ts"  # missing folders are created
    assert export_cli("--format", "torchscript", "--out", str(out)) == 0
    module = torch.jit.load(str(out))
    x, sigma, labels = case_inputs(3, (1, 16, 16), label_dim=10)
    from edm_fast.io.models import load_denoiser

    ref = torch_denoise(load_denoiser("default"), x, sigma, labels)
    assert rel_max(module(x, sigma, labels), ref) <= 1e-5
    assert read_metadata(out)["edm_fast.label_dim"] == "10"


def test_cli_export_safetensors(tmp_path):
    from edm_fast.io.models import load_denoiser

    out = tmp_path / "new" / "digits16.safetensors"
    assert export_cli("--format", "safetensors", "--out", str(out), "--dtype", "float16") == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        names = f.keys()
        tensors = [f.get_tensor(k) for k in names]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float16}
    assert isinstance(load_denoiser(out), Denoiser)
    with pytest.raises(ValueError, match="--batch"):
        export_cli("--format", "safetensors", "--out", str(out), "--batch", "2")


def test_cli_rejects_toy_models(tmp_path):
    with pytest.raises(ValueError, match="needs a network with EDM preconditioning"):
        export_cli("--ckpt", "toy-gmm", "--format", "onnx", "--out", str(tmp_path / "t.onnx"))


@pytest.fixture
def no_export(monkeypatch):
    """Loading the model or exporting fails the test: --out is checked before either."""
    from edm_fast.cli import export as cli_export

    def fail(*_, **__):
        raise AssertionError("loaded or exported before the --out check")

    monkeypatch.setattr(cli_export, "_load", fail)
    monkeypatch.setattr(cli_export, "_export_safetensors", fail)


@pytest.mark.parametrize("fmt", ["onnx", "aoti", "torchscript", "safetensors"])
def test_cli_export_refuses_a_folder_or_an_unwritable_place_up_front(tmp_path, fmt, no_export,
                                                                     capsys):
    """One behaviour for every format, decided before the model is loaded (aoti compiled for
    tens of seconds before torch failed on an existing folder)."""
    from edm_fast.cli.main import main
    from edm_fast.cli.export import SUFFIXES

    suffix = SUFFIXES[fmt][0]
    folder = tmp_path / f"folder{suffix}"
    folder.mkdir()
    (tmp_path / "afile").write_text("")
    for out, message in [(folder, "is an existing folder"),
                         (tmp_path / "afile" / "sub" / f"x{suffix}",
                          "afile is not a writable folder")]:
        with pytest.raises(ValueError, match=message):
            export_cli("--format", fmt, "--out", str(out))
        assert main(["export", "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("edm-fast export: error: ") and message in err[0]
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_cli_export_refuses_a_read_only_folder(tmp_path, no_export):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="is not a writable folder"):
            export_cli("--format", "torchscript", "--out", str(folder / "new" / "x.ts"))
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("fmt, out, message", [
    ("onnx", "m.pt2", ("--format onnx writes a .onnx file, not .pt2 (a .pt2 file is what "
                       "`edm-fast export --format aoti` writes)")),
    ("aoti", "m.onnx", "--format aoti writes a .pt2 file, not .onnx"),
    ("aoti", "m.PT2", "--format aoti writes a .pt2 file, not .PT2"),  # the C++ loader's match
    ("torchscript", "m.pt", ("a .ts or .torchscript file, not .pt (edm-fast reads a .pt file "
                             "as an NVlabs training state)")),
    ("torchscript", "m.onnx", "a .ts or .torchscript file, not .onnx"),
    ("safetensors", "m.ts", "--format safetensors writes a .safetensors file, not .ts"),
    ("onnx", "digits", "a .onnx file; name it {tmp}/digits.onnx (no suffix is added)"),
    ("safetensors", "digits", "name it {tmp}/digits.safetensors"),
])
def test_cli_export_refuses_a_suffix_of_another_format(tmp_path, fmt, out, message, no_export):
    """A file's suffix says what it holds (the loaders go by it): no .onnx holding a
    safetensors checkpoint, no .pt2 holding an ONNX graph."""
    with pytest.raises(ValueError) as info:
        export_cli("--format", fmt, "--out", str(tmp_path / out))
    assert message.format(tmp=tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_suffixes_the_loaders_know(tmp_path):
    """Every accepted suffix is one `edm-fast sample` recognises as that export (and refuses
    to sample from), or the checkpoint suffix; the C++ loader takes .pt2 as AOTInductor."""
    from edm_fast.cli.export import SUFFIXES, check_out_file
    from edm_fast.io.models import EXPORT_SUFFIXES

    names = {"onnx": "ONNX", "aoti": "AOTInductor", "torchscript": "TorchScript",
             "openvino": "OpenVINO"}
    for fmt, suffixes in SUFFIXES.items():
        for suffix in suffixes:
            assert check_out_file(tmp_path / "new" / f"m{suffix}", suffixes, "x") == (
                tmp_path / "new" / f"m{suffix}")
            if fmt != "safetensors":
                assert EXPORT_SUFFIXES[suffix] == names[fmt], suffix
    assert set(EXPORT_SUFFIXES) == {s for f in names for s in SUFFIXES[f]}
    assert not (tmp_path / "new").exists()  # created when the file is written, not before


@pytest.mark.slow
def test_cli_export_aoti(tmp_path):
    """AOTInductor compiles C++ kernels: tens of seconds on a CPU."""
    import shutil

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("AOTInductor needs a C++ compiler")
    out = tmp_path / "digits.pt2"
    assert export_cli("--format", "aoti", "--out", str(out)) == 0
    runner = torch._inductor.aoti_load_package(str(out))
    x, sigma, labels = case_inputs(3, (1, 16, 16), label_dim=10)
    from edm_fast.io.models import load_denoiser

    ref = torch_denoise(load_denoiser("default"), x, sigma, labels)
    assert rel_max(runner(x, sigma, labels), ref) <= 1e-4
