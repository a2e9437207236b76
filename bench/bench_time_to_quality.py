"""Time to quality: the fewest NFE at which each solver matches EDM's Heun at 35 NFE on the
bundled digits model, and the wall time of a batch of 64 at that NFE.

    OMP_NUM_THREADS=1 python bench/bench_time_to_quality.py            # the full run (tens of minutes)
    OMP_NUM_THREADS=1 python bench/bench_time_to_quality.py --no-append --backends reference,onnx

Quality (edm_fast.eval.compare's digits scorer: feature-space FD to the real digits, NOT Inception-FID,
and classifier accuracy): class-conditional samples, label = seed mod 10, on --repeats disjoint
seed sets of --samples seeds (set r: seeds r*n .. r*n + n - 1), so every solver, ours and
k-diffusion's, starts from the same per-seed initial noise (edm_fast.noise.SeedNoise); scores are
mean +- standard error over the sets.
1. Target: Heun at 35 NFE (18 steps) on the reference backend: mean FD m and its SE s.
2. For each solver of edm_fast.solvers.SOLVERS (default options), plus dpmpp_3m_sde with eta 0
   and unipc with order 2, and for k-diffusion's sample_euler, sample_lms, sample_dpmpp_2m,
   sample_heun, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde and sample_euler_ancestral (run eagerly
   on the same denoiser and the same EDM sigma grid; their injected noise also drawn per seed):
   NFEs are tried in increasing order and the first whose mean FD <= m + s (not worse than the
   target by more than one SE, one-sided) is the solver's NFE at target; "not reached" when
   none of --nfes (--heun-nfes for the two Heun samplers, NFE = 2N - 1) is. Ours sample on the
   reference backend (the float32 program executor). Sample sets are cached in --cache.
3. Timing, batch 64: every solver that reaches the target, at that NFE, on each backend of
   --backends that builds; in the same process NVlabs' edm_sampler-style loop at 35 NFE
   (edm_fast.eval.benchmark.nvlabs_style_sampler), our reference backend's Heun at 35 NFE, and
   k-diffusion's solvers (all of them in the reference process, its fastest in the others).
   Each backend runs in a fresh process of its own (backends in one process disturb each other,
   see edm_fast/eval/benchmark.py); within it every sampler is built and warmed up (two untimed
   calls), then --rounds rounds time one call of each, in rotating order, and each keeps its
   median. Speed-ups are taken against the baselines timed in the same process, so the host's
   drift between processes cancels; a solver's "fastest backend" is the one with the largest
   speed-up against the NVlabs-style loop of its own process.
4. One table, printed and appended to bench/RESULTS.md (machine, date, command), with the three
   ratios the fast-sampler issue sets as targets on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from results import append_results, command_line

from edm_fast.eval.benchmark import (
    load_k_diffusion_sampling,
    nvlabs_style_sampler,
    sampler_plan,
)
from edm_fast.eval.compare import DigitsScorer, reference_row
from edm_fast.eval.metrics import mean_and_se
from edm_fast.noise import SeedNoise
from edm_fast.sampling.sampler import Sampler
from edm_fast.solvers import SOLVERS

KD_SOLVERS = ("sample_euler", "sample_lms", "sample_dpmpp_2m", "sample_heun",
              "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler_ancestral")
KD_STOCHASTIC = ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler_ancestral")
SECOND_ORDER = ("heun", "sample_heun")  # NFE = 2N - 1 (the step to sigma = 0 is Euler)
TARGET_STEPS = 18  # Heun, 35 NFE
NVLABS = "NVlabs-style loop (nvlabs-eager), Heun"
REF_HEUN = "edm-fast heun (reference backend)"


def our_configs() -> list[dict]:
    """(label, solver, options): every solver with its defaults, plus the two variants."""
    out = [{"label": name, "solver": name, "options": {}} for name in SOLVERS]
    out.append({"label": "dpmpp_3m_sde eta=0", "solver": "dpmpp_3m_sde",
                "options": {"eta": 0.0}})
    out.append({"label": "unipc order=2", "solver": "unipc", "options": {"order": 2}})
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the bundled digits model")
    p.add_argument("--samples", type=int, default=200, help="samples per seed set")
    p.add_argument("--repeats", type=int, default=4, help="disjoint seed sets")
    p.add_argument("--nfes", default="4,5,6,8,10,12,16,20,24",
                   help="NFEs tried for the one-evaluation-per-step solvers")
    p.add_argument("--heun-nfes", default="5,7,9,11,13,17,21,25,35",
                   help="NFEs tried for the Heun samplers (odd: 2N - 1)")
    p.add_argument("--batch", type=int, default=64, help="batch size of the timed calls")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per sampler (median)")
    p.add_argument("--backends", default="reference,onnx,compiled,cpp",
                   help="backends timed, each in its own process")
    p.add_argument("--threads", type=int, default=None,
                   help="torch / ONNX Runtime threads (default OMP_NUM_THREADS, else 1: on a "
                        "shared 2-core host, 2 OpenMP threads slowed calls 5-20x whenever "
                        "another job took a core)")
    p.add_argument("--cache", default="runs/time-to-quality-cache",
                   help="folder for the cached sample sets")
    p.add_argument("--no-append", action="store_true", help="do not write bench/RESULTS.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one backend
    p.add_argument("--prefill-kd", action="store_true", help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


def set_threads(threads: int | None) -> int:
    n = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
    os.environ["OMP_NUM_THREADS"] = str(n)  # for the worker processes
    torch.set_num_threads(n)
    return n


def steps_for(name: str, nfe: int) -> int:
    return (nfe + 1) // 2 if name in SECOND_ORDER else nfe


def one_hot(labels: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), dim).float()

# -------------------------------------------------------------------------------------------
# Sampling for quality (cached).


class CountingModel:
    """k-diffusion's model(x, sigma) on our denoiser with fixed labels; counts evaluations."""

    def __init__(self, den, labels):
        self.den, self.labels, self.calls = den, labels, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.den(x, sigma, self.labels)


def kd_sample(kd, den, name: str, steps: int, seeds, labels, shape, *, noise_sampler="seed"):
    """k-diffusion's ``name`` on our EDM grid (Sampler's own plan); per-seed initial noise;
    ``noise_sampler`` 'seed' draws the injected noise per seed too, 'randn' with randn_like.
    Returns (samples, NFE per sample)."""
    sigmas = torch.tensor(list(sampler_plan(den, steps).sigmas), dtype=torch.float32)
    noise = SeedNoise(list(seeds), shape)
    x = noise.draw() * sigmas[0]
    model = CountingModel(den, None if labels is None else one_hot(labels, den.label_dim))
    kwargs = {"disable": True}
    if name in KD_STOCHASTIC:
        kwargs["noise_sampler"] = ((lambda s, s_next: noise.randn_like(x))
                                   if noise_sampler == "seed"
                                   else (lambda s, s_next: torch.randn_like(x)))
    with torch.no_grad():
        out = getattr(kd, name)(model, x, sigmas, **kwargs)
    return out, model.calls


class QualitySearch:
    def __init__(self, args, den, scorer, kd, log):
        self.args, self.den, self.scorer, self.kd, self.log = args, den, scorer, kd, log
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        from edm_fast.io.models import bundled_path

        path = bundled_path(args.model)
        st = path.stat()
        self.fingerprint = f"{path.name}-{st.st_size}-{st.st_mtime_ns}"
        self.n, self.repeats = args.samples, args.repeats
        self.seeds = range(self.n * self.repeats)
        self.labels = scorer.labels(self.seeds)

    def _cached(self, key: str, make):
        f = self.cache / f"{key}-{self.n}x{self.repeats}-{self.fingerprint}.pt"
        if f.exists():
            data = torch.load(f)
            return data["x"], data["nfe"]
        x, nfe = make()
        tmp = f.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"x": x.float().cpu(), "nfe": nfe}, tmp)
        os.replace(tmp, f)  # atomic: the k-diffusion prefill process writes here too
        return x, nfe

    def samples(self, kind: str, cfg: dict, steps: int):
        """(all repeats * samples samples, NFE) of one of ours (kind 'ours') or k-diffusion's."""
        if kind == "ours":
            opts = cfg["options"]
            key = "ours-" + cfg["solver"] + "".join(f"-{k}{v}" for k, v in opts.items())

            def make():
                s = Sampler(self.den, batch_size=self.n, solver=cfg["solver"], num_steps=steps,
                            backend="reference", device="cpu", **opts)
                return s(seeds=self.seeds, class_labels=self.labels), s.num_evals
        else:
            key = "kd-" + cfg["label"]

            def make():
                outs, nfe = [], None
                for r in range(self.repeats):
                    part = range(r * self.n, (r + 1) * self.n)
                    x, nfe = kd_sample(self.kd, self.den, cfg["label"], steps, part,
                                       self.labels[r * self.n:(r + 1) * self.n],
                                       self.scorer.shape)
                    outs.append(x)
                return torch.cat(outs), nfe
        return self._cached(f"{key}-{steps}", make)

    def score(self, kind: str, cfg: dict, steps: int) -> dict:
        x, nfe = self.samples(kind, cfg, steps)
        values: dict[str, list[float]] = {}
        for r in range(self.repeats):
            sl = slice(r * self.n, (r + 1) * self.n)
            for k, v in self.scorer(x[sl], self.labels[sl], r).items():
                values.setdefault(k, []).append(v)
        return {"nfe": nfe, "steps": steps, "fd": mean_and_se(values["fd"]),
                "acc": mean_and_se(values["acc"]), "fd_sets": values["fd"]}

    def search(self, kind: str, cfg: dict, nfes, threshold: float) -> dict:
        """Scores at increasing NFE until mean FD <= threshold."""
        trail = []
        for nfe in nfes:
            steps = steps_for(cfg["solver"] if kind == "ours" else cfg["label"], nfe)
            start = time.perf_counter()
            res = self.score(kind, cfg, steps)
            trail.append(res)
            self.log(f"  {kind} {cfg['label']} @ {res['nfe']} NFE: FD {res['fd'][0]:.3f} "
                     f"+- {res['fd'][1]:.3f}, acc {res['acc'][0]:.3f} "
                     f"({time.perf_counter() - start:.1f} s)")
            if res["nfe"] != nfe:
                raise RuntimeError(f"{cfg['label']}: {steps} steps gave {res['nfe']} NFE, "
                                   f"expected {nfe}")
            if res["fd"][0] <= threshold:
                return {"reached": res, "trail": trail}
        return {"reached": None, "trail": trail}

# -------------------------------------------------------------------------------------------
# Timing (one backend per process).


def run_worker(spec: dict) -> dict:
    """Time every sampler of ``spec`` in this process: build, two warm-up calls, then
    ``rounds`` rounds of one call each (rotating order); median ms per sampler."""
    set_threads(spec["threads"])
    from edm_fast.io.models import load_denoiser

    den = load_denoiser(spec["model"], device="cpu")
    batch, backend = spec["batch"], spec["backend"]
    seeds = list(range(batch))
    labels = torch.arange(batch) % den.label_dim
    oh = one_hot(labels, den.label_dim)
    fns, builds, errors = {}, {}, {}
    workdir = tempfile.mkdtemp(prefix="edm_fast_ttq_")
    options = {}
    if backend == "onnx":
        options = {"model_path": os.path.join(workdir, "d.onnx"), "reuse_model": True}
    elif backend == "cpp":
        options = {"model_path": os.path.join(workdir, "d.pt2"), "reuse_model": True}
    for cfg in spec["ours"]:
        name = f"ours:{cfg['label']}"
        start = time.perf_counter()
        try:
            s = Sampler(den, batch_size=batch, solver=cfg["solver"], num_steps=cfg["steps"],
                        backend=backend, device="cpu", backend_options=options,
                        **cfg["options"])
        except Exception as exc:  # noqa: BLE001  (a backend that does not build here: say so)
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        builds[name] = time.perf_counter() - start
        fns[name] = (lambda s=s: s(seeds=seeds, class_labels=labels))
    ref_heun = Sampler(den, batch_size=batch, solver="heun", num_steps=TARGET_STEPS,
                       backend="reference", device="cpu")
    fns["ref-heun35"] = lambda: ref_heun(seeds=seeds, class_labels=labels)
    latents = SeedNoise(seeds, ref_heun.shape).draw()
    sigmas = list(sampler_plan(den, TARGET_STEPS).sigmas)
    fns["nvlabs35"] = lambda: nvlabs_style_sampler(lambda x, s: den(x, s, oh), latents, sigmas)
    kd = load_k_diffusion_sampling() if spec["kd"] else None
    for cfg in spec["kd"]:
        fns[f"kd:{cfg['label']}"] = (
            lambda c=cfg: kd_sample(kd, den, c["label"], c["steps"], seeds, labels,
                                    ref_heun.shape, noise_sampler="randn"))
    names = list(fns)
    times = {n: [] for n in names}
    with torch.no_grad():
        for n in names:  # warm-up
            fns[n]()
            fns[n]()
        for r in range(spec["rounds"]):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                start = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - start)
    return {"backend": backend, "ms": {n: 1e3 * statistics.median(v) for n, v in times.items()},
            "all_ms": {n: [1e3 * t for t in v] for n, v in times.items()},
            "build_s": builds, "errors": errors}


def spawn_worker(spec: dict, log) -> dict | None:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=False,
                         capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        log(f"[timing] backend {spec['backend']} failed: {tail}")
        return None
    out = json.loads(lines[-1])
    log(f"[timing] backend {spec['backend']}: {time.perf_counter() - start:.0f} s; builds "
        + ", ".join(f"{k} {v:.1f} s" for k, v in out["build_s"].items())
        + ("; errors: " + "; ".join(f"{k}: {v}" for k, v in out["errors"].items())
           if out["errors"] else ""))
    return out

# -------------------------------------------------------------------------------------------
# Report.


def _fd(res) -> str:
    (m, se), (a, ase) = res["fd"], res["acc"]
    return f"{m:.2f} ± {se:.2f}", f"{a:.3f} ± {ase:.3f}"


def _ratio(num: float | None, den: float | None) -> str:
    return "–" if num is None or den is None else f"{num / den:.2f}x"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    t0 = time.perf_counter()
    threads = set_threads(args.threads)

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    from edm_fast.io.models import load_denoiser

    den = load_denoiser(args.model, device="cpu")
    scorer = DigitsScorer()
    scorer.check_sizes(args.samples, args.repeats)
    kd = load_k_diffusion_sampling()
    if kd is None:
        log("k-diffusion is not installed: its rows are left out")
    q = QualitySearch(args, den, scorer, kd, log)
    nfes = [int(v) for v in args.nfes.split(",")]
    heun_nfes = [int(v) for v in args.heun_nfes.split(",")]

    # k-diffusion's sample sets in a second process meanwhile (1 thread each; it fills the
    # cache, and the search below then reads them back)
    prefill = None
    if kd is not None and not args.prefill_kd:
        prefill = subprocess.Popen([sys.executable, __file__, "--prefill-kd",
                                    *(argv if argv is not None else sys.argv[1:])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # 1. the target
    target = q.score("ours", {"label": "heun", "solver": "heun", "options": {}}, TARGET_STEPS)
    t_mean, t_se = target["fd"]
    threshold = t_mean + t_se
    real = reference_row(scorer, samples=args.samples, repeats=args.repeats)
    log(f"target Heun@{target['nfe']}: FD {t_mean:.3f} +- {t_se:.3f} (sets "
        f"{', '.join(f'{v:.2f}' for v in target['fd_sets'])}), acc {target['acc'][0]:.3f}; "
        f"threshold {threshold:.3f}; real digits FD {real['fd'][0]:.3f} +- {real['fd'][1]:.3f}")

    # 2. NFE at target
    ours = []
    for cfg in ([] if args.prefill_kd else our_configs()):
        grid = heun_nfes if cfg["solver"] == "heun" else nfes
        ours.append(cfg | q.search("ours", cfg, grid, threshold))
    if prefill is not None:
        log(f"waiting for the k-diffusion prefill process (exit {prefill.wait()})")
    kds = []
    for name in (KD_SOLVERS if kd is not None else ()):
        cfg = {"label": name}
        kds.append(cfg | q.search("kd", cfg, heun_nfes if name in SECOND_ORDER else nfes,
                                  threshold))
    log("quality search done")
    if args.prefill_kd:
        return 0

    # 3. timing
    ours_timed = [{"label": c["label"], "solver": c["solver"], "options": c["options"],
                   "steps": c["reached"]["steps"]} for c in ours if c["reached"]]
    kd_timed = [{"label": c["label"], "steps": c["reached"]["steps"]}
                for c in kds if c["reached"]]
    base = {"model": args.model, "batch": args.batch, "rounds": args.rounds,
            "threads": threads, "ours": ours_timed}
    backends = [b for b in args.backends.split(",") if b]
    workers: dict[str, dict] = {}
    first = "reference" if "reference" in backends else backends[0]
    kd_best = None
    for backend in [first] + [b for b in backends if b != first]:
        kd_here = kd_timed if backend == first or kd_best is None else \
            [c for c in kd_timed if c["label"] == kd_best]
        out = spawn_worker(base | {"backend": backend, "kd": kd_here}, log)
        if out is None:
            continue
        workers[backend] = out
        if backend == first and kd_timed:
            kd_best = min(kd_timed, key=lambda c: out["ms"][f"kd:{c['label']}"])["label"]

    # 4. table
    def speedups(w, name):
        ms = w["ms"][name]
        kd_ms = w["ms"].get(f"kd:{kd_best}") if kd_best else None
        return ms, w["ms"]["nvlabs35"] / ms, (kd_ms / ms if kd_ms else None), \
            w["ms"]["ref-heun35"] / ms

    head = ["solver", "NFE at target", "FD ± SE", "accuracy", "backend", "ms / batch 64",
            "vs NVlabs-style @35", "vs k-diffusion best", "vs Heun@35 reference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {}  # label -> (speed-up vs nvlabs, backend, ms, vs kd, vs ref, nfe)
    for c in ours:
        name = f"ours:{c['label']}"
        if not c["reached"]:
            last = min(c["trail"], key=lambda r: r["fd"][0])
            lines.append(f"| {c['label']} | not reached (best FD {last['fd'][0]:.2f} ± "
                         f"{last['fd'][1]:.2f} at {last['nfe']}) | – | – | – | – | – | – | – |")
            continue
        options = [(speedups(w, name), b) for b, w in workers.items() if name in w["ms"]]
        fd, acc = _fd(c["reached"])
        if not options:
            lines.append(f"| {c['label']} | {c['reached']['nfe']} | {fd} | {acc} | – | – | – "
                         "| – | – |")
            continue
        (ms, vs_nv, vs_kd, vs_ref), backend = max(options, key=lambda o: o[0][1])
        best[c["label"]] = (vs_nv, backend, ms, vs_kd, vs_ref, c["reached"]["nfe"])
        lines.append(f"| {c['label']} | {c['reached']['nfe']} | {fd} | {acc} | {backend} | "
                     f"{ms:.1f} | {vs_nv:.2f}x | "
                     f"{'–' if vs_kd is None else f'{vs_kd:.2f}x'} | {vs_ref:.2f}x |")
    ref_w = workers.get(first)
    for c in kds:
        name = f"kd:{c['label']}"
        if not c["reached"]:
            last = min(c["trail"], key=lambda r: r["fd"][0])
            lines.append(f"| k-diffusion {c['label']} | not reached (best FD "
                         f"{last['fd'][0]:.2f} ± {last['fd'][1]:.2f} at {last['nfe']}) | – | – "
                         "| eager | – | – | – | – |")
            continue
        fd, acc = _fd(c["reached"])
        if ref_w is None or name not in ref_w["ms"]:
            lines.append(f"| k-diffusion {c['label']} | {c['reached']['nfe']} | {fd} | {acc} | "
                         "eager | – | – | – | – |")
            continue
        ms, vs_nv, vs_kd, vs_ref = speedups(ref_w, name)
        star = " (best)" if c["label"] == kd_best else ""
        lines.append(f"| k-diffusion {c['label']}{star} | {c['reached']['nfe']} | {fd} | {acc} "
                     f"| eager | {ms:.1f} | {vs_nv:.2f}x | {vs_kd:.2f}x | {vs_ref:.2f}x |")
    fd, acc = _fd(target)
    if ref_w is not None:
        for label, key in ((NVLABS, "nvlabs35"), (REF_HEUN, "ref-heun35")):
            ms, vs_nv, vs_kd, vs_ref = speedups(ref_w, key)
            lines.append(f"| {label} | {target['nfe']} | {fd} | {acc} | "
                         f"{'eager' if key == 'nvlabs35' else 'reference'} | {ms:.1f} | "
                         f"{vs_nv:.2f}x | {'–' if vs_kd is None else f'{vs_kd:.2f}x'} | "
                         f"{vs_ref:.2f}x |")
    table = "\n".join(lines)

    # the three ratios
    ratios = []
    if best:
        top = max(best.items(), key=lambda kv: kv[1][0])
        label, (vs_nv, backend, ms, vs_kd, vs_ref, nfe) = top
        ratios.append(f"- best edm-fast configuration ({label} @ {nfe} NFE, {backend}, "
                      f"{ms:.1f} ms) vs the NVlabs-style loop @ 35 NFE: {vs_nv:.2f}x "
                      f"(target >= 5x: {'met' if vs_nv >= 5 else 'NOT met'})")
        if vs_kd is not None:
            ratios.append(f"- the same vs k-diffusion's best configuration ({kd_best}): "
                          f"{vs_kd:.2f}x (target >= 1.5x: "
                          f"{'met' if vs_kd >= 1.5 else 'NOT met'})")
        small = {k: v for k, v in best.items() if v[5] <= 12}
        if small:
            label, (vs_nv, backend, ms, vs_kd, vs_ref, nfe) = max(small.items(),
                                                                  key=lambda kv: kv[1][4])
            ratios.append(f"- chosen <= 12-NFE solver ({label} @ {nfe} NFE, {backend}, "
                          f"{ms:.1f} ms) vs Heun @ 35 NFE on the reference loop: {vs_ref:.2f}x "
                          f"(target >= 3x: {'met' if vs_ref >= 3 else 'NOT met'})")
        else:
            ratios.append("- no solver reaches the target at <= 12 NFE")
    per_backend = []
    for b, w in workers.items():
        ms = w["ms"]
        per_backend.append(f"{b}: NVlabs-style@35 {ms['nvlabs35']:.0f} ms, reference Heun@35 "
                           f"{ms['ref-heun35']:.0f} ms"
                           + (f", k-diffusion {kd_best} {ms[f'kd:{kd_best}']:.0f} ms"
                              if kd_best and f"kd:{kd_best}" in ms else ""))
    trails = []
    for kind, group in (("", ours), ("k-diffusion ", kds)):
        for c in group:
            trails.append(f"{kind}{c['label']}: " + ", ".join(
                f"{r['nfe']}: {r['fd'][0]:.2f}" for r in c["trail"]))
    flags = _cpu_flags()
    elapsed = time.perf_counter() - t0
    note = (
        f"\n\nTarget: EDM Heun at {target['nfe']} NFE ({TARGET_STEPS} steps, reference backend), "
        f"feature-space FD to the real digits (DigitsClassifier features, NOT Inception-FID) "
        f"{t_mean:.3f} ± {t_se:.3f}, accuracy {target['acc'][0]:.3f}; real digits at the same "
        f"size: FD {real['fd'][0]:.3f} ± {real['fd'][1]:.3f}. NFE at target: the smallest NFE "
        f"tried (ours and k-diffusion's one-evaluation solvers: {args.nfes}; Heun samplers: "
        f"{args.heun_nfes}) whose mean FD over {args.repeats} disjoint seed sets of "
        f"{args.samples} class-conditional samples (label = seed mod 10; the same per-seed "
        f"initial noise for every solver) is at most the target's mean + 1 SE "
        f"(<= {threshold:.3f}; one-sided 1-SE rule); FD and accuracy there as mean ± SE over "
        f"the sets. Solvers with default options (dpmpp_2m_sde / dpmpp_3m_sde / euler_ancestral "
        f"eta 1, unipc order 3, lms / ipndm order 4, ddim eta 0); k-diffusion's run eagerly on "
        f"the same denoiser and EDM grid, their injected noise drawn per seed for FD and with "
        f"randn_like when timed (cheaper than their default BrownianTree).\n\n"
        f"Timing: batch {args.batch}, one call per sampler per round, median of {args.rounds} "
        f"rounds after two warm-up calls; each backend ({', '.join(workers)}) in a fresh process "
        f"with the NVlabs-style loop, the reference Heun@35 and k-diffusion's best timed in the "
        f"same process, and every speed-up taken against those; 'backend' is the one with the "
        f"largest speed-up against its process's NVlabs-style loop. Baselines per process: "
        f"{'; '.join(per_backend)}. Threads: {threads} (torch and ONNX Runtime intra-op); the "
        f"2-core host was shared with other jobs during the run. CPU flags: {flags}. "
        f"Run time {elapsed / 60:.1f} min.\n\n"
        + "\n".join(ratios)
        + "\n\nMean FD at each NFE tried (search stops at the first that reaches the target):\n"
        + "\n".join(f"- {t}" for t in trails))
    print("\n" + table + note)
    if not args.no_append:
        cmd = command_line(" ".join(["python bench/bench_time_to_quality.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
                           ("OMP_NUM_THREADS",))
        append_results("Time to quality: NFE to match Heun@35 and wall time per solver "
                       "(bench/bench_time_to_quality.py)", table + note, cmd)
    return 0


def _cpu_flags() -> str:
    want = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
            "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(w for w in want if w in have) or "none of the SIMD flags"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
