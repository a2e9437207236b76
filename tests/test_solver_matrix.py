"""Every solver on every backend against the float64 reference, on the same per-seed noise.

Tolerance (the issue's rule, stated once): a float32 backend must satisfy
    rel_err(backend32, ref64) <= max(1e-5, 4 * rel_err(ref32, ref64))
with rel_err the 2-norm relative error over the batch: the first term is the step-math target,
the second accepts the network's own float32 rounding, which the float32 reference loop shows
(it differs per case, so it is measured per case). The reference and onnx backends run the full
matrix; the compiled backend runs it with an eager net (step arithmetic in torch), and a
representative subset through Inductor and through the Triton kernel (interpreted on the CPU);
the full compiled matrix runs under -m slow. The C++ executor has its own matrix in test_cpp.py.
"""

import copy
import math

import pytest
import torch
from torch import nn

from edm_fast.sampling.backends import available_backends
from edm_fast.sampling.backends.compiled import CompiledBackend
from edm_fast.sampling.backends.reference import ReferenceBackend
from edm_fast.noise import SeedNoise
from edm_fast.plan import SamplingPlan
from edm_fast.precond import Denoiser, EDMPrecond
from edm_fast.sampling.sampler import Sampler
from edm_fast.solvers import SOLVERS

LABEL_DIM = 3


class TinyConvNet(nn.Module):
    """A small conditional conv net F(x, c_noise, labels) with random weights."""

    def __init__(self, channels):
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = channels, 5, LABEL_DIM
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        self.emb = nn.Linear(1 + LABEL_DIM, 8)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        cond = torch.cat([noise_labels.reshape(-1, 1), class_labels], dim=1)
        h = torch.tanh(self.conv1(x) + self.emb(cond.to(x.dtype))[:, :, None, None])
        return self.conv2(h)


class NVlabsStyleDenoiser(nn.Module):
    """A denoiser in NVlabs' form, written here: forward(x, sigma, class_labels) with EDM's
    preconditioning inline (Eq. 7, Table 1) and the attributes label_dim, img_channels,
    img_resolution, sigma_min, sigma_max; no edm_fast class involved."""

    def __init__(self, channels=2):
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = channels, 5, LABEL_DIM
        self.sigma_min, self.sigma_max, self.sigma_data = 0.002, 80.0, 0.5
        self.model = TinyConvNet(channels)

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        if class_labels is None:
            class_labels = torch.zeros(x.shape[0], self.label_dim, dtype=x.dtype,
                                       device=x.device)
        F_x = self.model(c_in * x, c_noise.flatten(), class_labels)
        return c_skip * x + c_out * F_x


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_denoiser(channels):
    torch.manual_seed(0)
    return Denoiser(TinyConvNet(channels), EDMPrecond()).eval()


# (name, solver, plan options); every solver once with its defaults, plus the option variants
VARIANTS = [(name, name, {}) for name in SOLVERS] + [
    ("heun-churn", "heun", {"S_churn": 30.0, "S_min": 0.05, "S_max": 20.0, "S_noise": 1.007}),
    ("euler-churn", "euler", {"S_churn": 30.0, "S_min": 0.0, "S_max": math.inf}),
    ("heun-vp-midpoint", "heun", {"ode": "vp", "alpha": 0.5}),
    ("ddim-eta", "ddim", {"eta": 0.5}),
    ("dpmpp_3m", "dpmpp_3m_sde", {"eta": 0.0}),
    ("unipc-2", "unipc", {"order": 2}),
]
# (batch, image (C, H, W), guidance, guidance interval): rotated over the variants so that every
# solver meets batch 1/3/8, an odd shape and guidance with and without an interval somewhere
SETTINGS = [(1, (2, 5, 5), None, None), (3, (3, 7, 9), 2.0, None),
            (8, (1, 7, 9), 1.5, (0.3, 10.0)), (3, (2, 5, 5), None, None)]
CASES = [(name, solver, opts, *SETTINGS[i % len(SETTINGS)])
         for i, (name, solver, opts) in enumerate(VARIANTS)]
IDS = [case[0] for case in CASES]
FAST_SUBSET = {"heun", "heun-churn", "dpmpp_2m", "unipc", "dpmpp_2m_sde", "ddpm"}


def build_plan(solver, opts, guidance, interval, steps=6):
    return SamplingPlan.build(solver=solver, num_steps=steps, guidance=guidance,
                              guidance_interval=interval, **opts)


def run(backend_cls, den, plan, shape, dtype, **options):
    """The backend's samples (on the CPU) for seeds 100.. with their labels."""
    batch = shape[0]
    noise = SeedNoise(range(100, 100 + batch), shape[1:])
    latents, draws = noise.draw(), noise.draw_many(plan.num_noise)
    labels = nn.functional.one_hot(torch.arange(batch) % LABEL_DIM, LABEL_DIM).float()
    device = torch.device(options.pop("device", "cpu"))
    be = backend_cls(den, plan, shape, dtype=dtype, device=device, label_dim=LABEL_DIM, **options)
    return be.run(latents.to(device), draws.to(device) if plan.num_noise else None,
                  labels.to(device, dtype)).cpu()


@pytest.fixture(scope="module")
def references():
    """(ref64, ref32) per case, computed once and shared by every backend's test."""
    cache = {}

    def get(name, solver, opts, batch, image, guidance, interval):
        if name not in cache:
            den = make_denoiser(image[0])
            plan = build_plan(solver, opts, guidance, interval)
            shape = (batch, *image)
            cache[name] = (run(ReferenceBackend, den.double(), plan, shape, torch.float64),
                           run(ReferenceBackend, make_denoiser(image[0]), plan, shape,
                               torch.float32))
        return cache[name]
    return get


def check_backend(references, case, backend_cls, device="cpu", **options):
    """The backend's float32 samples for ``case`` against its float64 reference (the rule of
    the module docstring)."""
    name, solver, opts, batch, image, guidance, interval = case
    ref64, ref32 = references(*case)
    plan = build_plan(solver, opts, guidance, interval)
    fast = run(backend_cls, make_denoiser(image[0]).to(device), plan, (batch, *image),
               torch.float32, device=device, **options)
    assert fast.dtype == torch.float32 and fast.shape == (batch, *image)
    bound = max(1e-5, 4 * rel_err(ref32, ref64))
    assert rel_err(fast, ref64) <= bound, (rel_err(fast, ref64), bound)


@pytest.mark.parametrize("name, solver, opts, batch, image, guidance, interval", CASES, ids=IDS)
def test_reference_float32_is_close_to_float64(references, name, solver, opts, batch, image,
                                               guidance, interval):
    """The float32 reference itself: its error is the yardstick, so it must be small."""
    ref64, ref32 = references(name, solver, opts, batch, image, guidance, interval)
    assert ref64.shape == (batch, *image) and torch.isfinite(ref64).all()
    assert rel_err(ref32, ref64) < 1e-4


@pytest.mark.parametrize("name, solver, opts, batch, image, guidance, interval", CASES, ids=IDS)
def test_compiled_executor_matches_reference(references, name, solver, opts, batch, image,
                                             guidance, interval, no_tf32):
    """The compiled backend's executor (eager net, torch step arithmetic) on every solver."""
    check_backend(references, (name, solver, opts, batch, image, guidance, interval),
                  CompiledBackend, compile=False, step_impl="torch")


def triton_case(case):
    marks = () if case[0] in FAST_SUBSET else (pytest.mark.slow,)
    return pytest.param(*case, id=case[0], marks=marks)


@pytest.mark.parametrize("name, solver, opts, batch, image, guidance, interval",
                         [triton_case(c) for c in CASES])
def test_compiled_triton_lincomb_matches_reference(references, name, solver, opts, batch,
                                                   image, guidance, interval, no_tf32):
    """The fused Triton linear-combination kernel as the step arithmetic (on a GPU, or through
    the interpreter on the CPU); the full matrix under -m slow."""
    from edm_fast.kernels import triton_available

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not triton_available(device):
        pytest.skip("Triton is not available here")
    check_backend(references, (name, solver, opts, batch, image, guidance, interval),
                  CompiledBackend, device=device, compile=False, step_impl="triton")


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    """One exported model per channel count, reused by every onnx case (reuse_model=True)."""
    if available_backends()["onnx"] is not None:
        pytest.skip(available_backends()["onnx"])
    folder = tmp_path_factory.mktemp("onnx")
    return lambda image: folder / f"tiny-{'x'.join(map(str, image))}.onnx"


@pytest.mark.parametrize("name, solver, opts, batch, image, guidance, interval", CASES, ids=IDS)
def test_onnx_executor_matches_reference(references, onnx_models, name, solver, opts, batch,
                                         image, guidance, interval):
    from edm_fast.sampling.backends.onnx import OnnxBackend

    check_backend(references, (name, solver, opts, batch, image, guidance, interval),
                  OnnxBackend, model_path=onnx_models(image), reuse_model=True)


def inductor_case(case):
    marks = () if case[0] in {"dpmpp_2m", "heun-churn"} else (pytest.mark.slow,)
    return pytest.param(*case, id=case[0], marks=marks)


@pytest.mark.parametrize("name, solver, opts, batch, image, guidance, interval",
                         [inductor_case(c) for c in CASES])
def test_compiled_inductor_matches_reference(references, name, solver, opts, batch, image,
                                             guidance, interval, no_tf32):
    """torch.compile (Inductor's C++ backend on the CPU) on a representative subset."""
    check_backend(references, (name, solver, opts, batch, image, guidance, interval),
                  CompiledBackend, compile=True, step_impl="torch")


@pytest.mark.parametrize("backend, options", [
    ("reference", {}), ("compiled", {"compile": False}), ("onnx", {}),
    ("cpp", {"kind": "torchscript"})])
def test_nvlabs_form_denoiser_samples_on_every_backend(backend, options):
    """A module in NVlabs' form (not an edm_fast Denoiser) runs on every backend, guided, with a
    multistep solver, and gives the float64 reference's samples."""
    reason = available_backends()[backend]
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(3)
    den = NVlabsStyleDenoiser().eval()
    opts = {"batch_size": 3, "solver": "dpmpp_2m", "num_steps": 5, "guidance": 1.5,
            "device": "cpu"}
    ref64 = Sampler(copy.deepcopy(den).double(), backend="reference", dtype=torch.float64,
                    **opts)(seeds=[1, 2, 3], class_labels=[0, 1, 2])
    ref32 = Sampler(den, backend="reference", **opts)(seeds=[1, 2, 3], class_labels=[0, 1, 2])
    out = Sampler(den, backend=backend, backend_options=options, **opts)(
        seeds=[1, 2, 3], class_labels=[0, 1, 2])
    assert out.shape == (3, 2, 5, 5)
    assert rel_err(out, ref64) <= max(1e-5, 4 * rel_err(ref32, ref64))
