"""Every sampling backend against the float64 reference, and the Sampler interface.

Tolerance rule (stated once, used throughout; test_solver_matrix.py runs every solver on every
backend with the factor 4 of the issue's rule): a float32 backend must be within
    rel_err(backend32, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64))
where rel_err is the 2-norm relative error over the batch. The first term is the sampler-math
target; the second accepts the network's own float32 rounding, which the float32 reference
shows (the flash-attention rule: no worse than twice the reference's own error in that dtype).
"""

import copy
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from edm_fast.sampling.backends import resolve_backend
from edm_fast.sampling.backends.compiled import CompiledBackend
from edm_fast.plan import SamplingPlan
from edm_fast.sampling.backends.reference import ReferenceBackend
from edm_fast.noise import SeedNoise
from edm_fast.precond import Denoiser, EDMPrecond
from edm_fast.sampling.sampler import Sampler
from edm_fast.sampling.reference import sample_edm
from edm_fast.nets.toy import ring_mixture_2d


class TinyConvNet(nn.Module):
    """A small conditional conv net F(x, c_noise, labels) with random weights."""

    def __init__(self, channels=2, label_dim=3):
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = channels, 5, label_dim
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        self.emb = nn.Linear(1 + label_dim, 8)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        cond = noise_labels.reshape(-1, 1)
        if self.label_dim:
            cond = torch.cat([cond, class_labels], dim=1)
        h = torch.tanh(self.conv1(x) + self.emb(cond.to(x.dtype))[:, :, None, None])
        return self.conv2(h)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_denoiser(label_dim=3, channels=2):
    torch.manual_seed(0)
    return Denoiser(TinyConvNet(channels, label_dim), EDMPrecond()).eval()


def require_backend(name: str) -> None:
    """Skip unless backend ``name`` loads here; with EDM_FAST_REQUIRE_CPP=1 (CI) a cpp backend
    that cannot load fails instead."""
    from edm_fast.sampling.backends import available_backends

    reason = available_backends()[name]
    if reason is not None:
        if name == "cpp" and os.environ.get("EDM_FAST_REQUIRE_CPP") == "1":
            pytest.fail(f"EDM_FAST_REQUIRE_CPP=1 but the cpp backend cannot load: {reason}")
        pytest.skip(reason)


# The Triton kernel runs on the GPU where there is one, else on the CPU through Triton's
# interpreter (conftest sets TRITON_INTERPRET=1 only on hosts without CUDA).
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def impl_device(step_impl: str) -> torch.device:
    return TRITON_DEVICE if step_impl == "triton" else torch.device("cpu")


def run_backend(backend_cls, den, plan, shape, dtype, labels, seeds, device="cpu", **opts):
    """The backend's samples (on the CPU) for per-seed noise; the net runs on ``device``."""
    device = torch.device(device)
    noise = SeedNoise(seeds, shape[1:])
    latents, draws = noise.draw(), noise.draw_many(plan.num_noise)
    if device.type != "cpu":
        den = copy.deepcopy(den).to(device)
        labels = None if labels is None else labels.to(device)
    be = backend_cls(den, plan, shape, dtype=dtype, device=device, label_dim=den.label_dim,
                     **opts)
    return be.run(latents, draws if plan.num_noise else None, labels).cpu()


def test_guidance_zero_is_the_unconditional_model_on_every_backend():
    """w = 0 in D_u + w (D_c - D_u) is the unconditional output (all-zero labels) on every
    backend, not 'guidance off' (the reference once took 0 as off, unlike the others)."""
    from edm_fast.sampling import cpp_extension as ops
    from edm_fast.sampling.backends import available_backends

    den = make_denoiser(label_dim=3, channels=1)
    opts = {"shape": (1, 5, 5), "batch_size": 3, "num_steps": 4, "device": "cpu"}
    seeds, labels = [5, 6, 7], torch.tensor([0, 1, 2])
    uncond = Sampler(den, backend="reference", dtype=torch.float64, **opts)(seeds=seeds)
    cond = Sampler(den, backend="reference", dtype=torch.float64, **opts)(seeds, labels)
    assert rel_err(cond, uncond) > 1e-3  # the labels matter for this net
    loadable = available_backends()
    backends = {"reference": {}, "compiled": {"compile": False}}
    if loadable["onnx"] is None:
        backends["onnx"] = {}
    if loadable["cpp"] is None and ops.cpp_available():
        backends["cpp"] = {"kind": "torchscript"}
    for name, options in backends.items():
        out = Sampler(den, backend=name, guidance=0.0, backend_options=options, **opts)(
            seeds, labels)
        assert rel_err(out, uncond) <= 1e-5, name


@pytest.mark.parametrize("device", [torch.device("cpu"),
                                    pytest.param(torch.device("cuda"), marks=pytest.mark.gpu)])
def test_compiled_single_evaluation_takes_floats_and_any_batch(device, no_tf32):
    """evaluate_once (the benchmarks' t_F) is D(x; sigma) as the loop runs it, for a float or a
    per-row sigma, at other batch sizes than the loop's (one CUDA graph per shape on CUDA)."""
    den = make_denoiser(label_dim=3)
    be = CompiledBackend(copy.deepcopy(den).to(device), SamplingPlan.build(num_steps=3),
                         (4, 2, 5, 5), dtype=torch.float32, device=device, label_dim=3,
                         compile=False, step_impl="torch")
    for n in (4, 2, 4):
        x = torch.randn(n, 2, 5, 5)
        labels = nn.functional.one_hot(torch.arange(n) % 3, 3).float()
        for sigma in (2.5, torch.linspace(0.5, 3.0, n)):
            got = be.evaluate_once(x, sigma, labels).cpu()
            want = den(x, torch.as_tensor(sigma).expand(n), labels)
            assert rel_err(got, want) < 1e-6


@pytest.mark.gpu
def test_compile_modes_with_their_own_cuda_graphs_are_refused_inside_ours():
    den = make_denoiser(label_dim=0).cuda()
    with pytest.raises(ValueError, match="captures CUDA graphs of its own"):
        CompiledBackend(den, SamplingPlan.build(num_steps=3), (2, 2, 5, 5), dtype=torch.float32,
                        device="cuda", label_dim=0, compile_mode="reduce-overhead")


def test_inductor_cpu_compile_matches_reference():
    """torch.compile through Inductor's C++ backend on the CPU (the toy MLP; one compile of the
    denoiser serves all 35 evaluations: sigma is a tensor, so no recompilation per step)."""
    import torch._dynamo

    from edm_fast.nets import build_net

    torch._dynamo.reset()
    torch.manual_seed(1)
    den = Denoiser(build_net("toy-mlp", hidden=32, depth=2), EDMPrecond()).eval()
    plan = SamplingPlan.build(num_steps=18)
    latents = SeedNoise(range(16), (2,)).draw()
    from torch._dynamo.utils import counters

    counters.clear()
    be = CompiledBackend(den, plan, (16, 2), dtype=torch.float32, device=torch.device("cpu"),
                         label_dim=0, compile=True, step_impl="torch")
    out = be.run(latents)
    out2 = be.run(latents)
    assert torch.equal(out, out2)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every sigma
    # room for many compiled Samplers per process (the default limit of 8 made the 9th eager)
    assert torch._dynamo.config.recompile_limit >= 64
    ref64 = sample_edm(den, latents.double(), plan.sigmas)
    ref32 = sample_edm(den, latents, plan.sigmas)
    assert rel_err(out, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64))


def test_sampler_reference_equals_sample_edm_and_is_batch_invariant():
    den = ring_mixture_2d().as_denoiser()
    s = Sampler(den, batch_size=4, S_churn=20, S_min=0.05, S_max=10, dtype=torch.float64,
                backend="reference", device="cpu")
    x = s(seeds=range(10))  # 3 chunks of 4, the last one padded
    noise = SeedNoise(range(10), (2,), dtype=torch.float64)
    direct = sample_edm(den, noise.draw(), s.plan.sigmas, S_churn=20, S_min=0.05, S_max=10,
                        randn=noise.randn_like)
    assert torch.allclose(x, direct, rtol=1e-12, atol=1e-12)
    one = Sampler(den, batch_size=1, S_churn=20, S_min=0.05, S_max=10, dtype=torch.float64,
                  backend="reference", device="cpu")
    assert torch.allclose(one(seeds=[7]), x[7:8], rtol=1e-12, atol=1e-12)
    assert s.num_evals == 35


def test_sampler_labels_and_validation():
    den = make_denoiser(label_dim=3)
    s = Sampler(den, shape=(2, 5, 5), batch_size=2, num_steps=4, backend="reference",
                device="cpu", guidance=2.0)
    a = s(seeds=[1, 2], class_labels=1)
    b = s(seeds=[1, 2], class_labels=torch.tensor([1, 1]))
    assert torch.equal(a, b)
    assert torch.equal(a, s(seeds=[1, 2], class_labels=torch.tensor(1)))  # 0-d: for all
    assert torch.equal(a, s(seeds=[1, 2], class_labels=np.int64(1)))
    with pytest.raises(ValueError, match="not a bool"):
        s(seeds=[1], class_labels=True)
    with pytest.raises(ValueError, match="class labels must lie"):
        s(seeds=[1], class_labels=5)
    with pytest.raises(ValueError, match="guidance must be a finite"):
        Sampler(den, shape=(2, 5, 5), guidance=float("nan"), device="cpu")
    with pytest.raises(ValueError, match="exactly one of"):
        s()
    with pytest.raises(ValueError, match="guidance needs class_labels"):  # a silent no-op before
        s(seeds=[1, 2])
    with pytest.raises(ValueError, match="noise must be"):
        s(noise=torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"with N >= 1, got \(0, 2, 5, 5\)"):
        s(noise=torch.zeros(0, 2, 5, 5))
    with pytest.raises(ValueError, match="floating-point"):
        s(noise=torch.zeros(2, 2, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="seeds is empty"):
        s(seeds=[])
    with pytest.raises(ValueError, match="step_noise= goes with noise="):  # was ignored
        s(seeds=[1, 2], step_noise=torch.zeros(0, 2, 2, 5, 5))
    with pytest.raises(ValueError, match=r"\(3,\) ints or \(3, 3\) floats, got \(2,\)"):
        s(seeds=[1, 2, 3], class_labels=[1, 2])  # the shape passed, not its one-hot form
    noise = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert torch.equal(s(noise=noise.numpy(), class_labels=1), s(noise=noise, class_labels=1))
    assert torch.equal(s(seeds=np.int64(2), class_labels=1), a[1:])  # a numpy seed
    for bad in (2.5, 0, True):  # 2.5 was silently 2
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            Sampler(den, shape=(2, 5, 5), batch_size=bad, device="cpu")
    with pytest.raises(ValueError, match="guidance needs"):
        Sampler(make_denoiser(label_dim=0), shape=(2, 5, 5), guidance=2.0, device="cpu")


def test_sampler_shape_must_fit_the_model():
    """A wrong channel count or rank, or a size the UNet cannot halve, fails at construction
    with a message (not inside the network on the first call); another resolution warns."""
    opts = {"batch_size": 2, "num_steps": 2, "backend": "reference", "device": "cpu"}
    assert Sampler("default", **opts).shape == (1, 16, 16)
    with pytest.raises(ValueError, match=r"makes samples of shape \(1, 16, 16\)"):
        Sampler("default", (3, 16, 16), **opts)
    with pytest.raises(ValueError, match="makes samples of shape"):
        Sampler("default", (16, 16), **opts)
    with pytest.raises(ValueError, match="multiples of 4"):
        Sampler("default", (1, 18, 18), **opts)
    with pytest.warns(UserWarning, match="built for \\(1, 16, 16\\)"):
        sampler = Sampler("default", (1, 32, 16), **opts)
    assert sampler(seeds=[0]).shape == (1, 1, 32, 16)


def test_sampler_options_sigma_range_and_dtype_names():
    """sigma_min/sigma_max: EDM's defaults, a clear error for non-positive values, a warning
    when an explicit value is clipped to the model's range; dtype may be given by name."""
    den = make_denoiser(label_dim=0)
    opts = {"shape": (2, 5, 5), "num_steps": 4, "backend": "reference", "device": "cpu"}
    plan = Sampler(den, **opts).plan
    assert plan.sigmas[0] == 80.0 and plan.sigmas[-2] == pytest.approx(0.002)
    assert Sampler(den, sigma_min=0.5, sigma_max=3, **opts).plan.sigmas[0] == pytest.approx(3)
    for bad in ({"sigma_min": 0}, {"sigma_max": -1.0}, {"sigma_min": 5, "sigma_max": 1}):
        with pytest.raises(ValueError, match="sigma"):
            Sampler(den, **bad, **opts)
    vp = ring_mixture_2d().as_denoiser()
    approx_20 = pytest.approx(20.0)
    vp.sigma_max = 20.0  # a model whose preconditioning covers sigma <= 20 only (like VP)
    with pytest.warns(UserWarning, match="sigma_max=500 is outside the model's range"):
        assert Sampler(vp, sigma_max=500, **opts | {"shape": (2,)}).plan.sigmas[0] == approx_20
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default is clipped silently, as in NVlabs' code
        assert Sampler(vp, **opts | {"shape": (2,)}).plan.sigmas[0] == approx_20
    assert Sampler(den, dtype="float64", **opts).dtype == torch.float64
    with pytest.warns(UserWarning, match="rounds every step sum"):  # half state: it loses 1e-2
        assert Sampler(den, dtype="torch.float16", **opts).dtype == torch.float16
    for bad in ("cuda", "int64", torch.complex64, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            Sampler(den, dtype=bad, **opts)


def test_auto_keeps_exact_denoisers_on_the_reference_loop():
    """An exact (toy) denoiser has no network to export or compile: 'auto' runs it on the
    reference loop without a warning, and the export backends say why they cannot run it."""
    from edm_fast.precond import NotADenoiserError

    den = ring_mixture_2d().as_denoiser()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler = Sampler(den, batch_size=4, num_steps=3, device="cpu", expected_images=10**6)
    assert sampler.backend_name == "reference"
    with pytest.raises(NotADenoiserError, match="'reference' and 'compiled' backends"):
        Sampler(den, batch_size=4, num_steps=3, device="cpu", backend="onnx")


def test_auto_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("EDM_FAST_DISABLE_ONNX", "1")
    monkeypatch.setenv("EDM_FAST_DISABLE_CPP", "1")
    monkeypatch.setenv("EDM_FAST_DISABLE_COMPILED", "1")
    monkeypatch.setenv("EDM_FAST_DISABLE_OPENVINO", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls = resolve_backend("auto", torch.device("cpu"))
    assert cls is ReferenceBackend
    msgs = [str(w.message) for w in caught if "edm-fast" in str(w.message)]
    assert len(msgs) == 1 and "EDM_FAST_DISABLE_CPP" in msgs[0] and "ONNX" in msgs[0]
    monkeypatch.setenv("EDM_FAST_BACKEND", "reference")
    assert resolve_backend("compiled", torch.device("cpu")) is ReferenceBackend
    with pytest.raises(ValueError, match="unknown backend"):
        monkeypatch.delenv("EDM_FAST_BACKEND")
        resolve_backend("tensorrt", torch.device("cpu"))


def test_auto_sampler_skips_and_survives_backends_that_cannot_serve_the_job(monkeypatch):
    """'auto' on the CPU: ONNX Runtime first (float32 only); a backend that loads but fails to
    build for the model is skipped like one that does not load, with one warning that names
    every reason; an explicit request for it raises instead."""
    from edm_fast.sampling.backends import AUTO_ORDER
    from edm_fast.sampling.backends.onnx import OnnxBackend

    assert AUTO_ORDER["cpu"][0] == "onnx" and "onnx" not in AUTO_ORDER["cuda"]
    den = make_denoiser(label_dim=3, channels=1)
    opts = {"shape": (1, 5, 5), "batch_size": 2, "num_steps": 3, "device": "cpu"}
    if OnnxBackend.unavailable_reason() is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the first choice: no warning
            assert Sampler(den, **opts).backend_name == "onnx"
    monkeypatch.setenv("EDM_FAST_DISABLE_CPP", "1")
    monkeypatch.setenv("EDM_FAST_DISABLE_COMPILED", "1")
    monkeypatch.setenv("EDM_FAST_DISABLE_OPENVINO", "1")
    with pytest.warns(RuntimeWarning, match="float32, and dtype torch.float64") as caught:
        assert Sampler(den, dtype=torch.float64, **opts).backend_name == "reference"
    assert len([w for w in caught if "edm-fast" in str(w.message)]) == 1

    def broken_init(self, *args, **kwargs):
        raise RuntimeError("export failed: unsupported operator")

    monkeypatch.setattr(OnnxBackend, "unavailable_reason", staticmethod(lambda: None))
    monkeypatch.setattr(OnnxBackend, "__init__", broken_init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = Sampler(den, **opts)
    msgs = [str(w.message) for w in caught if "edm-fast" in str(w.message)]
    assert sampler.backend_name == "reference" and len(msgs) == 1, msgs
    assert "onnx: failed to build for this model (RuntimeError: export failed" in msgs[0]
    assert "EDM_FAST_DISABLE_CPP" in msgs[0]
    ref = Sampler(den, backend="reference", **opts)
    assert torch.equal(sampler(seeds=[4, 5]), ref(seeds=[4, 5]))
    with pytest.raises(RuntimeError, match="export failed"):
        Sampler(den, backend="onnx", **opts)


def test_auto_warns_only_when_a_better_backend_was_skipped(monkeypatch):
    """A skipped backend ranked below the one 'auto' picks costs nothing, so no warning: a CPU
    install without the C++ extension warned on every Sampler, although ONNX Runtime, the
    first choice there, ran."""
    from edm_fast.sampling.backends.onnx import OnnxBackend

    require_backend("onnx")
    monkeypatch.setenv("EDM_FAST_DISABLE_CPP", "1")
    monkeypatch.setenv("EDM_FAST_DISABLE_COMPILED", "1")
    monkeypatch.setenv("EDM_FAST_DISABLE_OPENVINO", "1")
    den = make_denoiser(label_dim=3, channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", torch.device("cpu")) is OnnxBackend
        sampler = Sampler(den, shape=(1, 5, 5), batch_size=2, num_steps=3, device="cpu")
    assert sampler.backend_name == "onnx"
    monkeypatch.setenv("EDM_FAST_DISABLE_ONNX", "1")  # now the first choice is skipped
    with pytest.warns(RuntimeWarning, match="EDM_FAST_DISABLE_ONNX") as caught:
        assert resolve_backend("auto", torch.device("cpu")) is ReferenceBackend
    message = str(caught[0].message)
    assert message.index("onnx:") < message.index("cpp:") < message.index("compiled:")


@pytest.mark.parametrize("backend", ["reference", "compiled", "cpp", "onnx", "openvino"])
def test_discrete_model_grid_with_repeated_levels_runs_on_every_backend(backend):
    """A discrete-time net (DDPM, 1000 levels) at 100 steps: round_sigma maps neighbouring
    sigmas of the grid to one trained level. As in NVlabs' sampler those are zero-length
    steps: every backend runs them (the reference and C++ loops refused the plan on every
    call) with one warning at construction, and equals sample_edm on the unrounded grid."""
    from edm_fast.precond import DDPMPrecond
    from edm_fast.schedules import edm_sigmas

    require_backend(backend)
    torch.manual_seed(0)
    den = Denoiser(TinyConvNet(2, 3), DDPMPrecond()).eval()
    options = {"compiled": {"compile": False}, "cpp": {"kind": "torchscript"}}.get(backend, {})
    with pytest.warns(RuntimeWarning, match="2 of the 100 steps start and end on the same"):
        sampler = Sampler(den, shape=(2, 5, 5), batch_size=2, num_steps=100, S_churn=40,
                          device="cpu", backend=backend, backend_options=options)
    plan = sampler.plan
    assert sum(a == b for a, b in zip(plan.sigmas, plan.sigmas[1:])) == 2
    labels = torch.tensor([0, 2])
    out = sampler(seeds=[3, 4], class_labels=labels)
    grid = edm_sigmas(100, den.sigma_min, 80.0)  # strictly decreasing; rounded inside
    one_hot = torch.nn.functional.one_hot(labels, 3)

    def reference(dtype):
        noise = SeedNoise([3, 4], (2, 5, 5))  # the seeds' latents, then their churn draws
        return sample_edm(den, noise.draw().to(dtype), grid, S_churn=40, class_labels=one_hot,
                          randn=noise.randn_like)

    ref64, ref32 = reference(torch.float64), reference(torch.float32)
    assert rel_err(out, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64))


@pytest.mark.gpu
@pytest.mark.parametrize("S_churn, guidance", [(0.0, None), (30.0, None), (0.0, 2.0)])
def test_cuda_graph_loop_matches_reference(S_churn, guidance, no_tf32):
    """On CUDA: torch.compile + Triton fused kernels + the whole loop as one CUDA graph."""
    from edm_fast.nets import build_net

    torch.manual_seed(0)
    den = Denoiser(build_net("tiny", label_dim=10, dropout=0.0), EDMPrecond()).eval().cuda()
    den_cpu64 = Denoiser(build_net("tiny", label_dim=10, dropout=0.0), EDMPrecond()).eval()
    den_cpu64.load_state_dict(den.state_dict())
    s = Sampler(den, batch_size=8, num_steps=18, S_churn=S_churn, S_min=0.05, S_max=50,
                guidance=guidance, device="cuda", backend="compiled")
    assert s.backend.graph is not None
    labels = torch.arange(8) % 10
    out = s(seeds=range(8), class_labels=labels).cpu()
    ref64 = Sampler(den_cpu64.double(), batch_size=8, num_steps=18, S_churn=S_churn, S_min=0.05,
                    S_max=50, guidance=guidance, device="cpu", backend="reference",
                    dtype=torch.float64)(seeds=range(8), class_labels=labels)
    ref32 = Sampler(den, batch_size=8, num_steps=18, S_churn=S_churn, S_min=0.05, S_max=50,
                    guidance=guidance, device="cuda", backend="reference")(
                        seeds=range(8), class_labels=labels).cpu()
    assert rel_err(out, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64))
    again = s(seeds=range(8), class_labels=labels).cpu()
    assert torch.equal(out, again)


@pytest.mark.gpu
def test_reference_loop_has_no_host_sync_on_cuda():
    """The reference loop issues no CUDA synchronisation until its single final check."""
    den = make_denoiser(label_dim=0).cuda()
    latents = torch.randn(4, 2, 5, 5, device="cuda")
    sigmas = torch.linspace(10, 0, 9, dtype=torch.float64).tolist()
    import edm_fast.sampling.reference as S

    finish = S._Loop.finish
    seen = {}

    def spy_finish(self, x):
        seen["mode"] = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        return finish(self, x)

    S._Loop.finish = spy_finish
    try:
        torch.cuda.set_sync_debug_mode(2)  # error on any synchronising call
        S.sample_edm(den, latents, sigmas)
    finally:
        S._Loop.finish = finish
        torch.cuda.set_sync_debug_mode(0)
    assert seen["mode"] == 2


def _half_precision_case(net_dtype, device="cpu"):
    """(float32 net, its half copy, plan, shape, labels, the float64 reference of the float32
    net, the reference loop's own error with the half net on ``device``)."""
    den32 = make_denoiser(label_dim=3)
    den_half = copy.deepcopy(den32)
    den_half.model.to(net_dtype)
    plan = SamplingPlan.build(num_steps=8, S_churn=20, S_min=0.05, S_max=20)
    shape = (3, 2, 5, 5)
    labels = nn.functional.one_hot(torch.arange(3), 3).float()
    ref64 = run_backend(ReferenceBackend, den32, plan, shape, torch.float64, labels, range(3))
    ref_half = run_backend(ReferenceBackend, den_half, plan, shape, torch.float32, labels,
                           range(3), device=device)  # the same device's half kernels
    own = rel_err(ref_half, ref64)
    assert own > 1e-4  # the half-precision net really is less precise
    return den32, den_half, plan, shape, labels, ref64, own


@pytest.mark.parametrize("net_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step_impl", ["torch", "triton"])
def test_half_precision_network_error_within_twice_reference(net_dtype, step_impl, no_tf32):
    """A bf16/fp16 network (float32 sampler state): the compiled backend's error against the
    float64 reference of the float32 network is at most twice the reference loop's own error
    with the same half-precision network (+1e-6 for float32 state rounding)."""
    _, den_half, plan, shape, labels, ref64, own = _half_precision_case(
        net_dtype, impl_device(step_impl))
    fast_half = run_backend(CompiledBackend, den_half, plan, shape, torch.float32, labels,
                            range(3), device=impl_device(step_impl), compile=False,
                            step_impl=step_impl)
    assert rel_err(fast_half, ref64) <= 2 * own + 1e-6


@pytest.mark.parametrize("backend, net_dtype", [("cpp", torch.bfloat16), ("cpp", torch.float16),
                                                ("onnx", torch.float16)])
def test_half_precision_network_through_exported_backends(backend, net_dtype):
    """The same bound for the backends that run an exported D: the C++ loop over a TorchScript
    trace of the half network, and ONNX Runtime over a graph with a float16 network inside
    (float32 inputs and outputs; ONNX export has no bfloat16 network)."""
    require_backend(backend)
    den32, den_half, plan, shape, labels, ref64, own = _half_precision_case(net_dtype)
    if backend == "cpp":
        from edm_fast.sampling.backends.cpp import CppBackend

        out = run_backend(CppBackend, den_half, plan, shape, torch.float32, labels, range(3),
                          kind="torchscript")
    else:
        from edm_fast.sampling.backends.onnx import OnnxBackend

        out = run_backend(OnnxBackend, den32, plan, shape, torch.float32, labels, range(3),
                          net_dtype="float16")
    assert rel_err(out, ref64) <= 2 * own + 1e-6


@pytest.mark.parametrize("backend", ["reference", "compiled", "cpp", "onnx", "openvino"])
def test_every_backend_raises_nonfinite_error_for_a_nan_network(backend):
    """A network with a NaN weight (a bad checkpoint): every backend raises NonFiniteError (a
    FloatingPointError, one line in the CLI), never returns NaN images silently (the compiled
    backend did) or a RuntimeError naming a temporary file (the cpp backend did)."""
    from edm_fast.sampling.reference import NonFiniteError

    require_backend(backend)
    den = make_denoiser(label_dim=0)
    with torch.no_grad():
        next(den.model.parameters()).view(-1)[0] = float("nan")
    options = {"compiled": {"compile": False}, "cpp": {"kind": "torchscript"},
               "onnx": {"check": False}, "openvino": {"check": False}}.get(backend, {})
    sampler = Sampler(den, shape=(2, 5, 5), batch_size=2, num_steps=3, device="cpu",
                      backend=backend, backend_options=options)
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        sampler(seeds=[0, 1])


def test_benchmark_runs_the_outside_samplers_on_the_samplers_grid():
    """The NVlabs-style and k-diffusion rows of the benchmark take the grid Sampler builds:
    within the model's sigma range and rounded to a discrete-time net's levels (for the DDPM
    model they ran EDM's plain 0.002 .. 80 grid, a different job than ours)."""
    from edm_fast.eval.benchmark import bench_model, sampler_plan

    for name in ("default-ddpm", "default"):
        den = bench_model(name, torch.device("cpu"))
        ours = Sampler(den, batch_size=1, num_steps=18, backend="reference", device="cpu").plan
        assert sampler_plan(den, 18).sigmas == ours.sigmas
    assert ours.sigmas == SamplingPlan.build(num_steps=18).sigmas  # EDM net: the plain grid
    ddpm = sampler_plan(bench_model("default-ddpm", torch.device("cpu")), 18).sigmas
    assert ddpm != SamplingPlan.build(num_steps=18).sigmas
    assert ddpm[-2] == pytest.approx(0.01, rel=1e-4)  # the DDPM net's lowest level
