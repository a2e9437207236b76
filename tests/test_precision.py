"""The network's precision (net_dtype, edm_fast.precision): one reading of every spelling, the
'auto' rule per device class, refusals, and every backend's bf16/fp16 samples against the float32
reference under measured bounds.

Bounds (the bundled digits model, images in [-1, 1], 18 Heun steps, reference loop; measured
on an AMD EPYC with AVX512-BF16, docs/PRECISION.md): the largest pixel difference from the
float32 network's images was 0.053 in bf16 over 800 seeds (median per image 0.0087) and 0.0043
in fp16 over 64 seeds; the relative L2 difference 0.0043 (bf16) and 0.00051 (fp16) over 64
seeds. The tests hold max |diff| <= 0.1 (bf16) and 0.01 (fp16), about twice the measured worst
case (other seeds, other CPUs' kernels), and the relative L2 difference to 0.01 and 0.002. A
bf16 network keeps 8 bits of mantissa, so a relative error of 2^-8 = 0.4% per layer is its
resolution: a bound below that could not hold.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from edm_fast.errors import EdmFastError
from edm_fast.precision import AUTO_CPU_MIN_GFLOP, parse_net_dtype, resolve_net_dtype
from edm_fast.io.model_card import model_card
from edm_fast.sampling.network_precision import network_in_dtype
from edm_fast.sampling.sampler import Sampler

# (max |pixel diff|, relative L2 diff) against the float32 network's images; see the docstring
BOUNDS = {"bf16": (0.1, 0.01), "fp16": (0.01, 0.002)}
SEEDS = range(4)
LABELS = torch.tensor([3, 1, 4, 1])


def _diff(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (out.double() - ref.double())
    return d.abs().max().item(), (d.norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def fp32_images():
    """The bundled model's images with its float32 network (the reference loop)."""
    return Sampler("default", batch_size=4, device="cpu", backend="reference")(
        seeds=SEEDS, class_labels=LABELS)


def _require_backend(name: str) -> None:
    from edm_fast.sampling.backends import available_backends

    reason = available_backends()[name]
    if reason is not None:
        pytest.skip(reason)


# ------------------------------------------------------------------------------------------
# One reading of every spelling.

@pytest.mark.parametrize("spec, dtype", [
    ("fp32", torch.float32), ("float32", torch.float32), (torch.float32, torch.float32),
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    (torch.bfloat16, torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16),
    ("half", torch.float16), ("FP16", torch.float16), (torch.float16, torch.float16),
    ("auto", "auto"), (None, None)])
def test_every_spelling_reads_as_one_dtype(spec, dtype):
    assert parse_net_dtype(spec) == dtype


@pytest.mark.parametrize("spec", ["int8", "fp8", torch.float64, torch.int8, 16, ""])
def test_an_unknown_precision_is_refused_naming_the_choices(spec):
    with pytest.raises(EdmFastError, match="fp32, bf16, fp16, auto"):
        parse_net_dtype(spec)


def test_onnx_export_reads_the_same_spellings():
    """The onnx exporter's dtype goes through the same reader; bf16 is refused, naming why."""
    from edm_fast.io.onnx_export import onnx_net_dtype

    assert onnx_net_dtype("fp16") == onnx_net_dtype("float16") == onnx_net_dtype(torch.float16) \
        == torch.float16
    with pytest.raises(ValueError, match="no bf16 convolutions"):
        onnx_net_dtype("bf16")


# ------------------------------------------------------------------------------------------
# The 'auto' rule and the refusals, per device class (CPU flags and CUDA capability faked).

@pytest.mark.parametrize("flags, gflop, expected, says", [
    ({"amx_bf16", "avx512_bf16"}, 42.0, torch.bfloat16, "AMX-BF16"),
    ({"avx512_bf16"}, 42.0, torch.bfloat16, "AVX512-BF16"),
    ({"avx512_bf16"}, 0.04, torch.float32, "below"),  # measured slower in bf16
    ({"amx_bf16"}, 0.04, torch.float32, "below"),
    ({"avx2", "avx512f"}, 42.0, torch.float32, "neither AMX-BF16 nor AVX512-BF16"),
    (set(), 42.0, torch.float32, "neither")])
def test_auto_on_the_cpu_takes_bf16_only_with_bf16_instructions_and_a_large_network(
        monkeypatch, flags, gflop, expected, says):
    monkeypatch.setattr("edm_fast.device.cpu_flags", lambda: frozenset(flags))
    chosen = resolve_net_dtype("auto", "cpu", lambda: gflop)
    assert chosen.dtype == expected
    assert chosen.note.startswith("net_dtype auto: ") and says in chosen.note


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16),
                                                  ((8, 0), torch.bfloat16),
                                                  ((7, 5), torch.float32)])
def test_auto_on_cuda_takes_bf16_from_sm80(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    chosen = resolve_net_dtype("auto", torch.device("cuda"), None)
    assert chosen.dtype == expected and "auto" in chosen.note


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (7, 5))
    with pytest.raises(EdmFastError, match="compute capability >= 8.0"):
        resolve_net_dtype("bf16", torch.device("cuda"))
    assert resolve_net_dtype("fp16", torch.device("cuda")).dtype == torch.float16


def test_bf16_without_bf16_instructions_runs_with_a_note(monkeypatch):
    """torch runs bf16 on any CPU; without AMX-BF16/AVX512-BF16 it is emulated and slower than
    fp32, which the user is told (never a silent slow path)."""
    monkeypatch.setattr("edm_fast.device.cpu_flags", lambda: frozenset({"avx2"}))
    chosen = resolve_net_dtype("bf16", "cpu")
    assert chosen.dtype == torch.bfloat16 and "slower than fp32" in chosen.note
    monkeypatch.setattr("edm_fast.device.cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert resolve_net_dtype("bf16", "cpu").note is None
    assert resolve_net_dtype("fp32", "cpu").note is None
    assert resolve_net_dtype(None, "cpu").dtype is None


def test_auto_on_this_cpu_says_what_it_chose(fp32_images):
    """Whatever this CPU has, 'auto' chooses by the rule and says so; the digits model
    (0.04 GFLOP per image) stays in fp32 everywhere, with the default images exactly."""
    with pytest.warns(UserWarning, match="net_dtype auto: fp32"):
        sampler = Sampler("default", batch_size=4, device="cpu", backend="reference",
                          net_dtype="auto")
    assert sampler.net_dtype == torch.float32
    assert torch.equal(sampler(seeds=SEEDS, class_labels=LABELS), fp32_images)


def test_auto_takes_bf16_for_a_large_network_on_a_bf16_cpu():
    """Needs a CPU with the amx_bf16 or avx512_bf16 flag (/proc/cpuinfo); the rule's threshold
    is checked by measuring a real network (cifar10-ddpmpp: 42 GFLOP per image)."""
    from edm_fast.device import cpu_flags
    from edm_fast.nets import build_net
    from edm_fast.precision import gflop_per_image
    from edm_fast.precond import Denoiser

    if not {"amx_bf16", "avx512_bf16"} & cpu_flags():
        pytest.skip("needs a CPU with the amx_bf16 or avx512_bf16 flag")
    torch.manual_seed(0)
    den = Denoiser(build_net("cifar10-ddpmpp", dropout=0.0)).eval()
    gflop = gflop_per_image(den, (3, 32, 32), "cpu")
    assert gflop > 10 * AUTO_CPU_MIN_GFLOP
    chosen = resolve_net_dtype("auto", "cpu", lambda: gflop)
    assert chosen.dtype == torch.bfloat16


def test_a_toy_model_has_no_network_to_run_in_bf16():
    with pytest.raises(EdmFastError, match="runs only in its own precision"):
        Sampler("toy-gmm", batch_size=4, device="cpu", net_dtype="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'auto' has nothing to choose for an exact denoiser
        assert Sampler("toy-gmm", batch_size=4, device="cpu", net_dtype="auto").net_dtype is None


def test_net_dtype_given_twice_is_refused():
    with pytest.raises(ValueError, match="net_dtype is given twice"):
        Sampler("default", batch_size=2, device="cpu", backend="onnx", net_dtype="fp16",
                backend_options={"net_dtype": "float16"})


def test_the_users_network_is_not_changed():
    """A reduced precision runs on a copy: the loaded denoiser keeps its float32 weights."""
    from edm_fast.io.models import load_denoiser

    den = load_denoiser("default", device="cpu")
    half = network_in_dtype(den, torch.bfloat16)
    assert half is not den and half.net_dtype == torch.bfloat16
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in den.model.parameters()} == {torch.float32}
    assert network_in_dtype(den, torch.float32) is den  # nothing to convert
    assert model_card(half) is model_card(den)  # class names etc. still readable


# ------------------------------------------------------------------------------------------
# Samples against the float32 network's, per backend.

@pytest.mark.parametrize("net_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("backend, options", [("reference", None),
                                              ("compiled", {"compile": False})])
def test_reduced_precision_samples_within_the_bound(fp32_images, backend, options, net_dtype):
    """The sampler state stays float32 (the output dtype) while the network runs reduced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the emulation note on CPUs without the instructions
        sampler = Sampler("default", batch_size=4, device="cpu", backend=backend,
                          backend_options=options, net_dtype=net_dtype)
    out = sampler(seeds=SEEDS, class_labels=LABELS)
    assert out.dtype == torch.float32 and sampler.net_dtype == parse_net_dtype(net_dtype)
    max_err, rel = _diff(out, fp32_images)
    assert max_err <= BOUNDS[net_dtype][0] and rel <= BOUNDS[net_dtype][1], (max_err, rel)
    assert max_err > 0  # the network really ran reduced


@pytest.mark.parametrize("net_dtype", ["bf16", "fp16"])
def test_compiled_backend_with_freezing_within_the_bound(fp32_images, net_dtype):
    """Inductor with freezing (oneDNN's packed bf16/fp16 kernels; AMX where the CPU has it):
    torch.compile of the whole bundled model: 1.5-3 minutes per precision on 2 shared cores."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = Sampler("default", batch_size=4, device="cpu", backend="compiled",
                          net_dtype=net_dtype)
    max_err, rel = _diff(sampler(seeds=SEEDS, class_labels=LABELS), fp32_images)
    assert max_err <= BOUNDS[net_dtype][0] and rel <= BOUNDS[net_dtype][1], (max_err, rel)


test_compiled_backend_with_freezing_within_the_bound = pytest.mark.slow(
    test_compiled_backend_with_freezing_within_the_bound)


@pytest.mark.parametrize("net_dtype", ["bf16", "fp16"])
def test_cpp_backend_exports_the_network_in_net_dtype(fp32_images, net_dtype, tmp_path):
    """The C++ loop over a TorchScript export whose network is in net_dtype: its metadata says
    so (a re-used file must match it), and the images hold the same bound."""
    _require_backend("cpp")
    from edm_fast.io.export import read_metadata

    path = tmp_path / "d.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = Sampler("default", batch_size=4, device="cpu", backend="cpp",
                          net_dtype=net_dtype,
                          backend_options={"kind": "torchscript", "model_path": path})
    meta = read_metadata(path)
    assert meta["edm_fast.net_dtype"] == str(parse_net_dtype(net_dtype))[6:]
    assert meta["edm_fast.dtype"] == "float32"  # the sampler state's
    max_err, rel = _diff(sampler(seeds=SEEDS, class_labels=LABELS), fp32_images)
    assert max_err <= BOUNDS[net_dtype][0] and rel <= BOUNDS[net_dtype][1], (max_err, rel)
    assert not sampler.backend._metadata_matches({**meta, "edm_fast.net_dtype": "float32"})


def test_an_export_in_another_precision_is_refused(tmp_path):
    """An exported file runs in the precision it was exported in; asking another is an error
    naming the export option, not a silent fp32 run."""
    _require_backend("cpp")
    from edm_fast.io.export import export_torchscript
    from edm_fast.io.exported import ExportedDenoiser
    from edm_fast.io.models import load_denoiser

    path = tmp_path / "d32.ts"
    export_torchscript(load_denoiser("default", device="cpu"), (2, 1, 16, 16), path=path)
    exported = ExportedDenoiser(path)
    assert network_in_dtype(exported, torch.float32) is exported
    with pytest.raises(EdmFastError, match="exported with its network in fp32"):
        network_in_dtype(exported, torch.bfloat16)


def test_onnx_backend_refuses_bf16_and_auto_skips_it(fp32_images):
    """ONNX Runtime has no bf16 convolutions: an explicit request is one clear error; 'auto'
    with a bf16 network never tries the onnx backend."""
    _require_backend("onnx")
    from edm_fast.sampling.backends import auto_candidates

    with pytest.raises(ValueError, match="no bf16 convolutions"):
        Sampler("default", batch_size=2, device="cpu", backend="onnx", net_dtype="bf16")
    classes, _ = auto_candidates(torch.device("cpu"), None, torch.float32, torch.bfloat16)
    assert "onnx" not in [c.name for c in classes]


# ------------------------------------------------------------------------------------------
# The CLI: --net-dtype reaches the Sampler under the same name.

def test_cli_net_dtype_option_reaches_the_sampler():
    from edm_fast.cli.main import build_parser
    from edm_fast.cli.sampling_options import sampling_options

    parser = build_parser()
    assert parser.parse_args(["sample"]).net_dtype is None  # the network as loaded
    for text, short in [("bf16", "bf16"), ("bfloat16", "bf16"), ("float16", "fp16"),
                        ("auto", "auto"), ("fp32", "fp32")]:
        args = parser.parse_args(["sample", "--net-dtype", text])
        assert sampling_options(args)["net_dtype"] == short
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--net-dtype", "int8"])
    plan_args = parser.parse_args(["plan", "--out", "p.json"])  # a plan has no network to run: no such option
    assert "net_dtype" not in sampling_options(plan_args)


def test_cli_samples_in_bf16(tmp_path, capsys):
    from edm_fast.cli.main import main

    out = tmp_path / "x.npz"
    assert main(["sample", "--seeds", "0-3", "--class", "3", "--backend", "reference",
                 "--device", "cpu", "--net-dtype", "bf16", "--out", str(out)]) == 0
    import numpy as np

    assert np.load(out)["samples"].shape[0] == 4
    assert main(["sample", "--seeds", "0-1", "--model", "toy-gmm", "--net-dtype", "bf16",
                 "--out", str(tmp_path / "t.npz")]) == 2
    assert "runs only in its own precision" in capsys.readouterr().err
