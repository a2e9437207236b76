"""Sampler latency per NFE, images/s and sampler overhead, every backend side by side.

    python -m pytest bench/bench_sampler.py -q -s                 # this machine's default set
    EDM_BENCH_MODELS=tiny,mlp EDM_BENCH_BATCHES=1,16 python -m pytest bench/bench_sampler.py -s

Models: mlp (toy MLP, where overhead dominates), tiny (a ~0.3M DDPM++), bundled (the packaged
digits model), cifar10-ddpmpp (the paper's 56M DDPM++ at 32x32). EDM's 18 Heun steps (35 NFE)
unless EDM_BENCH_STEPS says otherwise. What each column means: edm_fast/eval/benchmark.py. The table
is appended to bench/RESULTS.md with machine, date and command.
"""

from __future__ import annotations

import os

import pytest
import torch

from edm_fast.eval.benchmark import benchmark_case, format_table, peak_flops

try:
    from bench.results import append_results, command_line
except ImportError:
    from results import append_results, command_line

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
STEPS = int(os.environ.get("EDM_BENCH_STEPS", "18"))
MODELS = os.environ.get("EDM_BENCH_MODELS", "mlp,tiny,bundled,cifar10-ddpmpp").split(",")
EXPLICIT_BATCHES = "EDM_BENCH_BATCHES" in os.environ
BATCHES = [int(b) for b in os.environ.get(
    "EDM_BENCH_BATCHES", "1,16,64,256,1024" if GPU else "1,16,64").split(",")]
REPEATS = int(os.environ.get("EDM_BENCH_REPEATS", "5"))
ROUNDS = int(os.environ.get("EDM_BENCH_ROUNDS", "1"))  # > 1: each sampler keeps its best round
BACKENDS = os.environ.get("EDM_BENCH_BACKENDS")  # comma list; default: all that load
ROWS: list[dict] = []
# the 56M-parameter net takes ~0.15 s per forward at batch 1 and ~2 s at batch 16 on a 2-core
# CPU: by default batch 1 only there (an explicit EDM_BENCH_BATCHES applies to every model)
CASES = [(m, b) for m in MODELS for b in BATCHES
         if GPU or EXPLICIT_BATCHES or m != "cifar10-ddpmpp" or b == 1]


@pytest.mark.parametrize("model_name, batch", CASES)
def test_sampler_backends(benchmark, model_name, batch):
    if model_name == "bundled":
        from edm_fast.io.models import bundled_path

        if not bundled_path("default").exists():
            pytest.skip("bundled model not built")
    rows = benchmark_case(model_name, batch, device=DEVICE, steps=STEPS, repeats=REPEATS,
                          rounds=ROUNDS, backends=BACKENDS.split(",") if BACKENDS else None)
    benchmark.extra_info["rows"] = rows
    benchmark.pedantic(lambda: None, rounds=1)  # the rows above are the measurement
    ROWS.extend(rows)
    print("\n" + format_table(rows))


def teardown_module(module):
    if not ROWS:
        return
    from edm_fast.plan import SamplingPlan

    note = (f"\n\nNFE per image: {SamplingPlan.build(num_steps=STEPS).num_evals} ({STEPS} Heun "
            f"steps). % peak: against the best measured float32 rate of a large matmul or 3x3 "
            f"convolution on this device, "
            f"{peak_flops(DEVICE) / 1e9:.0f} GFLOP/s. Overhead can be negative when the loop's "
            "forwards run faster than an isolated forward (warm caches, no launch gaps).")
    # only the variables that were set: EDM_BENCH_BATCHES, when given, also lifts the CPU's
    # batch-1-only rule for cifar10-ddpmpp, so spelling out the default would not repeat the run
    cmd = command_line("python -m pytest bench/bench_sampler.py -q -s",
                       ("EDM_BENCH_", "OMP_NUM_THREADS"))
    append_results("Sampler backends: latency per NFE, img/s, overhead (bench/bench_sampler.py)",
                   format_table(ROWS) + note, cmd)
