"""The C++ extension edm_fast._C (csrc/): seed noise and the generic program executor against
the Python executor (edm_fast.sampling.backends.executor.run_program) for every solver's program, the
'cpp' backend, export of NVlabs-form denoisers, and the standalone CMake binary (--plan files).

Tests that need the extension skip only when it is missing AND EDM_FAST_REQUIRE_CPP != "1"
(CI sets it, so a broken build fails there instead of skipping). CUDA cases run through the
conftest ``device`` fixture and skip cleanly without a GPU.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from edm_fast.sampling import cpp_extension as ops
from edm_fast.sampling.backends.cpp import CppBackend
from edm_fast.sampling.backends.executor import run_program
from edm_fast.io.export import export_aoti, export_torchscript
from edm_fast.guidance import Guidance, GuidedDenoiser
from edm_fast.noise import SeedNoise
from edm_fast.plan import SamplingPlan
from edm_fast.precond import Denoiser, EDMPrecond, NotADenoiserError, VEPrecond
from edm_fast.io.program_file import read_program_file, write_program_file
from edm_fast.sampling.reference import NonFiniteError
from edm_fast.solvers import SOLVERS

REQUIRE_CPP = os.environ.get("EDM_FAST_REQUIRE_CPP", "0") == "1"
HAS_CPP = ops._load()
needs_cpp = pytest.mark.skipif(not HAS_CPP and not REQUIRE_CPP,
                               reason=f"edm_fast._C not built ({ops.load_error()})")

SHAPE = (3, 9, 7)  # an odd image shape: (C, H, W)
LABEL_DIM = 4
# churn on a middle range of steps only; S_noise != 1 so that a program dropping it is caught
CHURN = dict(S_churn=30.0, S_min=0.05, S_max=50.0, S_noise=1.007)


@pytest.fixture(autouse=True)
def _cpp_not_disabled(monkeypatch):
    monkeypatch.delenv("EDM_FAST_DISABLE_CPP", raising=False)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 on the CPU."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the whole batch, in float64 on the CPU."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------------
# A small random-weight network F(x, c_noise, labels) with non-trivial output.

class TinyConvNet(nn.Module):
    """conv -> + embedding(c_noise, labels) -> SiLU -> conv. x: (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, channels: int, hidden: int = 8, label_dim: int = 0):
        super().__init__()
        self.label_dim = label_dim
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.map_noise = nn.Linear(1, hidden)
        self.map_label = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels.reshape(-1, 1))
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(class_labels)
        h = nn.functional.silu(self.conv_in(x) + emb[:, :, None, None])
        return self.conv_out(h)


def make_denoiser(label_dim: int, dtype=torch.float32, device="cpu") -> Denoiser:
    torch.manual_seed(1234 + label_dim)
    net = TinyConvNet(SHAPE[0], label_dim=label_dim).to(device, dtype).eval()
    return Denoiser(net, EDMPrecond(), label_dim=label_dim)


class ModelCache:
    """Exports each (kind, label_dim, dtype, device) once per session, on first use; AOTI takes
    seconds, so most tests use TorchScript and AOTI only the conditional float32 model."""

    def __init__(self, tmp_dir):
        self.tmp_dir, self.paths, self.samplers = tmp_dir, {}, {}

    def path(self, kind, label_dim, dtype=torch.float32, device="cpu"):
        key = (kind, label_dim, dtype, str(device))
        if key not in self.paths:
            name = f"{kind}_{label_dim}_{str(dtype)[6:]}_{torch.device(device).type}"
            path = os.path.join(self.tmp_dir, name + (".pt2" if kind == "aoti" else ".ts"))
            export = export_aoti if kind == "aoti" else export_torchscript
            export(make_denoiser(label_dim, dtype, device), (2, *SHAPE), device=device,
                   dtype=dtype, path=path)
            self.paths[key] = path
        return self.paths[key]

    def sampler(self, kind, label_dim, dtype=torch.float32, device="cpu"):
        key = (kind, label_dim, dtype, str(device))
        if key not in self.samplers:
            path = self.path(kind, label_dim, dtype, device)
            self.samplers[key] = ops.load_sampler(path, kind=kind, device=device)
        return self.samplers[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return ModelCache(str(tmp_path_factory.mktemp("cpp_models")))


# ------------------------------------------------------------------------------------------
# Loading and the kill-switch (no extension needed).

def test_disable_env_turns_cpp_off(monkeypatch):
    monkeypatch.setenv("EDM_FAST_DISABLE_CPP", "1")
    assert not ops.cpp_available()
    assert "EDM_FAST_DISABLE_CPP" in ops.load_error()
    with pytest.raises(RuntimeError, match="unavailable"):
        ops.seed_noise([0], (2,), 1)


def test_import_edm_fast_does_not_load_extension():
    code = ("import sys, edm_fast, edm_fast.sampling.cpp_extension, edm_fast.io.export, edm_fast.sampling.backends.cpp; "
            "assert 'edm_fast._C' not in sys.modules, 'loaded eagerly'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------------------------------------------
# Seed noise.

@needs_cpp
@pytest.mark.parametrize("shape", [(3, 9, 7), (5,), (1,), (2, 4, 4)])
def test_seed_noise_bit_exact(shape):
    """Latent then noise draws, each seed its own stream (small shapes take ATen's scalar path,
    >= 16 elements the vectorised one)."""
    seeds = [0, 1, 7, 123456789, 2**40 + 3, 2**63 - 1]
    out = ops.seed_noise(seeds, shape, 4)  # (draws, N, *shape)
    noise = SeedNoise(seeds, shape)
    ref = torch.cat([noise.draw()[None], noise.draw_many(3)])
    assert out.dtype == torch.float32 and out.shape == (4, len(seeds), *shape)
    assert torch.equal(out, ref)
    # a seed's stream does not depend on the other seeds in the batch
    assert torch.equal(ops.seed_noise([seeds[3]], shape, 4)[:, 0], out[:, 3])
    with pytest.raises(ValueError, match="2\\^63, beyond the C\\+\\+ ops' int64 seeds"):
        ops.seed_noise([2**63], shape, 1)  # a TorchScript type error before


# ------------------------------------------------------------------------------------------
# Every solver's program: the C++ executor against the Python executor on the same noise.

def reference(denoiser, plan, latents, noise, labels, dtype=torch.float64):
    """edm_fast.sampling.backends.executor.run_program with the eager ``denoiser`` in ``dtype``."""
    def cast(t):
        return None if t is None else t.to(dtype)
    return run_program(plan.program, lambda x, sigma, lab: denoiser(x, sigma, lab),
                       cast(latents), cast(noise), cast(labels), guidance=Guidance(plan.guidance))


def inputs(plan, batch, label_dim, device="cpu", seed=0):
    """Per-seed latents and noise draws (float32) and one-hot labels (or None)."""
    noise = SeedNoise(range(seed, seed + batch), SHAPE)
    latents = noise.draw()
    draws = noise.draw_many(plan.num_noise) if plan.num_noise else None
    labels = None
    if label_dim:
        labels = nn.functional.one_hot(torch.arange(batch) % label_dim, label_dim).float()

    def move(t):
        return None if t is None else t.to(device)
    return move(latents), move(draws), move(labels)


def run_cpp(sampler, plan, latents, noise, labels, dtype):
    def cast(t):
        return None if t is None else t.to(dtype)
    return sampler.run_program(cast(latents), *ops.program_args(plan.program), cast(noise),
                               cast(labels), plan.guidance)


# every solver with its default options, then the variants the brief names
CASES = {name: dict(solver=name) for name in SOLVERS}
CASES.update({
    "heun_churn": dict(solver="heun", **CHURN),
    "ddim_eta0.5": dict(solver="ddim", eta=0.5),
    "dpmpp_3m_sde_eta0.7": dict(solver="dpmpp_3m_sde", eta=0.7, S_noise=1.007),
    "heun_guided": dict(solver="heun", guidance=2.5),
    "dpmpp_2m_guided_interval": dict(solver="dpmpp_2m", guidance=1.7,
                                     guidance_interval=(0.3, 20.0)),
    "euler_churn_guided_interval": dict(solver="euler", **CHURN, guidance=2.0,
                                        guidance_interval=(0.1, 5.0)),
})
NUM_STEPS = 8


@needs_cpp
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_program_matches_python_executor(models, case, batch, device, no_tf32):
    """float64: C++ equals the Python executor up to rounding order (observed 0 on the CPU);
    float32: within 4x the float32 Python executor's own error against float64."""
    plan = SamplingPlan.build(num_steps=NUM_STEPS, **CASES[case])
    if "interval" in case:  # the interval leaves some evaluations unguided
        assert 0 < sum(op.guided for op in plan.program.ops if op.kind == 1) < plan.num_evals
    latents, noise, labels = inputs(plan, batch, LABEL_DIM, device)
    den64 = make_denoiser(LABEL_DIM, torch.float64, device)
    ref = reference(den64, plan, latents, noise, labels)

    out64 = run_cpp(models.sampler("torchscript", LABEL_DIM, torch.float64, device), plan,
                    latents, noise, labels, torch.float64)
    assert out64.dtype == torch.float64 and out64.shape == latents.shape
    assert rel_l2(out64, ref) <= 1e-12

    out32 = run_cpp(models.sampler("torchscript", LABEL_DIM, torch.float32, device), plan,
                    latents, noise, labels, torch.float32)
    own = rel_l2(reference(make_denoiser(LABEL_DIM, device=device), plan, latents, noise, labels,
                           torch.float32), ref)
    assert out32.dtype == torch.float32
    assert rel_l2(out32, ref) <= max(1e-5, 4 * own), (rel_l2(out32, ref), own)


@needs_cpp
def test_aoti_runs_programs_like_torchscript(models, device, no_tf32):
    """The AOTInductor package runs the same programs (guided and unguided evaluations, noise)
    as the TorchScript trace of the same denoiser."""
    for kwargs in (CASES["euler_churn_guided_interval"], CASES["dpmpp_3m_sde"]):
        plan = SamplingPlan.build(num_steps=NUM_STEPS, **kwargs)
        latents, noise, labels = inputs(plan, 3, LABEL_DIM, device, seed=11)
        aoti = run_cpp(models.sampler("aoti", LABEL_DIM, device=device), plan, latents, noise,
                       labels, torch.float32)
        ref = reference(make_denoiser(LABEL_DIM, torch.float64, device), plan, latents, noise,
                        labels)
        assert rel_l2(aoti, ref) <= 1e-5


@needs_cpp
def test_unconditional_model_and_missing_labels(models, device, no_tf32):
    """An unconditional model (no labels input); a conditional one without labels gets zero
    labels."""
    plan = SamplingPlan.build(num_steps=6, solver="dpmpp_2m")
    latents, _, _ = inputs(plan, 2, 0, device)
    out = run_cpp(models.sampler("torchscript", 0, device=device), plan, latents, None, None,
                  torch.float32)
    assert rel_l2(out, reference(make_denoiser(0, torch.float64, device), plan, latents, None,
                                 None)) <= 1e-5
    out = run_cpp(models.sampler("torchscript", LABEL_DIM, device=device), plan, latents, None,
                  None, torch.float32)
    zeros = torch.zeros(2, LABEL_DIM, device=device)
    assert rel_l2(out, reference(make_denoiser(LABEL_DIM, torch.float64, device), plan, latents,
                                 None, zeros)) <= 1e-5


@needs_cpp
def test_sample_seeds_matches_python(models, device, no_tf32):
    """Seed noise (latent, then the program's draws) and program all in C++ (the standalone
    binary's path)."""
    plan = SamplingPlan.build(num_steps=6, solver="dpmpp_2m_sde", guidance=2.0)
    sampler = models.sampler("aoti", LABEL_DIM, device=device)
    labels = nn.functional.one_hot(torch.tensor([1, 1, 1, 1]), LABEL_DIM).float().to(device)
    out = sampler.sample_seeds([3, 0, 9, 4], *ops.program_args(plan.program), labels, 2.0)
    noise = SeedNoise([3, 0, 9, 4], SHAPE)
    latents = noise.draw()
    ref = reference(make_denoiser(LABEL_DIM, torch.float64, device), plan, latents.to(device),
                    noise.draw_many(plan.num_noise).to(device), labels)
    assert rel_l2(out, ref) < 1e-5
    with pytest.raises(RuntimeError, match="guidance needs class_labels"):  # would be a no-op
        sampler.sample_seeds([3], *ops.program_args(plan.program), None, 2.0)


@needs_cpp
def test_denoise_matches_denoiser(models):
    x = torch.randn(5, *SHAPE)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0])
    labels = nn.functional.one_hot(torch.arange(5) % LABEL_DIM, LABEL_DIM).float()
    for kind in ("aoti", "torchscript"):
        sampler = models.sampler(kind, LABEL_DIM)
        assert sampler.label_dim() == LABEL_DIM and sampler.sample_shape() == list(SHAPE)
        assert sampler.kind() == kind and sampler.device() == "cpu"
        out = sampler.denoise(x, sigma, labels)
        assert rel_err(out, make_denoiser(LABEL_DIM)(x, sigma, labels)) < 1e-6


# ------------------------------------------------------------------------------------------
# Input checks: the C++ messages say what is wrong and what to do.

@needs_cpp
def test_missing_model_file(tmp_path):
    with pytest.raises(RuntimeError, match="does not exist"):
        ops.load_sampler(tmp_path / "nope.pt2")


@needs_cpp
def test_loader_errors(models, tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="could not load the AOTInductor package"):
        ops.load_sampler(bad)
    with pytest.raises(RuntimeError, match="could not load the TorchScript file"):
        ops.load_sampler(bad, kind="torchscript")
    path = models.path("aoti", LABEL_DIM)
    for cpu_model in (path, models.path("torchscript", 0)):
        with pytest.raises(RuntimeError, match="device mismatch|no CUDA support"):
            ops.load_sampler(cpu_model, device="cuda")
    with pytest.raises(RuntimeError, match="model kind must be"):
        ops.load_sampler(path, kind="onnx")


@needs_cpp
def test_input_errors(models):
    plan = SamplingPlan.build(num_steps=6, **CHURN)
    k = plan.num_noise
    assert k > 0
    cond = models.sampler("torchscript", LABEL_DIM)
    uncond = models.sampler("torchscript", 0)
    x = torch.randn(2, *SHAPE)
    eps = torch.randn(k, 2, *SHAPE)
    labels = torch.zeros(2, LABEL_DIM)

    def run(sampler=cond, x=x, eps=eps, labels=labels, guidance=None):
        return sampler.run_program(x, *ops.program_args(plan.program), eps, labels, guidance)

    cases = [
        (dict(x=torch.randn(2, 3, 8, 8), eps=torch.randn(k, 2, 3, 8, 8)), "shape mismatch"),
        (dict(eps=torch.randn(k + 1, 2, *SHAPE)), "wrong K: noise has"),
        (dict(eps=torch.randn(k, 3, *SHAPE)), "shape mismatch between latents"),
        (dict(eps=None), "reads K = .* noise draws but no noise was given"),
        (dict(labels=torch.zeros(3, LABEL_DIM)), "class_labels must be"),
        (dict(labels=torch.zeros(2, LABEL_DIM + 1)), "class_labels must be"),
        (dict(sampler=uncond), "unconditional"),
        (dict(sampler=uncond, labels=None, guidance=2.0), "guidance needs a class-conditional"),
        (dict(guidance=math.nan), "guidance weight must be finite"),
        (dict(x=x.double(), eps=eps.double()), "exported for"),
        (dict(x=x.to("meta"), eps=eps.to("meta")), "latents are on meta"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RuntimeError, match=message):
            run(**kwargs)
    assert run().shape == x.shape  # the unchanged inputs are fine


def _arrays(**changes):
    """The arrays of a small valid program (x = 80 n; D = D(x; 80); x + 0.5 noise_0 - D) with
    ``changes``, as the Sampler's arguments."""
    a = dict(kinds=[0, 1, 0], dsts=[0, 1, 0], sigmas=[0.0, 80.0, 0.0], guided=[1, 1, 1],
             term_start=[0, 1, 2, 5], srcs=[-1, 0, 0, -2, 1], coefs=[80.0, 1.0, 1.0, 0.5, -1.0],
             num_registers=2, output=0, num_noise=1)
    a.update(changes)
    return tuple(a.values())


@needs_cpp
def test_program_validation(models):
    """Bad program arrays are refused once, at the executor's boundary, with the op named."""
    sampler = models.sampler("torchscript", LABEL_DIM)
    x, eps = torch.randn(2, *SHAPE), torch.randn(1, 2, *SHAPE)
    out = sampler.run_program(x, *_arrays(), eps, None, None)
    den = make_denoiser(LABEL_DIM)
    x80 = 80 * x
    expected = x80 + 0.5 * eps[0] - den(x80, torch.full((2,), 80.0), torch.zeros(2, LABEL_DIM))
    assert rel_err(out, expected) < 1e-6
    cases = [
        (dict(dsts=[0, 1]), "one entry per op"),
        (dict(term_start=[0, 1, 2]), "one entry per op"),
        (dict(coefs=[80.0, 1.0, 1.0, 0.5]), "term_start must run from 0 to len"),
        (dict(term_start=[0, 2, 1, 5]), "term_start must not decrease"),
        (dict(kinds=[0, 2, 0]), "op 1 has kind 2"),
        (dict(srcs=[-1, 1, 0, -2, 1]), "op 1 reads register 1 before it is written"),
        (dict(srcs=[-1, 0, 0, -2, 7]), "op 2 reads register 7 of 2"),
        (dict(srcs=[-1, 0, 0, -3, 1]), "op 2 reads noise draw 1 of num_noise = 1"),
        (dict(dsts=[0, 2, 0]), "op 1 writes register 2 of 2"),
        (dict(coefs=[80.0, 1.0, 1.0, math.inf, -1.0]), "op 2 has a non-finite coefficient"),
        (dict(sigmas=[0.0, 0.0, 0.0]), r"op 1 \(EVAL\) needs a finite sigma > 0"),
        (dict(sigmas=[0.0, math.nan, 0.0]), r"op 1 \(EVAL\) needs a finite sigma > 0"),
        (dict(srcs=[-1, 1, 0, -2, 1], dsts=[1, 1, 0]), "exactly one source other than its"),
        (dict(term_start=[0, 1, 1, 5]), r"op 1 \(EVAL\) must read exactly one source"),
        (dict(guided=[1, 2, 1]), "guided = 2"),
        (dict(num_registers=0), "num_registers must be >= 1"),
        (dict(output=1, dsts=[0, 1, 0], num_registers=3), None),  # fine: register 1 holds D
        (dict(output=2, num_registers=3), "the output reads register 2 before it is written"),
        (dict(output=-3), "the output reads noise draw 1"),
    ]
    for changes, message in cases:
        if message is None:
            sampler.run_program(x, *_arrays(**changes), eps, None, None)
            continue
        with pytest.raises(RuntimeError, match=message):
            sampler.run_program(x, *_arrays(**changes), eps, None, None)


@needs_cpp
def test_lin_may_overwrite_its_sources(models):
    """r0 = 2 r0 - r1 and r1 = r1 + r0 read all their sources before writing."""
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    sampler64 = models.sampler("torchscript", LABEL_DIM, torch.float64)
    arrays = dict(kinds=[0, 0, 0, 0], dsts=[0, 1, 0, 1], sigmas=[0.0] * 4, guided=[1] * 4,
                  term_start=[0, 1, 2, 4, 6], srcs=[-1, -1, 0, 1, 1, 0],
                  coefs=[3.0, 0.5, 2.0, -1.0, 1.0, 1.0], num_registers=2, output=1, num_noise=0)
    out = sampler64.run_program(x, *arrays.values(), None, None, None)
    r0 = 2 * (3 * x) - 0.5 * x
    assert torch.equal(out, 0.5 * x + r0)


# ------------------------------------------------------------------------------------------
# The backend class.

@needs_cpp
def test_cpp_backend_runs_plan(tmp_path):
    plan = SamplingPlan.build(num_steps=6, solver="euler", **CHURN)
    denoiser = make_denoiser(LABEL_DIM)
    guided = GuidedDenoiser(denoiser, 3.0)  # unwrapped; its weight is used (plan has none)
    backend = CppBackend(guided, plan, (4, *SHAPE), dtype=torch.float32, device="cpu",
                         label_dim=LABEL_DIM, kind="torchscript", model_path=tmp_path / "d.ts")
    assert backend.warmup_seconds > 0 and backend.plan.guidance == 3.0
    latents, noise, _ = inputs(plan, 4, LABEL_DIM, seed=5)
    classes = torch.tensor([0, 3, 2, 1])
    out = backend.run(latents, noise, classes)  # int labels are one-hot encoded
    labels = nn.functional.one_hot(classes, LABEL_DIM).float()
    ref = reference(make_denoiser(LABEL_DIM, torch.float64), backend.plan, latents, noise,
                    labels)
    assert rel_l2(out, ref) < 1e-5
    exported = (tmp_path / "d.ts").stat()
    again = CppBackend(denoiser, backend.plan, (4, *SHAPE), dtype=torch.float32, device="cpu",
                       label_dim=LABEL_DIM, kind="torchscript", model_path=tmp_path / "d.ts",
                       reuse_model=True)
    reused = (tmp_path / "d.ts").stat()  # loaded, not exported again (an atomic write replaces)
    assert (reused.st_ino, reused.st_mtime_ns) == (exported.st_ino, exported.st_mtime_ns)
    assert torch.equal(again.run(latents, noise, classes), out)
    assert again.evaluate_once(latents, 2.0, classes).shape == latents.shape


@needs_cpp
def test_cpp_backend_raises_nonfinite_error(models, tmp_path):
    den = make_denoiser(0)
    with torch.no_grad():
        den.model.conv_out.bias[0] = math.nan
    plan = SamplingPlan.build(num_steps=3, solver="dpmpp_2m")
    backend = CppBackend(den, plan, (2, *SHAPE), dtype=torch.float32, device="cpu", label_dim=0,
                         kind="torchscript", model_path=tmp_path / "nan.ts")
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        backend.run(torch.randn(2, *SHAPE))


# ------------------------------------------------------------------------------------------
# A denoiser in NVlabs' form (forward(x, sigma, class_labels) + label_dim, img_channels,
# img_resolution), not an edm_fast.precond.Denoiser.

class NVlabsStyleEDM(nn.Module):
    """EDM preconditioning (EDM Eq. 7, Table 1) around a small conv net, written the way NVlabs'
    training/networks.py EDMPrecond is (but in x's dtype, so that float64 runs in float64)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, sigma_data=0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = (img_resolution, img_channels,
                                                                  label_dim)
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, float("inf"), sigma_data
        self.model = TinyConvNet(img_channels, label_dim=label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        class_labels = (None if self.label_dim == 0 else
                        torch.zeros([1, self.label_dim], device=x.device, dtype=x.dtype)
                        if class_labels is None else
                        class_labels.to(x.dtype).reshape(-1, self.label_dim))
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model(c_in * x, c_noise.flatten(), class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


@needs_cpp
def test_nvlabs_form_denoiser_samples_on_cpp(tmp_path):
    torch.manual_seed(7)
    module = NVlabsStyleEDM(SHAPE[1], SHAPE[0], label_dim=LABEL_DIM).double().eval()
    plan = SamplingPlan.build(num_steps=6, solver="heun", **CHURN, guidance=1.5)
    backend = CppBackend(GuidedDenoiser(module, 1.5), plan, (3, *SHAPE), dtype=torch.float64,
                         device="cpu", label_dim=LABEL_DIM, kind="torchscript",
                         model_path=tmp_path / "nv.ts")
    latents, noise, labels = inputs(plan, 3, LABEL_DIM)
    out = backend.run(latents, noise, labels)
    ref = reference(module, plan, latents, noise, labels)
    assert out.dtype == torch.float64 and rel_l2(out, ref) <= 1e-12
    meta = backend.sampler
    assert meta.label_dim() == LABEL_DIM and meta.sample_shape() == list(SHAPE)
    for not_a_denoiser in (nn.Linear(2, 2), TinyConvNet(3)):
        with pytest.raises(NotADenoiserError, match="NVlabs' form"):
            export_torchscript(not_a_denoiser, (2, *SHAPE), path=tmp_path / "x.ts")


# ------------------------------------------------------------------------------------------
# Program files (edm_fast.io.program_file): what the standalone binary reads.

@pytest.mark.parametrize("case", ["heun_churn", "dpmpp_2m_guided_interval", "ddpm"])
def test_program_file_round_trip(tmp_path, case):
    plan = SamplingPlan.build(num_steps=5, **CASES[case])
    path = write_program_file(tmp_path / "plan.txt", plan)
    text = open(path).read()
    assert text.startswith("edm-fast-program 1\n") and f"info solver {plan.solver}" in text
    assert read_program_file(path) == plan  # floats as repr: the same float64 values


def test_program_file_errors_name_the_line(tmp_path):
    plan = SamplingPlan.build(num_steps=3, solver="euler")
    good = open(write_program_file(tmp_path / "p.txt", plan)).read().splitlines()
    ops_line = next(i for i, line in enumerate(good) if line.startswith("ops "))

    def read(lines):
        (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
        return read_program_file(tmp_path / "bad.txt")

    with pytest.raises(ValueError, match="not an edm-fast program file"):
        read(["edm-fast-program 2"] + good[1:])
    with pytest.raises(ValueError, match=f"bad.txt:{ops_line + 2}: an op line must be"):
        read(good[:ops_line + 1] + ["mul 0 -1:1.0"] + good[ops_line + 2:])
    with pytest.raises(ValueError, match="but 2 op lines"):
        read(good[:ops_line + 3])
    with pytest.raises(ValueError, match="unknown key 'steps'"):
        read(good[:1] + ["steps 18"] + good[1:])
    with pytest.raises(ValueError, match="reads register 5 before it is written"):
        read(good[:ops_line + 1] + ["lin 0 5:1.0"] + good[ops_line + 2:])


# ------------------------------------------------------------------------------------------
# The standalone binary (CMake, libtorch only).

@pytest.fixture(scope="session")
def standalone_binary(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = tmp_path_factory.mktemp("cmake_build")
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", root, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_PREFIX_PATH={prefix}"], check=True, capture_output=True)
    jobs = str(min(8, os.cpu_count() or 1))
    subprocess.run(["cmake", "--build", str(build), "-j", jobs], check=True, capture_output=True)
    return str(build / "edm_fast_sample")


def one_hot(classes, n):
    return nn.functional.one_hot(torch.full((n,), classes), LABEL_DIM).float()


@needs_cpp
@pytest.mark.slow
def test_standalone_binary_matches_python(models, standalone_binary, tmp_path, device, no_tf32):
    """Build with CMake (~1 min here), sample seeds 0-3 with a plan file (a noise-injecting
    solver, guidance on part of the grid) and compare with the Python executor."""
    plan = SamplingPlan.build(num_steps=8, solver="dpmpp_3m_sde", guidance=1.5,
                              guidance_interval=(0.2, 30.0))
    plan_file = write_program_file(tmp_path / "plan.txt", plan)
    out = tmp_path / "out.npy"
    args = ["--model", models.path("aoti", LABEL_DIM, device=device), "--plan", plan_file,
            "--seeds", "0-3", "--batch", "3", "--class", "2",
            "--shape", ",".join(map(str, SHAPE)), "--device", device.type, "--out", str(out)]
    run = subprocess.run([standalone_binary, *args], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert f"{plan.num_evals} NFE per batch" in run.stderr
    images = np.load(out)
    assert images.dtype == np.float32 and images.shape == (4, *SHAPE)
    noise = SeedNoise(range(4), SHAPE)
    latents = noise.draw()
    ref = reference(make_denoiser(LABEL_DIM, torch.float64), plan, latents,
                    noise.draw_many(plan.num_noise), one_hot(2, 4))
    assert rel_l2(torch.from_numpy(images), ref) < 1e-5

    for extra, message in ((["--model", str(tmp_path / "missing.pt2")], "does not exist"),
                           (["--steps", "18"], "unknown option --steps .* in the --plan file"),
                           (["--plan", str(tmp_path / "none.txt")], "--plan '.*none.txt' does "
                                                                       "not exist"),
                           (["--plan", str(out)], "not an edm-fast program file")):
        bad = subprocess.run([standalone_binary, *args, *extra], capture_output=True, text=True,
                             check=False)
        assert bad.returncode == 1 and re.search(message, bad.stderr), bad.stderr
    no_class = [a for a in args if a not in ("--class", "2")]
    bad = subprocess.run([standalone_binary, *no_class], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 1 and "guidance weight, which needs --class" in bad.stderr
    lines = open(plan_file).read().splitlines()
    (tmp_path / "bad.txt").write_text("\n".join(
        line.replace("eval 1 0", "eval 1 1") if line.startswith("eval 1 0") else line
        for line in lines) + "\n")
    bad = subprocess.run([standalone_binary, *args, "--plan", str(tmp_path / "bad.txt")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "op 1 reads register 1 before it is written" in bad.stderr
    help_text = subprocess.run([standalone_binary, "--help"], capture_output=True, text=True,
                               check=True).stdout
    options = [line.split()[0] for line in help_text.splitlines() if line.startswith("  --")]
    assert "--plan" in options and "--steps" not in options  # the plan file holds the steps
    assert "edm-fast plan" in help_text  # how to write one


@needs_cpp
@pytest.mark.slow
def test_standalone_binary_takes_seeds_up_to_the_generators_limit(models, standalone_binary,
                                                                    tmp_path):
    """Seeds 2^64 - 2 and 2^64 - 1 equal the Python reference (the range loop used to overflow
    at 2^63 - 1); seeds out of range or too many are refused with one message."""
    top = 2**64 - 1
    out = tmp_path / "top.npy"
    plan = SamplingPlan.build(num_steps=4)
    model = models.path("aoti", LABEL_DIM, device=torch.device("cpu"))
    args = ["--model", model, "--plan", write_program_file(tmp_path / "p.txt", plan), "--seeds",
            f"{top - 1}-{top}", "--class", "1", "--shape", ",".join(map(str, SHAPE)),
            "--device", "cpu", "--out", str(out)]
    subprocess.run([standalone_binary, *args], check=True, capture_output=True)
    ref = reference(make_denoiser(LABEL_DIM, torch.float64), plan,
                    SeedNoise([top - 1, top], SHAPE).draw(), None, one_hot(1, 2))
    assert rel_l2(torch.from_numpy(np.load(out)), ref) < 1e-5
    for seeds in ("18446744073709551616", "-1", "0-999999999999", "5-3", "1e3"):
        bad = subprocess.run([standalone_binary, *args[:4], "--seeds", seeds], text=True,
                             capture_output=True)
        assert bad.returncode == 1 and "bad seed list" in bad.stderr, (seeds, bad.stderr)


@needs_cpp
@pytest.mark.slow
def test_standalone_binary_runs_a_static_batch_model_and_checks_out_first(standalone_binary,
                                                                            tmp_path):
    """A model exported with a static batch of 4: the binary takes 4 as its batch, pads the last
    chunk (6 seeds: 4 + 2) and equals the Python reference; another --batch is refused, and so
    is a plan guiding only part of its evaluations (it needs batches N and 2N). An --out it
    could not write is refused before the model is even loaded."""
    model = export_aoti(make_denoiser(LABEL_DIM), (4, *SHAPE), dynamic_batch=False,
                        path=tmp_path / "static4.pt2")
    plan = SamplingPlan.build(num_steps=4, solver="euler_ancestral")
    out = tmp_path / "static.npy"
    args = ["--model", str(model), "--plan", write_program_file(tmp_path / "p.txt", plan),
            "--seeds", "0-5", "--class", "1", "--out", str(out)]
    run = subprocess.run([standalone_binary, *args], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    noise = SeedNoise(range(6), SHAPE)
    latents = noise.draw()
    ref = reference(make_denoiser(LABEL_DIM, torch.float64), plan, latents,
                    noise.draw_many(plan.num_noise), one_hot(1, 6))
    assert rel_l2(torch.from_numpy(np.load(out)), ref) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt", "static.npy", "static4.pt2"]
    bad = subprocess.run([standalone_binary, *args, "--batch", "3"], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 1 and "static batch of 4, so --batch must be 4" in bad.stderr
    part = SamplingPlan.build(num_steps=4, guidance=2.0, guidance_interval=(0.5, 10.0))
    bad = subprocess.run([standalone_binary, *args, "--plan",
                          write_program_file(tmp_path / "g.txt", part)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "static batch of 4 (dynamic_batch=False) but this run " \
                                   "needs batch 2" in bad.stderr, bad.stderr
    for where, message in ((tmp_path / "missing" / "x.npy", "does not exist"),
                           (tmp_path, "is a folder")):
        bad = subprocess.run([standalone_binary, "--model", str(tmp_path / "absent.pt2"),
                              "--plan", "p.txt", "--out", str(where)], capture_output=True,
                             text=True, check=False)
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr


@needs_cpp
@pytest.mark.slow
def test_standalone_binary_nvlabs_model_and_sigma_range(standalone_binary, tmp_path):
    """An NVlabs-form denoiser exported with AOTInductor runs in the binary and matches the
    Python executor; a VE model (sigma in [0.02, 100]) warns about a plan evaluating outside
    that range, and is quiet for a plan built within it."""
    torch.manual_seed(3)
    module = NVlabsStyleEDM(SHAPE[1], SHAPE[0]).eval()
    model = export_aoti(module, (2, *SHAPE), path=tmp_path / "nv.pt2")
    plan = SamplingPlan.build(num_steps=5, solver="unipc")
    out = tmp_path / "nv.npy"
    subprocess.run([standalone_binary, "--model", model, "--seeds", "0-2", "--out", str(out),
                    "--plan", write_program_file(tmp_path / "p.txt", plan)], check=True,
                   capture_output=True)
    ref = reference(module.double(), plan, SeedNoise(range(3), SHAPE).draw(), None, None)
    assert rel_l2(torch.from_numpy(np.load(out)), ref) < 1e-5

    torch.manual_seed(5)
    den = Denoiser(TinyConvNet(SHAPE[0]).eval(), VEPrecond())
    ve = export_torchscript(den, (2, *SHAPE), path=tmp_path / "ve.ts")
    for kwargs, warns in ((dict(), True), (dict(sigma_min=0.02, sigma_max=100.0), False)):
        plan = SamplingPlan.build(num_steps=5, **kwargs)
        run = subprocess.run([standalone_binary, "--model", ve, "--seeds", "0-1", "--out",
                              str(out), "--plan", write_program_file(tmp_path / "ve.txt", plan)],
                             check=True, capture_output=True, text=True)
        assert ("outside the model's range [0.02, 100]" in run.stderr) == warns, run.stderr
    ref = reference(den.double(), plan, SeedNoise(range(2), SHAPE).draw(), None, None)
    assert rel_l2(torch.from_numpy(np.load(out)), ref) < 1e-5
