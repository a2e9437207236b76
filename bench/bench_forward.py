"""One denoiser forward D(x; sigma) per execution mode: achieved FLOP rate against the peak.

    python -m pytest bench/bench_forward.py -q -s
    EDM_FWD_MODELS=cifar10-ddpmpp EDM_FWD_BATCHES=16 python -m pytest bench/bench_forward.py -s

Modes, measured in one run on the same weights and inputs: eager (NCHW), eager channels_last,
torch.compile (Inductor; on the CPU with freezing), and ONNX Runtime (the exported denoiser).
FLOPs of one forward come from torch.utils.flop_counter; the peak is the best measured float32
rate of a large matmul or 3x3 convolution on this device (edm_fast.eval.benchmark.peak_flops).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from edm_fast.eval.benchmark import bench_model, count_flops, format_table, peak_flops, time_call
from edm_fast.sampling.sampler import model_shape

try:
    from bench.results import append_results, command_line
except ImportError:
    from results import append_results, command_line

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODELS = os.environ.get("EDM_FWD_MODELS", "tiny,cifar10-ddpmpp").split(",")
BATCHES = [int(b) for b in os.environ.get("EDM_FWD_BATCHES", "16").split(",")]
ROWS: list[dict] = []


def _modes(den, x, sigma):
    """name -> a zero-argument callable running one forward in that mode."""
    modes = {"eager": lambda: den(x, sigma)}
    import copy

    den_cl = copy.deepcopy(den).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
    modes["eager channels_last"] = lambda: den_cl(x_cl, sigma)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant-fold the weights (inference only)
    compiled = torch.compile(den, dynamic=False)
    modes["compiled (inductor, freezing)"] = lambda: compiled(x, sigma)
    try:
        from edm_fast.io.onnx_export import export_onnx, make_session

        path = os.path.join(tempfile.mkdtemp(prefix="edm_fwd_"), "d.onnx")
        export_onnx(den, path, sample_shape=tuple(x.shape[1:]), label_dim=den.label_dim,
                    check=False)
        feeds = {"x": x.cpu().numpy(), "sigma": sigma.cpu().numpy()}
        if x.device.type == "cpu":
            session = make_session(path)
            modes["onnxruntime"] = lambda: session.run(None, feeds)
        else:  # the GPU's own row, never a CPU time scored against the GPU's peak
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("this onnxruntime has no CUDAExecutionProvider")
            session = make_session(path, providers=["CUDAExecutionProvider"])
            modes["onnxruntime (CUDA EP, host I/O)"] = lambda: session.run(None, feeds)
    except Exception as exc:  # onnxruntime missing: say so and go on
        print(f"[bench_forward] onnxruntime skipped: {exc}")
    return modes


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch", BATCHES)
@torch.no_grad()
def test_forward_rate(model_name, batch):
    den = bench_model(model_name, DEVICE)
    if den.label_dim:
        pytest.skip("forward modes are measured on unconditional nets")
    x = torch.randn(batch, *model_shape(den), device=DEVICE)
    sigma = torch.full((batch,), 2.0, device=DEVICE)
    flops = count_flops(den, x, sigma)
    peak = peak_flops(DEVICE)
    for name, fn in _modes(den, x, sigma).items():
        seconds = time_call(fn, DEVICE, repeats=3)
        ROWS.append({"model": model_name, "batch": batch, "mode": name,
                     "ms": f"{seconds * 1e3:.1f}", "GFLOP/forward": f"{flops / 1e9:.1f}",
                     "GFLOP/s": f"{flops / seconds / 1e9:.0f}",
                     "% peak": f"{100 * flops / seconds / peak:.0f}"})
        print(ROWS[-1])


def teardown_module(module):
    if ROWS:
        note = (f"\n\nPeak: best measured float32 GEMM / 3x3 conv rate here, "
                f"{peak_flops(DEVICE) / 1e9:.0f} GFLOP/s; threads: {torch.get_num_threads()}.")
        cmd = command_line("python -m pytest bench/bench_forward.py -q -s",
                           ("EDM_FWD_", "OMP_NUM_THREADS"))
        append_results("Denoiser forward rate per execution mode (bench/bench_forward.py)",
                       format_table(ROWS) + note, cmd)
