"""INT8 post-training static quantization of the bundled digits model's network F: sample
quality against float32 (the bar of bench/bench_precision.py quality) and cost per forward.

    OMP_NUM_THREADS=1 python bench/int8_digits.py                   # quality, then speed
    OMP_NUM_THREADS=1 python bench/int8_digits.py --out int8.md --append

What is quantized. Only the raw network F of EDM Eq. 7, exported on its own to ONNX: the
preconditioning (c_skip, c_out, c_in, c_noise) and the Heun step math (EDM Alg. 2) stay in
float32 torch, in ``precond.Denoiser`` around a small module that calls the quantized session.
Engines:
- 'ort int8, w7' / 'ort int8, w8': ONNX Runtime ``quantize_static``, QDQ format, per-channel
  symmetric weights and per-tensor int8 activations (S8S8, ONNX Runtime's default; U8S8 is
  --activations uint8), on the Conv, MatMul and Gemm nodes only (GroupNorm, SiLU, softmax,
  additions stay float32); w7 = ``reduce_range`` (7-bit weights), w8 = full 8-bit weights.
- 'nncf int8' (when NNCF is installed): ``nncf.quantize`` of the same ONNX graph read into
  OpenVINO (NNCF's default preset for CNNs, PERFORMANCE: symmetric int8), every op type but
  Convolution and MatMul in its ignored scope, compiled by OpenVINO's CPU plugin; with 7-bit
  weights in every layer (``OverflowFix.ENABLE``) on CPUs without VNNI, NNCF's default there
  being the first layer only.
Why 7-bit weights: without VNNI (AVX2, AVX512 without VNNI) the 8-bit dot products of both
engines go through VPMADDUBSW, whose 16-bit pair sums saturate (OpenVINO's "saturation issue";
ONNX Runtime's U8S8 note); 7-bit weights keep the pair sums in range at half the weight
resolution. With VNNI (vpdpbusd, 32-bit accumulation) 8-bit weights are exact and w8 is the
choice: ``needs_7bit_weights`` reads the CPU's flags.
The float32 rows are the torch network (the reference), and the unquantized ONNX graph in each
engine, so that a quality change is the quantization's and not the engine's.

Calibration data: the network's real inputs (c_in x_t, c_noise, one-hot labels) at every one of
the 35 evaluations of a float32 18-step Heun run of --calib-seeds seeds (labels cycling 0-9),
recorded by a forward pre-hook on F. Activation ranges depend on the noise level (through the
c_noise embedding and the content of x_t: Gaussian at sigma_max, nearly a digit at sigma_min),
so the ranges must come from every sigma the sampler visits, and from trajectory states rather
than random noise, which only matches the first step. The calibration seeds (100000 on) are
disjoint from the evaluated seeds (0 .. sets x samples - 1).

Quality: exactly bench_precision.py quality: 18 Heun steps, --sets seed sets x --samples
(seeds 0.., labels cycling 0-9), FD (edm_fast.eval.compare.DigitsScorer: the digits
classifier's feature-space FD, not Inception-FID) and accuracy, mean +- SE over the sets, and
the per-image max |pixel difference| to the torch float32 images (same seeds). The bar: FD
within one SE (the float32 row's) of float32's and accuracy within 0.02.
Speed: milliseconds per forward of F at each --batches size, median of --repeats timed turns
after a warm-up (edm_fast.eval.benchmark.time_call), --threads threads in every engine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edm_fast.eval.benchmark import time_call
from edm_fast.io.models import load_denoiser
from edm_fast.io.onnx_export import OUTPUT_NAME, make_session
from edm_fast.precond import Denoiser
from edm_fast.sampling.backends.onnx import OrtEvaluator
from edm_fast.sampling.sampler import Sampler, model_shape

try:
    from bench.bench_precision import score_seed_sets
    from bench.results import append_results, command_line
except ImportError:
    from bench_precision import score_seed_sets
    from results import append_results, command_line

CPU = torch.device("cpu")
STEPS = 18  # Heun steps: 35 evaluations
CALIB_SEED0 = 100_000  # calibration seeds start here, far from the evaluated seeds
ACC_BAR = 0.02  # the accuracy tolerance
INPUT_NAMES = ("x", "sigma", "class_labels")  # the names OrtEvaluator binds (see export_network)


# ------------------------------------------------------------------------------------------
# The raw network F as its own ONNX graph, and a network module that runs a session.

class _NetworkOnly(nn.Module):
    """F(x_in, c_noise, labels) without augment labels: the graph export_network traces."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x_in, c_noise, class_labels):
        return self.model(x_in, c_noise, class_labels)


def export_network(den: Denoiser, path: str, opset: int = 17) -> None:
    """Write F of ``den`` to ``path`` (float32, dynamic batch). Its inputs carry the names the
    onnx backend's ``OrtEvaluator`` binds, so it runs the graph unchanged: 'x' is c_in x,
    'sigma' is c_noise (B,), 'class_labels' the one-hot labels; the output is F."""
    shape = model_shape(den)
    args = (torch.randn(2, *shape), torch.full((2,), 0.25),
            torch.eye(den.label_dim)[:2])
    axes = {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_NetworkOnly(den.model).eval(), args, path, dynamo=False,
                          input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_axes=axes, do_constant_folding=True)


class EngineNetwork(nn.Module):
    """A stand-in for F that evaluates ``evaluate(x_in, c_noise, labels)`` (an ``OrtEvaluator``
    or an ``OpenVinoEvaluator`` over a graph of export_network) in float32; wrapped in
    ``Denoiser`` with the original preconditioning it samples like the original model."""

    def __init__(self, evaluate, like: nn.Module):
        super().__init__()
        self.evaluate = evaluate
        self.img_channels, self.img_resolution = like.img_channels, like.img_resolution
        self.label_dim = like.label_dim

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        if augment_labels is not None:
            raise ValueError("the exported network takes no augment labels")
        out = self.evaluate(x.float(), noise_labels.float().reshape(-1), class_labels)
        return out.to(x.dtype)


def engine_denoiser(evaluate, den: Denoiser) -> Denoiser:
    """D = c_skip x + c_out F(c_in x; c_noise) in float32 torch around the engine's F."""
    return Denoiser(EngineNetwork(evaluate, den.model), den.precond,
                    label_dim=den.label_dim).eval()


# ------------------------------------------------------------------------------------------
# Calibration inputs and the two quantizers.

def sampler_for(den, batch: int) -> Sampler:
    """The 18-step Heun sampler of bench_precision.py quality, on the reference loop."""
    return Sampler(den, shape=model_shape(den), batch_size=batch, num_steps=STEPS,
                   device="cpu", backend="reference")


def calibration_inputs(den: Denoiser, seeds: int) -> list[dict]:
    """F's inputs {x, sigma (= c_noise), class_labels} as float32 numpy arrays at every
    evaluation of a float32 Heun run of ``seeds`` seeds (see the module docstring)."""
    captured = []

    def record(module, args):
        x_in, c_noise, labels = args[:3]
        captured.append({"x": x_in.float().numpy().copy(),
                         "sigma": c_noise.float().reshape(-1).numpy().copy(),
                         "class_labels": labels.float().numpy().copy()})

    handle = den.model.register_forward_pre_hook(record)
    try:
        ids = range(CALIB_SEED0, CALIB_SEED0 + seeds)
        sampler_for(den, seeds)(seeds=ids, class_labels=torch.tensor([s % 10 for s in ids]))
    finally:
        handle.remove()
    return captured


def needs_7bit_weights() -> bool:
    """True on a CPU without VNNI, whose int8 dot products saturate with 8-bit weights (see the
    module docstring)."""
    from edm_fast.device import cpu_flags

    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def quantize_ort(fp32_path: str, int8_path: str, calib: list[dict], method: str,
                 activations: str, weight_bits: int) -> None:
    """ONNX Runtime static QDQ quantization of Conv/MatMul/Gemm (per-channel symmetric weights
    of ``weight_bits`` 7 or 8, per-tensor ``activations`` int8 or uint8)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib)

        def get_next(self):
            return next(self.items, None)

    prepared = int8_path + ".pre.onnx"
    quant_pre_process(fp32_path, prepared)  # shape inference + graph clean-up, as ORT advises
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    quantize_static(prepared, int8_path, Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type={"int8": QuantType.QInt8,
                                     "uint8": QuantType.QUInt8}[activations],
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    reduce_range=weight_bits == 7, calibrate_method=methods[method])


def quantize_nncf(core, fp32_path: str, calib: list[dict], weight_bits: int):
    """NNCF post-training quantization of the ONNX graph read into OpenVINO: Convolution and
    MatMul only (every other op type present is in the ignored scope), 7-bit weights in every
    layer when ``weight_bits`` is 7."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    model = core.read_model(fp32_path)
    present = {op.get_type_name() for op in model.get_ops()}
    ignored = sorted(present - {"Convolution", "MatMul", "Parameter", "Result", "Constant"})
    dataset = nncf.Dataset(calib, lambda item: [item[n] for n in INPUT_NAMES])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fix = OverflowFix.ENABLE if weight_bits == 7 else OverflowFix.DISABLE
        return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                             subset_size=len(calib),
                             ignored_scope=nncf.IgnoredScope(types=ignored, validate=False),
                             advanced_parameters=AdvancedQuantizationParameters(overflow_fix=fix))


def build_engines(den: Denoiser, workdir: str, calib: list[dict], args, use_nncf: bool) -> dict:
    """name -> F's evaluator: 'ort fp32', 'ort int8, w7', 'ort int8, w8' and, with NNCF,
    'openvino fp32', 'nncf int8' (7-bit weights where ``needs_7bit_weights``)."""
    fp32_path = os.path.join(workdir, "network.onnx")
    export_network(den, fp32_path)
    paths = {"ort fp32": fp32_path}
    for bits in (7, 8):
        name = f"ort int8, w{bits}"
        paths[name] = os.path.join(workdir, f"network-int8-w{bits}.onnx")
        start = time.perf_counter()
        quantize_ort(fp32_path, paths[name], calib, args.calibration, args.activations, bits)
        print(f"{name}: quantize_static {time.perf_counter() - start:.1f} s", flush=True)
    threads, shape = args.threads, model_shape(den)
    engines = {name: OrtEvaluator(make_session(path, threads=threads), CPU, shape, den.label_dim)
               for name, path in paths.items()}
    if use_nncf:
        import openvino as ov

        from edm_fast.sampling.backends.openvino import OpenVinoEvaluator

        core = ov.Core()
        start = time.perf_counter()
        int8_model = quantize_nncf(core, fp32_path, calib, 7 if needs_7bit_weights() else 8)
        print(f"nncf quantize: {time.perf_counter() - start:.1f} s", flush=True)
        for name, model in (("openvino fp32", core.read_model(fp32_path)),
                            ("nncf int8", int8_model)):
            engines[name] = OpenVinoEvaluator(core, model, torch.float32, threads, True,
                                              den.label_dim)
    return engines


def graph_check(den: Denoiser, engines: dict, calib: list[dict]) -> dict:
    """name -> the RMS error of D = c_skip x + c_out F against torch float32, the largest over
    the calibration evaluations (one per noise level and seed batch). The error of F is weighed
    by c_out, as it enters the sampler: at sigma -> 0 a large relative error of F is harmless."""
    if den.precond.name != "edm":
        raise ValueError("graph_check reads sigma back from c_noise = ln(sigma) / 4 (EDM)")
    errors = {}
    with torch.no_grad():
        for name, evaluate in engines.items():
            worst = 0.0
            for item in calib:
                x, c_noise, labels = (torch.from_numpy(item[n]) for n in INPUT_NAMES)
                c_out = den.precond.coefficients((4 * c_noise.double()).exp())[1]
                diff = evaluate(x, c_noise, labels).double() - den.model(x, c_noise, labels)
                worst = max(worst, (c_out.reshape(-1, 1, 1, 1) * diff).pow(2).mean().sqrt().item())
            errors[name] = worst
    return errors


# ------------------------------------------------------------------------------------------
# Quality and speed.

def quality(den: Denoiser, engines: dict, args) -> tuple[str, dict]:
    """The quality table (bench_precision.py quality's columns plus the verdict) and, per row,
    whether it passes the bar."""
    from edm_fast.eval.compare import DigitsScorer
    from edm_fast.eval.metrics import mean_and_se

    scorer = DigitsScorer()
    n, sets = args.samples, args.sets
    seeds = range(n * sets)
    labels = scorer.labels(seeds)
    configs = [("torch fp32", den)]
    configs += [(name, engine_denoiser(ev, den)) for name, ev in engines.items()]
    rows, verdicts, ref = [], {}, None
    for name, model in configs:
        start = time.perf_counter()
        with torch.no_grad():
            x = sampler_for(model, n)(seeds=seeds, class_labels=labels)
        fd, acc = score_seed_sets(scorer, x, labels, n, sets)
        (fd_m, fd_se), (acc_m, acc_se) = mean_and_se(fd), mean_and_se(acc)
        if ref is None:
            ref = (x, fd_m, fd_se, acc_m)
        per_image = (x - ref[0]).abs().flatten(1).amax(1)
        ok = abs(fd_m - ref[1]) <= ref[2] and abs(acc_m - ref[3]) <= ACC_BAR
        verdicts[name] = ok
        rows.append(f"| {name} | {fd_m:.4f} +- {fd_se:.4f} | {fd_m - ref[1]:+.4f} | "
                    f"{acc_m:.4f} +- {acc_se:.4f} | {acc_m - ref[3]:+.4f} | "
                    f"{per_image.max():.4f} | {per_image.median():.4f} | "
                    f"{'pass' if ok else 'FAIL'} |")
        print(rows[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    head = ("| engine, network | FD (mean +- SE over sets) | FD - fp32 | accuracy | acc - fp32 | "
            "max pixel diff vs torch fp32 | median per-image max diff | bar |\n"
            "|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows), verdicts


def _seconds_per_call(fn, inputs, repeats: int) -> float:
    """Median seconds of fn(*inputs) (time_call: warm-up, then --repeats timed turns)."""
    return time_call(lambda: fn(*inputs), CPU, repeats)


def speed(den: Denoiser, engines: dict, batches, repeats: int) -> str:
    """ms per forward of F per engine and batch, and the int8 engines against their fp32."""
    shape = model_shape(den)
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn((batch, *shape), generator=gen)
        c_noise = torch.full((batch,), torch.tensor(2.5).log().item() / 4)  # sigma = 2.5
        labels = torch.eye(den.label_dim)[torch.arange(batch) % den.label_dim]
        inputs = (x, c_noise, labels)
        with torch.no_grad():
            times = {name: _seconds_per_call(fn, inputs, repeats)
                     for name, fn in {"torch fp32": den.model, **engines}.items()}
        base = {"ort": times["ort fp32"], "nncf": times.get("openvino fp32")}
        for name, t in times.items():
            family = name.split()[0]
            vs = f"{base[family] / t:.2f}x" if "int8" in name else "-"
            rows.append(f"| {batch} | {name} | {t * 1e3:.3f} | {t / batch * 1e3:.3f} | {vs} |")
            print(rows[-1], flush=True)
    head = ("| batch | engine | ms per forward of F | ms per image | int8 speed-up vs its fp32 "
            "engine |\n|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def describe(args, errors: dict, use_nncf: bool, verdicts: dict | None) -> str:
    """The notes under the tables: what ran, and the verdict per int8 engine."""
    from edm_fast.device import cpu_model

    if use_nncf:
        import nncf
        import openvino

        nncf_note = (f"nncf int8 = NNCF {nncf.__version__} (preset PERFORMANCE, Convolution/"
                     f"MatMul only, {7 if needs_7bit_weights() else 8}-bit weights) on OpenVINO "
                     f"{openvino.__version__.split('-')[0]}")
    else:
        nncf_note = "NNCF not used"
    vnni = "no VNNI: 8-bit dot products saturate" if needs_7bit_weights() else "VNNI"
    lines = [
        ("F = the raw SongUNet of the bundled digits model, exported alone to ONNX; "
         "preconditioning and Heun steps in float32 torch. ort int8 = ONNX Runtime "
         f"quantize_static ({args.calibration} calibration), QDQ, per-channel symmetric weights "
         f"(w7: 7-bit, reduce_range; w8: 8-bit), {args.activations} activations, Conv/MatMul/Gemm "
         f"only; {nncf_note}. Calibration: F's inputs at all 35 evaluations of an "
         f"18-step Heun run of {args.calib_seeds} seeds (from {CALIB_SEED0})."),
        ("Error of D = c_skip x + c_out F on those inputs against torch fp32 (RMS in pixel units "
         "of [-1, 1], the largest over the 35 noise levels): "
         + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + "."),
        (f"Quality: 18 Heun steps, seeds 0..{args.samples * args.sets - 1}, labels cycling 0-9; "
         "FD = DigitsScorer's feature-space FD (not Inception-FID). Bar: FD within the torch "
         f"fp32 row's SE of its FD, accuracy within {ACC_BAR}."),
        (f"CPU: {cpu_model()} ({vnni}), {args.threads} thread(s) in torch and every engine; speed = "
         f"median of {args.repeats} timed turns after a warm-up."),
    ]
    if verdicts is not None:
        lines.append("Verdict: " + "; ".join(
            f"{name} {'passes' if ok else 'fails'}" for name, ok in verdicts.items()
            if "int8" in name) + ".")
    return "\n".join(f"- {line}" for line in lines)


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200, help="samples per seed set")
    p.add_argument("--sets", type=int, default=4, help="seed sets")
    p.add_argument("--calib-seeds", type=int, default=32,
                   help="seeds of the calibration run (35 evaluations each)")
    p.add_argument("--calibration", choices=["minmax", "entropy", "percentile"],
                   default="minmax", help="ONNX Runtime's activation range estimate")
    p.add_argument("--activations", choices=["int8", "uint8"], default="int8",
                   help="ONNX Runtime's activation type (S8S8 or U8S8 with the int8 weights)")
    p.add_argument("--batches", default="1,16,64", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="threads of torch and every engine")
    p.add_argument("--no-nncf", action="store_true", help="skip NNCF even when installed")
    p.add_argument("--skip-quality", action="store_true", help="speed only")
    p.add_argument("--out", default=None, help="write the tables here as markdown")
    p.add_argument("--append", action="store_true", help="append the tables to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    den = load_denoiser("default", device=CPU).eval().requires_grad_(False)
    use_nncf = not args.no_nncf and nncf_available()
    with tempfile.TemporaryDirectory(prefix="int8_digits_") as workdir:
        with torch.no_grad():
            calib = calibration_inputs(den, args.calib_seeds)
        engines = build_engines(den, workdir, calib, args, use_nncf)
        errors = graph_check(den, engines, calib)
        print("RMS error of D vs torch fp32 (worst noise level):",
              ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
        parts, verdicts = [], None
        if not args.skip_quality:
            table, verdicts = quality(den, engines, args)
            parts.append(f"Quality, bundled digits model ({args.sets} seed sets x "
                         f"{args.samples}):\n\n{table}")
        parts.append("Speed of one forward of the network F:\n\n"
                     + speed(den, engines, args.batches, args.repeats))
    text = "\n\n".join(parts) + "\n\n" + describe(args, errors, use_nncf, verdicts) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if args.append:
        cmd = command_line("python bench/int8_digits.py " + " ".join(argv or sys.argv[1:]),
                           ("OMP_", "EDM_"))
        append_results("INT8 post-training quantization of the digits network vs float32 "
                       "(bench/int8_digits.py)", text, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
