"""Training memory: the estimate (edm_fast.train.memory) against the measured peak of one step,
and the README's 64x64 example (64px-ddpmpp, batch 128) run for one step with the automatic
micro-batch. Each measurement runs in a fresh process; its peak RSS comes from getrusage.

    OMP_NUM_THREADS=1 python bench/bench_train_memory.py            # appends to bench/RESULTS.md
    OMP_NUM_THREADS=1 python bench/bench_train_memory.py --no-example   # estimates only (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_results, command_line  # noqa: E402

# One training step (forward, backward, Adam) after a warm step at one image, so that the
# measured growth is what a step at the batch adds: the activations and the backward pass.
PROBE = r"""
import copy, json, resource, sys, torch
from edm_fast.io.checkpoints import build_denoiser, net_spec
from edm_fast.losses import make_loss
from edm_fast.train.memory import estimate_step_memory
preset, res, ch, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
den = build_denoiser({"net": net_spec(preset, img_resolution=res, img_channels=ch),
                      "precond": {"name": "edm"}}).train()
loss_fn = make_loss("edm")
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before_model = peak()
est = estimate_step_memory(den.model, lambda n: loss_fn(den, torch.randn(n, ch, res, res)).mean())
ema, opt = copy.deepcopy(den.model), torch.optim.Adam(den.model.parameters())
loss_fn(den, torch.randn(1, ch, res, res)).mean().backward(); opt.step()
opt.zero_grad(set_to_none=False)
base = peak()
loss_fn(den, torch.randn(batch, ch, res, res)).mean().backward(); opt.step()
print(json.dumps({"est_act": est.step_bytes(batch) - est.state_bytes, "meas_act": peak() - base,
                  "est_step": est.step_bytes(batch), "meas_step": peak() - before_model}))
"""

CASES = [("tiny", 16, 1, 64), ("tiny", 16, 1, 256), ("64px-ddpmpp", 64, 3, 4),
         ("64px-ddpmpp", 64, 3, 8)]


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def estimates() -> list[str]:
    rows = ["| net | resolution | images per pass | activations: estimate / measured (MB) | "
            "ratio | step incl. state: estimate / measured (MB) | ratio |",
            "|---|---|---|---|---|---|---|"]
    for preset, res, ch, batch in CASES:
        out = subprocess.run([sys.executable, "-c", PROBE, preset, str(res), str(ch),
                              str(batch)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(f"| {preset} | {res}x{res}x{ch} | {batch} | {_mb(r['est_act'])} / "
                    f"{_mb(r['meas_act'])} | {r['est_act'] / r['meas_act']:.2f} | "
                    f"{_mb(r['est_step'])} / {_mb(r['meas_step'])} | "
                    f"{r['est_step'] / r['meas_step']:.2f} |")
        print(rows[-1], flush=True)
    return rows


def readme_example() -> list[str]:
    """The README's folder example at 64x64 (3 classes of 40 RGB pictures) for one step."""
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for c in range(3):
            (Path(tmp) / "data" / f"class{c}").mkdir(parents=True)
            for i in range(40):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                    Path(tmp) / "data" / f"class{c}" / f"{i}.jpg")
        args = ["train", "--data", f"{tmp}/data", "--preset", "64px-ddpmpp", "--loss", "edm",
                "--cond", "--label-dropout", "0.1", "--batch", "128", "--max-steps", "1",
                "--sample-every", "0", "--no-progress", "--out", f"{tmp}/run", "--device", "cpu"]
        # the step only: the end-of-run sample grid (35 NFE of a 22M net) is switched off
        cmd = [sys.executable, "-c", "import sys, edm_fast.train.loop as t; from edm_fast.cli.main "
               "import main; t.sample_grid = lambda *a, **k: None; "
               "sys.exit(main(sys.argv[1:]))", *args]
        start = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    note = next((line for line in res.stderr.splitlines() if "per pass" in line), "(none)")
    return ["| command | exit | peak RSS (GB) | wall (s) | note |", "|---|---|---|---|---|",
            f"| train --preset 64px-ddpmpp --batch 128 --max-steps 1 (120 RGB 64x64 images) | "
            f"{res.returncode} | {peak / 2**30:.1f} | {seconds:.0f} | {note.strip()} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-example", action="store_true",
                        help="skip the one-step run of the README's 64px example (minutes)")
    args = parser.parse_args()
    table = estimates()
    if not args.no_example:
        table += ["", *readme_example()]
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    append_results("training memory estimate vs measured peak",
                   "\n".join(table) + f"\n\nThreads: OMP_NUM_THREADS={threads}. Activations: "
                   "the growth of peak RSS over one step at the batch after a warm step at one "
                   "image; step incl. state: the growth from before the model was built.",
                   command_line("python bench/bench_train_memory.py" +
                                (" --no-example" if args.no_example else ""), ("OMP_",)))


if __name__ == "__main__":
    main()
