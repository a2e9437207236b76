"""Autoguidance (Karras et al. 2024, arXiv 2406.02507, Eq. 1): D_g + w (D - D_g).

The main net is the bundled digits model; the guide is "a bad version of itself": a copy with
its weights shrunk and perturbed by a fixed seed (same task, same classes, worse denoiser). The
unconditional case uses the exact denoisers of the 2-D ring mixture, the guide being the ring
with wider modes, as in the paper's toy.

Tolerances: float64 runs are compared to 1e-10 (relative 2-norm): the same operations in
another order only. Float32 backends (the cpp one included) follow test_backends.py's rule,
    rel_err(backend32, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64)),
the network's own float32 rounding being what the float32 reference shows.

The cpp tests skip without the C++ extension unless EDM_FAST_REQUIRE_CPP=1 (CI), as in
test_cpp.py; they export TorchScript (seconds), each model once per module.
"""

import copy
import itertools
import os

import pytest
import torch
from torch import nn

from guide_fixtures import perturbed

from edm_fast.sampling import cpp_extension as ops
from edm_fast.sampling.backends import available_backends
from edm_fast.guidance import Guidance
from edm_fast.io.models import bundled_path, load_denoiser
from edm_fast.noise import SeedNoise
from edm_fast.sampling.sampler import Sampler
from edm_fast.nets.toy import ring_mixture_2d

SEEDS, LABELS = [3, 11], torch.tensor([2, 7])
STEPS = 4

REQUIRE_CPP = os.environ.get("EDM_FAST_REQUIRE_CPP", "0") == "1"
needs_cpp = pytest.mark.skipif(not ops._load() and not REQUIRE_CPP,
                               reason=f"edm_fast._C not built ({ops.load_error()})")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def unconditional_pair():
    """An unconditional UNet (the digits model's net without labels, random weights), a worse
    copy as its guide, and the Sampler options of the autoguided runs that compare them."""
    from edm_fast.nets import build_net
    from edm_fast.precond import Denoiser, EDMPrecond

    torch.manual_seed(0)
    main = Denoiser(build_net("tiny", label_dim=0), EDMPrecond()).eval()
    guide = perturbed(main, seed=2)
    opts = {"guide": guide, "guidance": 2.0, "num_steps": 3, "batch_size": 2, "device": "cpu"}
    return main, guide, opts


@pytest.fixture(scope="module")
def main_net():
    return load_denoiser("default")


@pytest.fixture(scope="module")
def guide_net(main_net):
    return perturbed(main_net)


def heun_loop(main, guide, w, sigmas, latents, labels, interval=None):
    """EDM Alg. 1 (Heun, deterministic) written out, with D = D_g + w (D - D_g) wherever
    lo <= sigma <= hi (the guidance interval), the plain main D elsewhere."""
    def denoise(x, sigma):
        s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
        d = main(x, s, labels)
        if interval is not None and not interval[0] <= sigma <= interval[1]:
            return d
        d_g = guide(x, s, labels)
        return d_g + w * (d - d_g)

    x = latents * sigmas[0]
    for t, t_next in itertools.pairwise(sigmas):
        slope = (x - denoise(x, t)) / t
        x_next = x + (t_next - t) * slope
        if t_next > 0:
            slope_next = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t) * (slope + slope_next) / 2
        x = x_next
    return x


def one_hot(labels, dim=10, dtype=torch.float64):
    return torch.nn.functional.one_hot(labels, dim).to(dtype)


@pytest.mark.parametrize("interval", [None, (0.4, 10.0)])  # 4 steps: 9.7 and 0.47 inside
def test_guided_sample_is_the_hand_written_heun_loop(main_net, guide_net, interval):
    """The reference backend's autoguided Heun run equals Alg. 1 written out with Eq. 1, inside
    and outside the guidance interval (float64: 1e-10)."""
    noise = SeedNoise(SEEDS, (1, 16, 16)).draw().double()
    sampler = Sampler(main_net, guide=guide_net, guidance=2.5, guidance_interval=interval,
                      num_steps=STEPS, batch_size=2, dtype=torch.float64, backend="reference",
                      device="cpu")
    got = sampler(noise=noise, class_labels=LABELS)
    want = heun_loop(main_net, guide_net, 2.5, sampler.plan.sigmas, noise, one_hot(LABELS),
                     interval)
    plain = Sampler(main_net, num_steps=STEPS, batch_size=2, dtype=torch.float64,
                    backend="reference", device="cpu")(noise=noise, class_labels=LABELS)
    assert rel_err(got, want) <= 1e-10
    assert rel_err(got, plain) > 1e-3  # the guide changes the samples: the check can fail


def test_interval_leaves_the_other_sigmas_plain(main_net, guide_net):
    """The guide runs only at the evaluations inside the interval; a guide evaluated elsewhere
    would show up in the call log."""
    calls = []

    def logging_guide(x, sigma, labels):
        calls.append(float(sigma[0]))
        return guide_net(x, sigma, labels)

    logging_guide.label_dim, logging_guide.sample_shape = 10, (1, 16, 16)
    sampler = Sampler(main_net, guide=logging_guide, guidance=2.0, guidance_interval=(0.5, 5.0),
                      num_steps=6, batch_size=2, backend="reference", device="cpu")
    sampler(seeds=SEEDS, class_labels=LABELS)
    evaluated = sampler.plan.program.eval_sigmas
    inside = [s for s in evaluated if 0.5 <= s <= 5.0]
    assert calls and len(inside) < len(evaluated)  # the interval excludes some evaluations
    assert sorted(calls) == pytest.approx(sorted(inside), rel=1e-6)  # float32 sigma vectors


def test_weight_one_is_the_main_model_alone(main_net, guide_net):
    """w = 1: D_g + (D - D_g) = D, whatever the guide (float64: 1e-10)."""
    opts = {"num_steps": STEPS, "batch_size": 2, "dtype": torch.float64, "backend": "reference",
            "device": "cpu"}
    plain = Sampler(main_net, **opts)(seeds=SEEDS, class_labels=LABELS)
    guided = Sampler(main_net, guide=guide_net, guidance=1.0, **opts)(seeds=SEEDS,
                                                                       class_labels=LABELS)
    assert rel_err(guided, plain) <= 1e-10


def python_backends():
    """Every Python-executor backend that loads here, with its options; torch.compile itself
    (tens of seconds on 2 CPU cores) runs in the slow suite."""
    loadable = available_backends()
    cases = [pytest.param("compiled", {"compile": False}, id="compiled-eager"),
             pytest.param("compiled", {}, id="compiled-inductor", marks=pytest.mark.slow)]
    for name in ("onnx", "openvino"):
        marks = () if loadable[name] is None else pytest.mark.skip(reason=loadable[name])
        cases.append(pytest.param(name, {}, id=name, marks=marks))
    return cases


@pytest.mark.parametrize("name, options", python_backends())
def test_every_python_backend_agrees_with_the_reference(main_net, guide_net, name, options):
    """Autoguidance with a guidance interval on each backend, against the float64 reference
    (test_backends.py's tolerance rule, in the module docstring)."""
    opts = {"guide": guide_net, "guidance": 2.0, "guidance_interval": (0.3, 20.0),
            "num_steps": STEPS, "batch_size": 2, "device": "cpu"}
    ref64 = Sampler(main_net, dtype=torch.float64, backend="reference", **opts)(SEEDS, LABELS)
    ref32 = Sampler(main_net, backend="reference", **opts)(SEEDS, LABELS)
    sampler = Sampler(main_net, backend=name, backend_options=options, **opts)
    assert sampler.backend.guide is not None  # the guide's own evaluator, built by the backend
    out = sampler(SEEDS, LABELS)
    assert rel_err(out, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64)), name


def test_unconditional_main_is_autoguided_by_an_exact_toy():
    """An unconditional model (which classifier-free guidance refuses) is autoguided: the exact
    ring-mixture denoiser guided by the same ring with 3x wider modes equals the written-out
    loop (float64: 1e-10), and needs no labels."""
    main = ring_mixture_2d().as_denoiser()
    guide = ring_mixture_2d(std=0.15).as_denoiser()
    noise = SeedNoise(list(range(8)), (2,)).draw().double()
    sampler = Sampler(main, guide=guide, guidance=3.0, num_steps=8, batch_size=8,
                      dtype=torch.float64, backend="reference", device="cpu")
    got = sampler(noise=noise)
    want = heun_loop(main, guide, 3.0, sampler.plan.sigmas, noise, None)
    assert rel_err(got, want) <= 1e-10
    plain = Sampler(main, num_steps=8, batch_size=8, dtype=torch.float64, backend="reference",
                    device="cpu")(noise=noise)
    assert rel_err(got, plain) > 1e-3
    with pytest.raises(ValueError, match="classifier-free guidance needs a class-conditional"):
        Sampler(main, guidance=3.0, device="cpu")


@pytest.mark.skipif(available_backends()["onnx"] is not None, reason="needs onnxruntime")
def test_unconditional_network_autoguided_on_onnx():
    """An unconditional UNet (the digits model's net without labels, random weights) and a
    worse copy as guide: the onnx backend agrees with the float64 reference."""
    main, guide, opts = unconditional_pair()
    ref64 = Sampler(main, dtype=torch.float64, backend="reference", **opts)(SEEDS)
    ref32 = Sampler(main, backend="reference", **opts)(SEEDS)
    out = Sampler(main, backend="onnx", **opts)(SEEDS)
    assert rel_err(out, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64))


def test_mismatched_or_incomplete_guides_are_refused(main_net):
    """A guide of another task or a guide without a weight (also given to the cpp backend
    directly): one clear error each, before any sampling."""
    toy2d, toy1d = ring_mixture_2d().as_denoiser(), load_denoiser("toy-gmm1d")
    with pytest.raises(ValueError, match="guide model takes label_dim=0 but the main model "
                                         "takes 10"):
        Sampler(main_net, guide=toy2d, guidance=2.0, device="cpu")
    with pytest.raises(ValueError, match=r"guide model makes samples of shape \(1,\) but the "
                                         r"main model \(2,\)"):
        Sampler(toy2d, guide=toy1d, guidance=2.0, device="cpu")
    with pytest.raises(ValueError, match="needs a guidance weight"):
        Sampler(toy2d, guide=ring_mixture_2d(std=0.1).as_denoiser(), device="cpu")
    with pytest.raises(ValueError, match="needs a guidance weight"):
        Guidance(None, guide=toy2d)
    from edm_fast.sampling.backends.cpp import CppBackend
    from edm_fast.plan import SamplingPlan

    with pytest.raises(ValueError, match="needs a guidance weight"):  # checked before export
        CppBackend(main_net, SamplingPlan.build(num_steps=2), (1, 1, 16, 16), device="cpu",
                   guide=perturbed(main_net))


def test_auto_tries_every_backend_for_a_guide():
    """Every backend runs a guide, the cpp one included: 'auto' tries the same backends for an
    autoguided run as for a plain one."""
    from edm_fast.sampling.backends import auto_candidates

    plain, _ = auto_candidates(torch.device("cpu"))
    guided, skipped = auto_candidates(torch.device("cpu"), guide=True)
    assert [c.name for c in guided] == [c.name for c in plain]
    assert not any("guide" in why for _, why in skipped)


def test_guide_sigma_range_limits_the_grid(main_net):
    """A guide with a narrower noise range (VE preconditioning: 0.02 .. 100) narrows the default
    grid to both ranges; an explicit grid it does not cover is refused."""
    from edm_fast.precond import Denoiser, VEPrecond

    guide = Denoiser(copy.deepcopy(main_net.model), VEPrecond(sigma_min=0.02, sigma_max=60.0))
    sampler = Sampler(main_net, guide=guide, guidance=2.0, num_steps=3, batch_size=1,
                      backend="reference", device="cpu")
    assert sampler.plan.sigmas[0] == pytest.approx(60.0)
    assert min(s for s in sampler.plan.sigmas if s > 0) == pytest.approx(0.02)
    with pytest.raises(ValueError, match=r"guide model covers noise levels 0.02 .. 60"):
        Sampler(main_net, guide=guide, guidance=2.0, sigmas=[80.0, 1.0, 0.0],
                backend="reference", device="cpu")


def test_net_dtype_applies_to_the_guide(main_net, guide_net):
    """net_dtype bf16 runs the guide's network in bf16 as well as the main one's."""
    sampler = Sampler(main_net, guide=guide_net, guidance=2.0, num_steps=2, batch_size=1,
                      backend="reference", device="cpu", net_dtype="bf16")
    assert sampler.backend.guide.net_dtype == torch.bfloat16
    assert sampler.backend.denoiser.net_dtype == torch.bfloat16
    assert torch.isfinite(sampler(seeds=[0], class_labels=1)).all()


def _guide_checkpoint(path):
    """The bundled checkpoint with its weights perturbed as ``perturbed`` does, saved to
    ``path`` (a guide loaded from disk, as --guide-ckpt loads it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(bundled_path("default"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    gen = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        if t.is_floating_point():
            tensors[name] = t * 0.9 + 0.02 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
    save_file(tensors, path, metadata=meta)
    return path


def test_cli_guide_ckpt(tmp_path, capsys):
    """`edm-fast sample --guide-ckpt PATH --guidance W` writes what Sampler(guide=PATH) samples;
    a guide without --guidance is a one-line error (exit 2)."""
    import numpy as np

    from edm_fast.cli.main import main

    guide = str(_guide_checkpoint(tmp_path / "guide.safetensors"))
    out = tmp_path / "auto.npz"
    assert main(["sample", "--guide-ckpt", guide, "--guidance", "2", "--steps", "3",
                 "--seeds", "0-1", "--class", "4", "--backend", "reference", "--device", "cpu",
                 "--out", str(out)]) == 0
    want = Sampler("default", guide=guide, guidance=2.0, num_steps=3, batch_size=2,
                   backend="reference", device="cpu")(seeds=[0, 1], class_labels=4)
    with np.load(out) as saved:
        got = torch.from_numpy(saved["samples"])
    assert torch.equal(got, want)  # the same run: the same float32 operations
    capsys.readouterr()
    assert main(["sample", "--guide-ckpt", guide, "--steps", "3", "--seeds", "0",
                 "--device", "cpu", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a guidance weight" in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_cuda_graph_runs_the_guide(main_net, guide_net, no_tf32):
    """On CUDA the compiled backend captures the guide's torch.compile'd evaluations in the
    same CUDA graph as the main net's; it agrees with the float64 reference (CPU)."""
    opts = {"guide": guide_net, "guidance": 2.0, "guidance_interval": (0.3, 20.0),
            "num_steps": STEPS, "batch_size": 2}
    ref64 = Sampler(main_net, dtype=torch.float64, backend="reference", device="cpu",
                    **opts)(SEEDS, LABELS)
    ref32 = Sampler(main_net, backend="reference", device="cpu", **opts)(SEEDS, LABELS)
    cuda = Sampler(copy.deepcopy(main_net), backend="compiled", device="cuda",
                   **{**opts, "guide": copy.deepcopy(guide_net)})
    assert cuda.backend.graph is not None
    out = cuda(SEEDS, LABELS).cpu()
    assert rel_err(out, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64))



# ------------------------------------------------------------------------------------------
# The cpp backend: the guide exported next to the main model and run by the C++ executor.

CHURN = {"S_churn": 10.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.007}


@pytest.fixture
def cpp_on(monkeypatch):
    monkeypatch.delenv("EDM_FAST_DISABLE_CPP", raising=False)


@pytest.fixture(scope="module")
def cpp_dir(tmp_path_factory):
    """Where the cpp tests' exports live: each model is traced once, later backends reuse it."""
    return tmp_path_factory.mktemp("autoguidance_cpp")


def cpp_options(folder, name):
    """backend_options of a cpp backend reusing ``folder/name.ts`` (and its ``.guide.ts``)."""
    return {"kind": "torchscript", "model_path": str(folder / f"{name}.ts"),
            "reuse_model": True}


@needs_cpp
@pytest.mark.usefixtures("cpp_on")
@pytest.mark.parametrize("case", [{}, {"guidance_interval": (0.3, 20.0)},
                                  {"guidance_interval": (0.3, 20.0), **CHURN}],
                         ids=["heun", "heun-interval", "heun-interval-churn"])
def test_cpp_backend_agrees_with_the_reference(main_net, guide_net, cpp_dir, case):
    """The C++ executor's autoguided Heun run (conditional digits model, a perturbed copy as the
    guide, same labels) against the float64 reference (test_backends.py's rule); without the
    guide the same exported main model samples something else, so the guide was run."""
    opts = {"guidance": 2.0, "num_steps": STEPS, "batch_size": 2, "device": "cpu", **case}
    ref64 = Sampler(main_net, guide=guide_net, dtype=torch.float64, backend="reference",
                    **opts)(SEEDS, LABELS)
    ref32 = Sampler(main_net, guide=guide_net, backend="reference", **opts)(SEEDS, LABELS)
    sampler = Sampler(main_net, guide=guide_net, backend="cpp",
                      backend_options=cpp_options(cpp_dir, "digits"), **opts)
    assert sampler.backend.guide_path == str(cpp_dir / "digits.guide.ts")
    assert sampler.backend.sampler.guide_path() == sampler.backend.guide_path
    out = sampler(SEEDS, LABELS)
    assert rel_err(out, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64))
    unguided = Sampler(main_net, backend="cpp", backend_options=cpp_options(cpp_dir, "digits"),
                       **{**opts, "guidance": None, "guidance_interval": None})(SEEDS, LABELS)
    assert rel_err(out, unguided) > 1e-3


@needs_cpp
@pytest.mark.usefixtures("cpp_on")
def test_cpp_backend_in_float64_is_the_reference(main_net, guide_net, cpp_dir):
    """In float64 the C++ executor runs the reference's operations (Heun, churn, an interval)
    on float64 exports of both networks: 1e-10."""
    opts = {"guide": guide_net, "guidance": 2.0, "guidance_interval": (0.3, 20.0),
            "num_steps": STEPS, "batch_size": 2, "device": "cpu", "dtype": torch.float64, **CHURN}
    ref64 = Sampler(main_net, backend="reference", **opts)(SEEDS, LABELS)
    out = Sampler(main_net, backend="cpp", backend_options=cpp_options(cpp_dir, "digits64"),
                  **opts)(SEEDS, LABELS)
    assert out.dtype == torch.float64 and rel_err(out, ref64) <= 1e-10


@needs_cpp
@pytest.mark.usefixtures("cpp_on")
def test_cpp_backend_takes_an_exported_guide(main_net, guide_net, cpp_dir):
    """An ExportedDenoiser as the guide: its file is loaded as it is, and samples what the guide
    module exported to that file samples (the same files: bit for bit)."""
    from edm_fast.io.exported import ExportedDenoiser

    opts = {"guidance": 2.0, "num_steps": STEPS, "batch_size": 2, "device": "cpu",
            "backend": "cpp", "backend_options": cpp_options(cpp_dir, "digits")}
    from_module = Sampler(main_net, guide=guide_net, **opts)
    guide_file = ExportedDenoiser(from_module.backend.guide_path)
    from_file = Sampler(main_net, guide=guide_file, **opts)
    assert from_file.backend.guide_path == guide_file.path
    assert torch.equal(from_file(SEEDS, LABELS), from_module(SEEDS, LABELS))


@needs_cpp
@pytest.mark.usefixtures("cpp_on")
def test_cpp_backend_autoguides_an_unconditional_network(cpp_dir):
    """An unconditional UNet (no labels input) and a worse copy as guide on the cpp backend,
    against the float64 reference; sample_seeds (the seeds drawn in C++) runs the same
    float32 operations on the same latents and agrees bit for bit."""
    main, guide, opts = unconditional_pair()
    ref64 = Sampler(main, dtype=torch.float64, backend="reference", **opts)(SEEDS)
    ref32 = Sampler(main, backend="reference", **opts)(SEEDS)
    sampler = Sampler(main, backend="cpp", backend_options=cpp_options(cpp_dir, "uncond"),
                      **opts)
    out = sampler(SEEDS)
    assert rel_err(out, ref64) <= max(1e-5, 2 * rel_err(ref32, ref64))
    seeded = sampler.backend.sampler.sample_seeds(
        SEEDS, *ops.program_args(sampler.plan.program), None, 2.0)
    assert torch.equal(seeded, out)


class ConvNet(nn.Module):
    """F(x, c_noise, labels): one convolution plus a noise (and label) bias; enough to export."""

    def __init__(self, label_dim: int = 0):
        super().__init__()
        self.label_dim = label_dim
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.map_label = nn.Linear(label_dim, 1) if label_dim else None

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        bias = noise_labels.reshape(-1, 1)
        if self.map_label is not None:
            bias = bias + self.map_label(class_labels)
        return self.conv(x) + bias[:, :, None, None]


@needs_cpp
@pytest.mark.usefixtures("cpp_on")
def test_cpp_refuses_a_guide_of_another_task(cpp_dir):
    """load_guide checks the guide against the main model: another label_dim, sample shape or
    dtype is one RuntimeError naming both files; the main model still runs afterwards."""
    from edm_fast.io.export import export_torchscript
    from edm_fast.precond import Denoiser, EDMPrecond

    def export(name, label_dim=3, shape=(1, 16, 16), dtype=torch.float32):
        torch.manual_seed(len(name))
        den = Denoiser(ConvNet(label_dim), EDMPrecond()).to(dtype).eval()
        return export_torchscript(den, (2, *shape), dtype=dtype, path=cpp_dir / f"{name}.ts")

    sampler = ops.load_sampler(export("conv-main"))
    cases = [(export("conv-labels", label_dim=0), r"takes label_dim = 0 but the main model"),
             (export("conv-shape", shape=(1, 8, 8)), r"makes samples of shape \[1, 8, 8\] but "
                                                     r"the main model"),
             (export("conv-double", dtype=torch.float64), "exported for Double but the main")]
    for path, message in cases:
        with pytest.raises(RuntimeError, match=message):
            sampler.load_guide(path, "auto")
        assert not sampler.has_guide()
    assert sampler.denoise(torch.zeros(1, 1, 16, 16), torch.ones(1), torch.zeros(1, 3)).shape \
        == (1, 1, 16, 16)
