"""The C++ extension edm_fast._C (csrc/): schedule, seed noise, step ops and the Alg. 2 loop
against the Python reference (edm_fast.samplers.sample_edm), plus the standalone CMake binary.

Tests that need the extension skip only when it is missing AND EDM_FAST_REQUIRE_CPP != "1"
(CI sets it, so a broken build fails there instead of skipping). CUDA cases run through the
conftest ``device`` fixture and skip cleanly without a GPU.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from edm_fast import ops
from edm_fast.backends.cpp import CppBackend
from edm_fast.backends.plan import SamplingPlan
from edm_fast.export import export_aoti, export_torchscript
from edm_fast.guidance import GuidedDenoiser
from edm_fast.noise import SeedNoise
from edm_fast.precond import Denoiser, EDMPrecond, VEPrecond
from edm_fast.sampler import Sampler
from edm_fast.samplers import churn_gammas, sample_edm
from edm_fast.schedules import edm_sigmas

REQUIRE_CPP = os.environ.get("EDM_FAST_REQUIRE_CPP", "0") == "1"
HAS_CPP = ops._load()
needs_cpp = pytest.mark.skipif(not HAS_CPP and not REQUIRE_CPP,
                               reason=f"edm_fast._C not built ({ops.load_error()})")

SHAPE = (3, 9, 7)  # an odd image shape: (C, H, W)
LABEL_DIM = 4
# churn on a middle range of steps only; S_noise != 1 so that a loop dropping it is caught
CHURN = dict(S_churn=30.0, S_min=0.05, S_max=50.0, S_noise=1.007)


@pytest.fixture(autouse=True)
def _cpp_not_disabled(monkeypatch):
    monkeypatch.delenv("EDM_FAST_DISABLE_CPP", raising=False)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 on the CPU."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


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
    """Exports each (kind, label_dim, dtype, device) once per session; AOTI takes seconds."""

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
        ops.edm_sigmas(4)


def test_import_edm_fast_does_not_load_extension():
    code = ("import sys, edm_fast, edm_fast.ops, edm_fast.export, edm_fast.backends.cpp; "
            "assert 'edm_fast._C' not in sys.modules, 'loaded eagerly'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------------------------------------------
# Schedule (Eq. 5), gammas (Alg. 2's gamma_i) and seed noise.

@needs_cpp
@pytest.mark.parametrize("num_steps", [1, 2, 5, 18, 40, 256])
@pytest.mark.parametrize("sigma_min,sigma_max,rho", [(0.002, 80.0, 7.0), (0.02, 100.0, 1.0),
                                                     (1e-3, 3.5, 3.0), (0.5, 0.75, 0.6)])
def test_edm_sigmas_match_python(num_steps, sigma_min, sigma_max, rho):
    ref = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    out = ops.edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    assert out.dtype == torch.float64 and out.shape == (num_steps + 1,)
    assert out[-1] == 0
    rel = ((out - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()
    assert rel <= 1e-15, rel  # the same ATen float64 ops: equal in practice


@needs_cpp
def test_edm_sigmas_rejects_bad_ranges():
    with pytest.raises(RuntimeError, match="sigma_min < sigma_max"):
        ops.edm_sigmas(10, 80.0, 0.002, 7.0)
    with pytest.raises(RuntimeError, match="num_steps must be >= 1"):
        ops.edm_sigmas(0)
    for rho in (0.0, math.nan, math.inf):
        with pytest.raises(RuntimeError, match="rho must be a positive finite number"):
            ops.edm_sigmas(10, 0.002, 80.0, rho)
    for rho in (1e-3, 1e30):  # overflows float64 / collapses the grid onto one level
        with pytest.raises(RuntimeError, match="not finite and strictly decreasing"):
            ops.edm_sigmas(10, 0.002, 80.0, rho)


@needs_cpp
@pytest.mark.parametrize("S_churn,S_min,S_max", [(0.0, 0.0, math.inf), (10.0, 0.05, 50.0),
                                                  (40.0, 0.0, math.inf), (1000.0, 0.1, 1.0),
                                                  (5.0, 100.0, 200.0)])
def test_churn_gammas_match_python(S_churn, S_min, S_max):
    for num_steps in (1, 7, 18):
        sigmas = edm_sigmas(num_steps).tolist()
        assert ops.churn_gammas(sigmas, S_churn, S_min, S_max) == churn_gammas(
            sigmas, S_churn, S_min, S_max)


@needs_cpp
def test_churn_gammas_refuse_what_python_refuses():
    """NaN S_min / S_max / sigma fail every comparison and silently turned churn off in C++
    (the binary and sample_seeds too); Python's check_churn_options refuses them."""
    sigmas, nan = edm_sigmas(4).tolist(), float("nan")
    for args, message in (((sigmas, 5.0, nan, math.inf), "S_min and S_max must be numbers"),
                          ((sigmas, 5.0, 0.0, nan), "S_min and S_max must be numbers"),
                          ((sigmas, math.inf, 0.0, math.inf), "S_churn must be a finite"),
                          (([nan, *sigmas[1:]], 5.0, 0.0, math.inf), "sigma_0 is not finite")):
        with pytest.raises(RuntimeError, match=message):
            ops.churn_gammas(*args)
        if "sigma_0" not in message:  # Python checks grids in validate_sigmas instead
            with pytest.raises(ValueError):
                churn_gammas(*args)


@needs_cpp
@pytest.mark.parametrize("shape", [(3, 9, 7), (5,), (1,), (2, 4, 4)])
def test_seed_noise_bit_exact(shape):
    """Latent then churn draws, each seed its own stream (small shapes take ATen's scalar path,
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
# The step ops (the loop runs exactly these updates).

@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_ops_match_formulas(dtype, device):
    g = torch.Generator().manual_seed(0)
    x, eps, den, den2 = (torch.randn(3, *SHAPE, generator=g, dtype=torch.float64)
                         for _ in range(4))
    t_cur, t_hat, t_next = 2.5, 3.1, 1.7
    tol = 1e-6 if dtype == torch.float32 else 1e-14

    def dev(*ts):
        return [t.to(device, dtype) for t in ts]

    x_hat = ops.churn(*dev(x, eps), t_cur, t_hat, 1.007)
    ref_hat = x + math.sqrt(t_hat**2 - t_cur**2) * 1.007 * eps  # Alg. 2 l.6
    assert rel_err(x_hat, ref_hat) < tol

    x_next, d_cur = ops.euler_step(*dev(x, den), t_hat, t_next)
    ref_d = (x - den) / t_hat  # l.7
    ref_next = x + (t_next - t_hat) * ref_d  # l.8
    assert rel_err(d_cur, ref_d) < tol and rel_err(x_next, ref_next) < tol

    out = ops.heun_correct(*dev(x, ref_d, ref_next, den2), t_hat, t_next)
    d_prime = (ref_next - den2) / t_next  # l.10
    assert rel_err(out, x + (t_next - t_hat) * (0.5 * ref_d + 0.5 * d_prime)) < tol  # l.11
    with pytest.raises(RuntimeError, match="same shape"):
        ops.euler_step(*dev(x, den[:2]), t_hat, t_next)
    with pytest.raises(RuntimeError, match="t_next > 0"):
        ops.heun_correct(*dev(x, ref_d, ref_next, den2), t_hat, 0.0)
    from edm_fast.kernels import heun_correct_ref  # the Triton twin takes the same order

    per_sample = [torch.full((3,), t, dtype=dtype, device=device) for t in (t_hat, t_next)]
    assert rel_err(out, heun_correct_ref(*dev(x, ref_d, ref_next, den2), *per_sample)) < tol
    nan, inf = float("nan"), float("inf")
    for call, message in (
            (lambda: ops.heun_correct(*dev(x, ref_d, ref_next, den2), nan, t_next), "t_hat must"),
            (lambda: ops.heun_correct(*dev(x, ref_d, ref_next, den2), -1.0, t_next), "t_hat > 0"),
            (lambda: ops.euler_step(*dev(x, den), inf, t_next), "t_hat must be finite"),
            (lambda: ops.churn(*dev(x, eps), t_cur, inf), "t_hat must be finite"),
            (lambda: ops.churn(*dev(x, eps), t_cur, t_hat, nan), "S_noise must be finite"),
            (lambda: ops.churn(*dev(x, eps), t_cur, t_hat, -1.0), "S_noise must be >= 0")):
        with pytest.raises(RuntimeError, match=message):
            call()


# ------------------------------------------------------------------------------------------
# The loop against sample_edm (Alg. 2).

def reference(denoiser, plan, latents, eps, labels):
    """sample_edm in float64 on the same latents / churn draws / labels."""
    draws = iter(eps.double()) if eps is not None else iter(())
    if plan.guidance is not None:
        denoiser = GuidedDenoiser(denoiser, plan.guidance)
    kwargs = dict(CHURN) if any(plan.gammas) else {}
    return sample_edm(denoiser, latents.double(), plan.sigmas, solver=plan.solver,
                      class_labels=None if labels is None else labels.double(),
                      randn=lambda x: next(draws).to(x.device), **kwargs)


def inputs(plan, batch, label_dim, device, seed=0):
    noise = SeedNoise(range(seed, seed + batch), SHAPE)
    latents = noise.draw()
    eps = noise.draw_many(len(plan.churn_steps)) if plan.churn_steps else None
    labels = None
    if label_dim:
        classes = torch.arange(batch) % label_dim
        labels = nn.functional.one_hot(classes, label_dim).to(torch.float32)
    move = (lambda t: None if t is None else t.to(device))
    return move(latents), move(eps), move(labels)


@needs_cpp
@pytest.mark.parametrize("mode", ["uncond", "cond", "guided"])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("churn", [False, True], ids=["nochurn", "churn"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("kind", ["aoti", "torchscript"])
def test_loop_matches_sample_edm(models, kind, solver, churn, batch, mode, device, no_tf32):
    label_dim = 0 if mode == "uncond" else LABEL_DIM
    plan = SamplingPlan.build(num_steps=18, solver=solver, **(CHURN if churn else {}),
                              guidance=2.5 if mode == "guided" else None)
    assert bool(plan.churn_steps) == churn and plan.num_evals == (18 if solver == "euler" else 35)
    sampler = models.sampler(kind, label_dim, device=device)
    latents, eps, labels = inputs(plan, batch, label_dim, device)
    out = sampler.sample(latents, list(plan.sigmas), list(plan.t_hats), list(plan.gammas),
                         plan.S_noise, solver, eps, labels, plan.guidance)
    ref = reference(make_denoiser(label_dim, device=device), plan, latents, eps, labels)
    assert out.shape == latents.shape and out.dtype == torch.float32
    assert out.device.type == torch.device(device).type
    # The C++ loop keeps x in float32 and computes c_skip/c_out/c_in in float32; the reference
    # does the step math in float64 around the same float32 net. Each of the <= 35 evaluations
    # adds a few float32 roundings (~6e-8 relative) to x, and the ODE does not amplify them
    # much: observed ~3e-7, bound 1e-5.
    assert rel_err(out, ref) < 1e-5


@needs_cpp
@pytest.mark.parametrize("kind", ["aoti", "torchscript"])
def test_loop_float64_tight(models, kind, device):
    """A float64 export of a float64 net against the float64 reference: only rounding-order
    differences (fused multiply-adds, kernel order) remain, ~1e-15 per step."""
    plan = SamplingPlan.build(num_steps=12, solver="heun", **CHURN, guidance=1.7)
    sampler = models.sampler(kind, LABEL_DIM, torch.float64, device)
    latents, eps, labels = inputs(plan, 3, LABEL_DIM, device)
    out = sampler.sample(latents.double(), list(plan.sigmas), list(plan.t_hats),
                         list(plan.gammas), plan.S_noise, "heun", eps, labels, plan.guidance)
    ref = reference(make_denoiser(LABEL_DIM, torch.float64, device), plan, latents, eps, labels)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12  # observed ~7e-16 on the CPU


@needs_cpp
def test_conditional_model_without_labels_is_zero_labels(models, device, no_tf32):
    plan = SamplingPlan.build(num_steps=8)
    latents, _, _ = inputs(plan, 2, 0, device)
    sampler = models.sampler("torchscript", LABEL_DIM, device=device)
    out = sampler.sample(latents, list(plan.sigmas), list(plan.t_hats), list(plan.gammas), 1.0,
                         "heun", None, None, None)
    ref = reference(make_denoiser(LABEL_DIM, device=device), plan, latents, None, None)
    assert rel_err(out, ref) < 1e-5


@needs_cpp
def test_sample_seeds_matches_python(models, device, no_tf32):
    """Schedule, churn, seed noise and loop all in C++ (the standalone binary's path)."""
    plan = SamplingPlan.build(num_steps=10, **CHURN, guidance=2.0)
    sampler = models.sampler("aoti", LABEL_DIM, device=device)
    labels = nn.functional.one_hot(torch.tensor([1, 1, 1, 1]), LABEL_DIM).float().to(device)
    out = sampler.sample_seeds([3, 0, 9, 4], 10, 0.002, 80.0, 7.0, CHURN["S_churn"],
                               CHURN["S_min"], CHURN["S_max"], CHURN["S_noise"], "heun", labels,
                               2.0)
    noise = SeedNoise([3, 0, 9, 4], SHAPE)
    latents = noise.draw()
    ref = reference(make_denoiser(LABEL_DIM, device=device), plan, latents.to(device),
                    noise.draw_many(len(plan.churn_steps)), labels)
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(RuntimeError, match="guidance needs class_labels"):  # was a no-op
        sampler.sample_seeds([3], 10, 0.002, 80.0, 7.0, 0.0, 0.0, math.inf, 1.0, "heun", None,
                             2.0)


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
    path = models.path("aoti", 0)
    for cpu_model in (path, models.path("torchscript", 0)):
        with pytest.raises(RuntimeError, match="device mismatch|no CUDA support"):
            ops.load_sampler(cpu_model, device="cuda")
    with pytest.raises(RuntimeError, match="model kind must be"):
        ops.load_sampler(path, kind="onnx")


@needs_cpp
def test_input_errors(models):
    plan = SamplingPlan.build(num_steps=6, **CHURN)
    k = len(plan.churn_steps)
    assert k > 0
    cond = models.sampler("aoti", LABEL_DIM)
    uncond = models.sampler("torchscript", 0)
    x = torch.randn(2, *SHAPE)
    eps = torch.randn(k, 2, *SHAPE)
    labels = torch.zeros(2, LABEL_DIM)
    s, th, g = list(plan.sigmas), list(plan.t_hats), list(plan.gammas)

    def run(sampler=cond, x=x, eps=eps, labels=labels, sigmas=s, guidance=None, solver="heun"):
        return sampler.sample(x, sigmas, th, g, 1.0, solver, eps, labels, guidance)

    cases = [
        (dict(x=torch.randn(2, 3, 8, 8), eps=torch.randn(k, 2, 3, 8, 8)), "shape mismatch"),
        (dict(eps=torch.randn(k + 1, 2, *SHAPE)), "wrong K"),
        (dict(eps=torch.randn(k, 3, *SHAPE)), "shape mismatch between latents"),
        (dict(eps=None), "no churn_noise was given"),
        (dict(labels=torch.zeros(3, LABEL_DIM)), "class_labels must be"),
        (dict(labels=torch.zeros(2, LABEL_DIM + 1)), "class_labels must be"),
        (dict(sampler=uncond), "unconditional"),
        (dict(sampler=uncond, labels=None, guidance=2.0), "guidance needs a class-conditional"),
        (dict(sigmas=[s[1], s[0]] + s[2:]), "sigmas must not increase"),
        (dict(x=x.double(), eps=eps.double()), "exported for"),
        (dict(x=x.to("meta"), eps=eps.to("meta")), "latents are on meta"),
        (dict(solver="rk4"), "solver must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RuntimeError, match=message):
            run(**kwargs)
    assert run().shape == x.shape  # the unchanged inputs are fine


# ------------------------------------------------------------------------------------------
# The backend class.

@needs_cpp
def test_cpp_backend_runs_plan(models, tmp_path):
    plan = SamplingPlan.build(num_steps=10, solver="euler", **CHURN)
    denoiser = make_denoiser(LABEL_DIM)
    guided = GuidedDenoiser(denoiser, 3.0)  # unwrapped; its weight is used (plan has none)
    backend = CppBackend(guided, plan, (4, *SHAPE), kind="torchscript",
                         model_path=tmp_path / "d.ts")
    assert backend.warmup_seconds > 0 and backend.plan.guidance == 3.0
    latents, eps, _ = inputs(plan, 4, LABEL_DIM, "cpu", seed=5)
    classes = torch.tensor([0, 3, 2, 1])
    out = backend.run(latents, eps, classes)  # int labels are one-hot encoded
    labels = nn.functional.one_hot(classes, LABEL_DIM).float()
    ref = reference(denoiser, backend.plan, latents, eps, labels)
    assert rel_err(out, ref) < 1e-5
    exported = (tmp_path / "d.ts").stat()
    again = CppBackend(denoiser, backend.plan, (4, *SHAPE), kind="torchscript",
                       model_path=tmp_path / "d.ts", reuse_model=True)
    reused = (tmp_path / "d.ts").stat()  # loaded, not exported again (an atomic write replaces)
    assert (reused.st_ino, reused.st_mtime_ns) == (exported.st_ino, exported.st_mtime_ns)
    assert torch.equal(again.run(latents, eps, classes), out)


@needs_cpp
def test_cpp_backend_default_aoti_temp_dir(models):
    plan = SamplingPlan.build(num_steps=5)
    backend = CppBackend(make_denoiser(0), plan, (2, *SHAPE),
                         model_path=models.path("aoti", 0), reuse_model=True)
    assert backend.sampler.kind() == "aoti"
    latents, _, _ = inputs(plan, 2, 0, "cpu")
    ref = reference(make_denoiser(0), plan, latents, None, None)
    assert rel_err(backend.run(latents), ref) < 1e-5


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


@needs_cpp
@pytest.mark.slow
def test_standalone_binary_matches_python(models, standalone_binary, tmp_path, device, no_tf32):
    """Build with CMake (~1 min here), sample seeds 0-3 and compare with the Python reference."""
    out = tmp_path / "out.npy"
    args = ["--model", models.path("aoti", LABEL_DIM, device=device), "--seeds", "0-3",
            "--batch", "3", "--steps", "12", "--S-churn", "30", "--S-min", "0.05",
            "--S-max", "50", "--S-noise", "1.007", "--class", "2", "--guidance", "1.5",
            "--shape", ",".join(map(str, SHAPE)), "--device", device.type, "--out", str(out)]
    subprocess.run([standalone_binary, *args], check=True, capture_output=True)
    images = np.load(out)
    assert images.dtype == np.float32 and images.shape == (4, *SHAPE)
    plan = SamplingPlan.build(num_steps=12, **CHURN, guidance=1.5)
    noise = SeedNoise(range(4), SHAPE)
    latents = noise.draw()
    labels = nn.functional.one_hot(torch.full((4,), 2), LABEL_DIM).float()
    ref = reference(make_denoiser(LABEL_DIM), plan, latents,
                    noise.draw_many(len(plan.churn_steps)), labels)
    assert rel_err(torch.from_numpy(images), ref) < 1e-5

    bad = subprocess.run([standalone_binary, "--model", str(tmp_path / "missing.pt2")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "does not exist" in bad.stderr


@needs_cpp
@pytest.mark.slow
def test_standalone_binary_takes_seeds_up_to_the_generators_limit(models, standalone_binary,
                                                                    tmp_path):
    """Seeds 2^64 - 2 and 2^64 - 1 equal the Python reference (the range loop used to overflow
    at 2^63 - 1); seeds out of range or too many are refused with one message."""
    top = 2**64 - 1
    out = tmp_path / "top.npy"
    model = models.path("aoti", LABEL_DIM, device=torch.device("cpu"))
    args = ["--model", model, "--seeds", f"{top - 1}-{top}", "--steps", "4", "--class", "1",
            "--shape", ",".join(map(str, SHAPE)), "--device", "cpu", "--out", str(out)]
    subprocess.run([standalone_binary, *args], check=True, capture_output=True)
    plan = SamplingPlan.build(num_steps=4)
    labels = nn.functional.one_hot(torch.full((2,), 1), LABEL_DIM).float()
    ref = reference(make_denoiser(LABEL_DIM), plan, SeedNoise([top - 1, top], SHAPE).draw(),
                    None, labels)
    assert rel_err(torch.from_numpy(np.load(out)), ref) < 1e-5
    for seeds in ("18446744073709551616", "-1", "0-999999999999", "5-3", "1e3"):
        bad = subprocess.run([standalone_binary, *args[:2], "--seeds", seeds], text=True,
                             capture_output=True)
        assert bad.returncode == 1 and "bad seed list" in bad.stderr, (seeds, bad.stderr)



@needs_cpp
@pytest.mark.slow
def test_standalone_binary_runs_a_static_batch_model_and_checks_out_first(standalone_binary,
                                                                            tmp_path):
    """A model exported with a static batch of 4: the binary takes 4 as its batch, pads the last
    chunk (6 seeds: 4 + 2) and equals the Python reference; another --batch is refused. An
    --out it could not write is refused before the model is even loaded (it sampled first)."""
    model = export_aoti(make_denoiser(LABEL_DIM), (4, *SHAPE), dynamic_batch=False,
                        path=tmp_path / "static4.pt2")
    out = tmp_path / "static.npy"
    args = ["--model", str(model), "--seeds", "0-5", "--steps", "4", "--class", "1",
            "--out", str(out)]
    run = subprocess.run([standalone_binary, *args], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    labels = nn.functional.one_hot(torch.full((6,), 1), LABEL_DIM).float()
    ref = reference(make_denoiser(LABEL_DIM), SamplingPlan.build(num_steps=4),
                    SeedNoise(range(6), SHAPE).draw(), None, labels)
    assert rel_err(torch.from_numpy(np.load(out)), ref) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["static.npy", "static4.pt2"]
    bad = subprocess.run([standalone_binary, *args, "--batch", "3"], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 1 and "static batch of 4, so --batch must be 4" in bad.stderr
    for where, message in ((tmp_path / "missing" / "x.npy", "does not exist"),
                           (tmp_path, "is a folder")):
        bad = subprocess.run([standalone_binary, "--model", str(tmp_path / "absent.pt2"),
                              "--out", str(where)], capture_output=True, text=True, check=False)
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr


@needs_cpp
@pytest.mark.slow
def test_standalone_binary_keeps_sigma_within_the_models_range(standalone_binary, tmp_path):
    """A VE model supports sigma in [0.02, 100]: the binary clips EDM's default sigma_min 0.002
    to 0.02 silently and an explicit --sigma-max 500 to 100 with a warning, as
    edm_fast.Sampler does, and then matches it."""
    torch.manual_seed(5)
    net = TinyConvNet(SHAPE[0]).eval()
    den = Denoiser(net, VEPrecond())
    model = export_torchscript(den, (2, *SHAPE), path=tmp_path / "ve.ts")
    out = tmp_path / "ve.npy"
    args = ["--model", str(model), "--seeds", "0-1", "--steps", "5", "--sigma-max", "500",
            "--out", str(out)]
    run = subprocess.run([standalone_binary, *args], check=True, capture_output=True, text=True)
    assert "--sigma-max 500 is outside the model's range [0.02, 100]; using 100" in run.stderr
    assert "sigma-min" not in run.stderr
    with pytest.warns(UserWarning, match="sigma_max=500"):
        sampler = Sampler(den, SHAPE, batch_size=2, num_steps=5, sigma_max=500,
                          backend="reference", dtype=torch.float64, device="cpu")
    assert sampler.plan.sigmas[0] == pytest.approx(100) and sampler.plan.sigmas[-2] == pytest.approx(0.02)
    assert rel_err(torch.from_numpy(np.load(out)), sampler(seeds=[0, 1])) < 1e-5
