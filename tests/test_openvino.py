"""The openvino backend (edm_fast/sampling/backends/openvino.py) against the reference loop, its precision
hint (set from net_dtype, read back, refused when ignored), threads, static and dynamic batch,
and `edm-fast export --format openvino`.

Tolerance in float32: max |pixel diff| <= 1e-4 from the reference loop's images (images in
[-1, 1], 18 Heun steps). Measured here: 3.0e-7 (ONNX source), 3.6e-7 (static batch), 4.8e-7
(guided): float32 rounding of a different kernel order over 35 evaluations. 1e-4 leaves room for
other CPUs' kernels (OpenVINO picks Winograd or AMX/AVX-512 convolutions per ISA) while staying
far below one 8-bit level (2/255 = 0.008). bf16 (CPUs whose OpenVINO plugin offers BF16) is held
to the bounds of tests/test_precision.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

ov = pytest.importorskip("openvino")
pytest.importorskip("onnx")

from edm_fast.errors import EdmFastError
from edm_fast.precond import Denoiser, EDMPrecond
from edm_fast.sampling.sampler import Sampler

FP32_TOL = 1e-4
BF16_BOUNDS = (0.1, 0.01)  # tests/test_precision.py: max |diff|, relative L2
SEEDS = range(4)
LABELS = torch.tensor([3, 1, 4, 1])


def _capabilities() -> list[str]:
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@pytest.fixture(scope="module")
def fp32_images():
    return Sampler("default", batch_size=4, device="cpu", backend="reference")(
        seeds=SEEDS, class_labels=LABELS)


def _openvino(**kwargs) -> Sampler:
    """The bundled model on the openvino backend; the ONNX export's own ONNX Runtime check is
    left out (check=False; test_onnx.py tests it): the comparison with the reference here
    covers the whole path."""
    options = {"check": False, **kwargs.pop("backend_options", {})}
    return Sampler("default", batch_size=4, device="cpu", backend="openvino",
                   backend_options=options, **kwargs)


@pytest.fixture(scope="module")
def fp32_sampler():
    return _openvino()


@pytest.mark.parametrize("options", [None, {"dynamic_batch": False}, {"source": "torch"}],
                         ids=["onnx-dynamic", "onnx-static", "torch-conversion"])
def test_fp32_matches_the_reference(fp32_images, fp32_sampler, options):
    sampler = fp32_sampler if options is None else _openvino(backend_options=options)
    out = sampler(seeds=SEEDS, class_labels=LABELS)
    assert (out - fp32_images).abs().max().item() <= FP32_TOL
    compiled = sampler.backend.evaluate.compiled  # f32 asked for explicitly, and honoured
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


def test_guided_and_padded_batches_match_the_reference():
    """Guidance evaluates 2N rows at once; 3 seeds in a batch of 4 pad the last row."""
    ref = Sampler("default", batch_size=4, device="cpu", backend="reference", guidance=2.0)
    out = _openvino(guidance=2.0)(seeds=range(3), class_labels=7)
    assert (out - ref(seeds=range(3), class_labels=7)).abs().max().item() <= FP32_TOL


class _UncondNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = 2, 6, 0
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.emb = nn.Linear(1, 2)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return self.conv(x) * self.emb(noise_labels.reshape(-1, 1))[:, :, None, None]


def test_an_unconditional_model_with_churn_matches_the_reference():
    torch.manual_seed(0)
    den = Denoiser(_UncondNet(), EDMPrecond()).eval()
    kw = {"shape": (2, 6, 6), "batch_size": 3, "num_steps": 6, "S_churn": 10, "device": "cpu"}
    ref = Sampler(den, backend="reference", **kw)(seeds=range(3))
    out = Sampler(den, backend="openvino", **kw)(seeds=range(3))
    assert (out - ref).abs().max().item() <= FP32_TOL


def test_threads_follow_the_option_and_torch(fp32_sampler):
    from edm_fast.sampling.backends.openvino import compile_for_cpu

    evaluate = fp32_sampler.backend.evaluate
    default = evaluate.compiled.get_property("INFERENCE_NUM_THREADS")
    assert default == torch.get_num_threads()  # OMP_NUM_THREADS / --threads
    assert compile_for_cpu(evaluate.core, evaluate.model, None, 2).get_property(
        "INFERENCE_NUM_THREADS") == 2
    with pytest.raises(ValueError, match="threads must be >= 1"):
        compile_for_cpu(evaluate.core, evaluate.model, None, 0)


def test_bf16_within_the_precision_bound(fp32_images):
    if "BF16" not in _capabilities():
        pytest.skip("OpenVINO's CPU plugin offers no BF16 here (needs the avx512_bf16 or "
                    "amx_bf16 CPU flag)")
    sampler = _openvino(net_dtype="bf16")
    assert sampler.backend.evaluate.compiled.get_property("INFERENCE_PRECISION_HINT") \
        == ov.Type.bf16
    d = (sampler(seeds=SEEDS, class_labels=LABELS).double() - fp32_images.double())
    assert 0 < d.abs().max().item() <= BF16_BOUNDS[0]
    assert (d.norm() / fp32_images.double().norm()).item() <= BF16_BOUNDS[1]


def test_a_precision_the_cpu_ignores_is_refused():
    """OpenVINO silently runs another precision for a hint the CPU cannot honour (f16 becomes
    bf16 or f32 without AVX512-FP16/AMX-FP16); the backend reads it back and refuses."""
    if "FP16" in _capabilities():
        pytest.skip("this CPU runs f16 in OpenVINO (avx512_fp16 / amx_fp16)")
    with pytest.raises(EdmFastError, match="ignores INFERENCE_PRECISION_HINT=f16"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _openvino(net_dtype="fp16")


def test_the_read_back_refuses_any_ignored_hint():
    """The same check with a stand-in core whose compiled model reports f32 for a bf16 hint,
    so that it is exercised on every CPU."""
    from edm_fast.sampling.backends.openvino import compile_for_cpu

    class Compiled:
        def get_property(self, name):
            return ov.Type.f32

    class Core:
        def compile_model(self, model, device, config):
            assert config["INFERENCE_PRECISION_HINT"] == "bf16"
            return Compiled()

        def get_property(self, device, name):
            return ["FP32"]

    with pytest.raises(EdmFastError, match="ignores INFERENCE_PRECISION_HINT=bf16 and would "
                                           "run f32"):
        compile_for_cpu(Core(), None, torch.bfloat16, 1)


def test_auto_puts_openvino_first_for_a_bf16_network_on_the_cpu():
    from edm_fast.sampling.backends import auto_candidates

    classes, _ = auto_candidates(torch.device("cpu"), None, torch.float32, torch.bfloat16)
    assert classes[0].name == "openvino"
    classes, _ = auto_candidates(torch.device("cpu"), None, torch.float32, None)
    names = [c.name for c in classes]
    assert "openvino" in names and names.index("openvino") > 0  # measured slower than onnx


def test_export_format_openvino_round_trip(tmp_path, fp32_images, capsys):
    """`edm-fast export --format openvino` writes the IR with the model's metadata; the backend
    loads it (model_path) and samples the reference images; a mismatching IR is refused."""
    from edm_fast.cli.main import main
    from edm_fast.io.openvino_export import read_openvino_metadata

    out = tmp_path / "ir" / "digits.xml"
    assert main(["export", "--format", "openvino", "--no-check", "--out", str(out)]) == 0
    assert out.exists() and out.with_suffix(".bin").exists()
    meta = read_openvino_metadata(out)
    assert meta["edm_fast.label_dim"] == "10" and meta["edm_fast.sample_shape"] == "1,16,16"
    assert meta["edm_fast.net_dtype"] == "float32" and "edm_fast.class_names" in meta
    sampler = _openvino(backend_options={"model_path": out})
    assert sampler.backend.export_report is None  # loaded, not exported again
    out_images = sampler(seeds=SEEDS, class_labels=LABELS)
    assert (out_images - fp32_images).abs().max().item() <= FP32_TOL
    torch.manual_seed(0)
    other = Denoiser(_UncondNet(), EDMPrecond()).eval()
    with pytest.raises(EdmFastError, match="does not fit this denoiser"):
        Sampler(other, shape=(2, 6, 6), batch_size=2, device="cpu", backend="openvino",
                backend_options={"model_path": out})
    assert main(["export", "--format", "openvino", "--out", str(tmp_path / "x.onnx")]) == 2
    assert ".xml" in capsys.readouterr().err


def test_a_garbage_ir_is_one_line(tmp_path):
    """A model_path that is not an OpenVINO IR is refused as a bad file, naming it."""
    from edm_fast.errors import BadFileError
    from edm_fast.io.models import load_denoiser
    from edm_fast.sampling.sampler import Sampler

    bad = tmp_path / "m.xml"
    bad.write_text("<net><layers><layer id='0' type='Nope'")
    with pytest.raises(BadFileError, match="is not a readable OpenVINO IR") as info:
        Sampler(load_denoiser("default"), batch_size=2, num_steps=2, backend="openvino",
                device="cpu", backend_options={"model_path": bad})
    assert "\n" not in str(info.value)
