"""Reduced precision (net_dtype): per-forward cost per backend and precision, the OpenVINO +
k-diffusion peer in the same run, and sample quality on the bundled digits model.

    python bench/bench_precision.py forward --models tiny,bundled,cifar10-ddpmpp --batches 1,16
    python bench/bench_precision.py quality            # 4 seed sets x 200, FD and accuracy
    add --append to write the tables to bench/RESULTS.md

forward: one denoiser evaluation D(x; sigma) as each backend's loop runs it (its ``evaluation``
hook; the eager module for 'reference'), median of --repeats timed turns after a warm-up.
Per-image cost = per-forward time / batch x NFE (35: 18 Heun steps); full 18-step runs are not
timed. The peer is what a user would assemble: k-diffusion's ``sample_heun`` driving an OpenVINO
compiled model of the same ONNX export, in OpenVINO's default precision on this CPU (and in
f32), timed over a --peer-steps Heun run and divided by its NFE; our openvino backend runs the
same run through Sampler, so the two rows differ only in the loop around the same engine.

quality: FD (edm_fast.eval.compare.DigitsScorer: feature-space FD of the digits classifier, not
Inception-FID) and classifier accuracy of 4 seed sets x 200 samples, mean +- SE over the sets,
and the per-image pixel difference from the float32 network's images (same seeds).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edm_fast.eval.benchmark import bench_model, load_k_diffusion_sampling, time_call
from edm_fast.device import cpu_flags, cpu_model
from edm_fast.sampling.sampler import Sampler, model_shape

try:
    from bench.results import append_results, command_line
except ImportError:
    from results import append_results, command_line

CPU = torch.device("cpu")
NFE = 35  # 18 Heun steps
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
         "amx_fp16")


def cpu_line() -> str:
    have = cpu_flags()
    flags = " ".join(f for f in FLAGS if f in have) or "none of " + " ".join(FLAGS)
    amx = "AMX" if "amx_bf16" in have else "no AMX"
    return f"{cpu_model()} ({amx}; flags: {flags}), {torch.get_num_threads()} thread(s)"


def ov_capabilities() -> list[str]:
    try:
        import openvino as ov
    except ImportError:
        return []
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


# ------------------------------------------------------------------------------------------
# Per forward.

def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16); without it torch
    emulates bf16 convolutions, many times slower than fp32, and OpenVINO refuses bf16."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def _engines(den, batch: int, include_compiled: bool):
    """(backend, net_dtype) pairs to time here: those that can run on this CPU (torch's bf16
    only where it is native: an emulated bf16 network is no configuration to deploy)."""
    bf16 = native_bf16()
    pairs = [("reference", "fp32")] + [("reference", "bf16")] * bf16 + [("onnx", "fp32")]
    caps = ov_capabilities()
    if caps:
        pairs.append(("openvino", "fp32"))
        if "BF16" in caps:
            pairs.append(("openvino", "bf16"))
        if "FP16" in caps:
            pairs.append(("openvino", "fp16"))
    if include_compiled:
        pairs += [("compiled", "fp32")] + [("compiled", "bf16")] * bf16
    return pairs


def _sampler(den, shape, batch, backend, net_dtype, steps=18):
    options = {"check": False} if backend in ("onnx", "openvino") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Sampler(den, shape=shape, batch_size=batch, num_steps=steps, device="cpu",
                       backend=backend, net_dtype=net_dtype, backend_options=options)


def _peer(den, shape, batch, x, sigma, labels, steps: int, precision: str | None, repeats: int):
    """Seconds per NFE of k-diffusion's sample_heun over an OpenVINO compiled model of D
    (OpenVINO's default precision when ``precision`` is None), and the effective precision."""
    import openvino as ov

    from edm_fast.io.onnx_export import export_onnx
    from edm_fast.sampling.sampler import plan_for_model

    kd = load_k_diffusion_sampling()
    if kd is None:
        return None, None
    path = os.path.join(tempfile.mkdtemp(prefix="bench_prec_"), "d.onnx")
    export_onnx(den, path, sample_shape=shape, label_dim=den.label_dim, check=False)
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(path, "CPU", config)
    effective = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    request = compiled.create_infer_request()
    lab = None if labels is None else labels.numpy()

    class OvModel(torch.nn.Module):  # what k-diffusion calls: model(x, sigma) -> D
        def forward(self, x, s):
            feeds = [x.numpy(), s.expand(x.shape[0]).contiguous().numpy()]
            if lab is not None:
                feeds.append(lab)
            request.infer(feeds)
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

    plan = plan_for_model(den, num_steps=steps)
    sigmas = torch.tensor(plan.sigmas, dtype=torch.float32)
    model = OvModel()
    nfe = 2 * steps - 1

    def run():
        return kd.sample_heun(model, x * sigmas[0], sigmas, disable=True)
    return time_call(run, CPU, repeats) / nfe, effective


def bench_forward(args) -> str:
    rows = []
    for name in args.models:
        den = bench_model(name, CPU)
        shape = model_shape(den)
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn((batch, *shape), generator=gen)
            sigma = torch.full((batch,), 2.5)
            labels = (torch.nn.functional.one_hot(torch.arange(batch) % den.label_dim,
                                                  den.label_dim).float()
                      if den.label_dim else None)
            times = {}
            for backend, net_dtype in _engines(den, batch, args.compiled):
                sampler = _sampler(den, shape, batch, backend, net_dtype)
                if backend == "reference":
                    fn = functools.partial(sampler.backend.denoiser, x, sigma, labels)
                else:
                    fn = sampler.backend.evaluation(x, sigma, labels)
                with torch.no_grad():
                    t = time_call(fn, CPU, args.repeats)
                times[(backend, net_dtype)] = t
                print(f"{name} b{batch} {backend} {net_dtype}: {t * 1e3:.2f} ms", flush=True)
                del sampler
            if args.peer_steps and ("openvino", "fp32") in times:
                # the loops around the same engine: a short Heun run each, per NFE
                default = None  # OpenVINO's default precision here, once known
                for precision, ours_dtype in ((None, None), ("f32", "fp32")):
                    if precision is not None and precision == default:  # timed already
                        break
                    peer, effective = _peer(den, shape, batch, x, sigma, labels,
                                            args.peer_steps, precision, args.repeats)
                    if peer is None:
                        break
                    default = default or effective
                    ours_dtype = ours_dtype or {"bf16": "bf16", "f32": "fp32",
                                                "f16": "fp16"}[effective]
                    ours = _sampler(den, shape, batch, "openvino", ours_dtype,
                                    steps=args.peer_steps)
                    run_labels = (torch.arange(batch) % den.label_dim) if den.label_dim \
                        else None

                    def run(ours=ours, seeds=range(batch), run_labels=run_labels):
                        return ours(seeds=seeds, class_labels=run_labels)
                    t_ours = time_call(run, CPU, args.repeats) / ours.num_evals
                    label = "default" if precision is None else precision
                    times[("peer:k-diffusion+openvino", f"{effective} ({label})")] = peer
                    times[("ours:openvino run", ours_dtype + " (same)")] = t_ours
                    print(f"{name} b{batch} peer {effective}: {peer * 1e3:.2f} ms/NFE, ours "
                          f"{t_ours * 1e3:.2f}", flush=True)
            base = times.get(("onnx", "fp32"))
            for (backend, net_dtype), t in times.items():
                per_image = t / batch * NFE
                vs = f"{base / t:.2f}x" if base else "-"
                rows.append(f"| {name} | {batch} | {backend} | {net_dtype} | {t * 1e3:.2f} | "
                            f"{per_image:.4f} | {vs} |")
    head = ("| model | batch | engine | net dtype | ms per forward (or per NFE of a run) | "
            "s per image at 35 NFE | vs onnx fp32 |\n|---|---|---|---|---|---|---|")
    note = (f"\nCPU: {cpu_line()}; OpenVINO CPU plugin capabilities: "
            f"{', '.join(ov_capabilities()) or 'openvino not installed'}. 'peer' = "
            f"k-diffusion sample_heun over an OpenVINO compiled model ({args.peer_steps}-step "
            "run / NFE); 'ours:openvino run' = Sampler(backend='openvino') over the same run. "
            + ("" if native_bf16() else "No bf16 arithmetic on this CPU: torch's bf16 rows are "
               "left out (emulated, many times slower than fp32). ")
            + ("" if "amx_bf16" in cpu_flags() else "No AMX on this CPU: the issue's AMX "
               "targets (>= 2x / 2.5x onnx fp32 on cifar10-ddpmpp) cannot be measured here.")
            + "\n")
    return head + "\n" + "\n".join(rows) + "\n" + note


# ------------------------------------------------------------------------------------------
# Quality on the bundled digits model.

def score_seed_sets(scorer, x, labels, n: int, sets: int) -> tuple[list[float], list[float]]:
    """(FD per seed set, accuracy per seed set) of ``sets`` consecutive sets of ``n`` samples."""
    fd, acc = [], []
    for r in range(sets):
        part = slice(r * n, (r + 1) * n)
        score = scorer(x[part], labels[part], r)
        fd.append(score["fd"])
        acc.append(score["acc"])
    return fd, acc


def bench_quality(args) -> str:
    from edm_fast.eval.compare import DigitsScorer
    from edm_fast.eval.metrics import mean_and_se

    scorer = DigitsScorer()
    n, sets = args.samples, args.sets
    seeds = range(n * sets)
    labels = scorer.labels(seeds)
    den = bench_model("bundled", CPU)
    configs = [("reference", "fp32"), ("reference", "bf16")]
    if args.fp16:  # emulated on CPUs without AVX512-FP16/AMX-FP16: ~10x slower than fp32
        configs.append(("reference", "fp16"))
    caps = ov_capabilities()
    if caps:
        configs.append(("openvino", "fp32"))
        if "BF16" in caps:
            configs.append(("openvino", "bf16"))
    rows, ref = [], None
    for backend, net_dtype in configs:
        start = time.perf_counter()
        sampler = _sampler(den, model_shape(den), n, backend, net_dtype)
        x = sampler(seeds=seeds, class_labels=labels)
        fd, acc = score_seed_sets(scorer, x, labels, n, sets)
        if ref is None:
            ref = x
        per_image = (x - ref).abs().flatten(1).amax(1)
        (fd_m, fd_se), (acc_m, acc_se) = mean_and_se(fd), mean_and_se(acc)
        rows.append(f"| {backend} | {net_dtype} | {fd_m:.4f} +- {fd_se:.4f} | "
                    f"{acc_m:.4f} +- {acc_se:.4f} | {per_image.max():.4f} | "
                    f"{per_image.median():.4f} |")
        print(rows[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    head = ("| backend | net dtype | FD (mean +- SE over sets) | accuracy | max pixel diff vs "
            "reference fp32 | median per-image max diff |\n|---|---|---|---|---|---|")
    note = (f"\nBundled digits model, 18 Heun steps, {sets} seed sets x {n} samples (seeds 0.."
            f"{n * sets - 1}, labels cycling 0-9); FD = the digits classifier's feature-space FD "
            "to the real digits (edm_fast.eval.compare.DigitsScorer, not Inception-FID); images in "
            f"[-1, 1]. CPU: {cpu_line()}.\n")
    return head + "\n" + "\n".join(rows) + "\n" + note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["forward", "quality"])
    p.add_argument("--models", default="tiny,bundled,cifar10-ddpmpp",
                   type=lambda s: s.split(","))
    p.add_argument("--batches", default="1,16,64", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer-steps", type=int, default=3,
                   help="Heun steps of the timed peer/ours runs (0: no peer rows)")
    p.add_argument("--compiled", action="store_true", help="also time the compiled backend "
                   "(Inductor compile: minutes per model and batch on 2 cores)")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--sets", type=int, default=4)
    p.add_argument("--fp16", action="store_true", help="quality: also the fp16 network")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = bench_forward(args) if args.part == "forward" else bench_quality(args)
    print(table)
    if args.append:
        title = ("Reduced precision: per-forward cost per backend and net dtype, with the "
                 "OpenVINO + k-diffusion peer (bench/bench_precision.py)"
                 if args.part == "forward" else
                 "Reduced precision: digits quality at bf16/fp16 vs fp32 (bench/bench_precision.py)")
        cmd = command_line("python bench/bench_precision.py " + " ".join(argv or sys.argv[1:]),
                           ("OMP_", "EDM_"))
        append_results(title, table, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
