"""The CLI's commands other than ``sample`` (each imports its heavy modules lazily)."""

from __future__ import annotations

__all__ = ["add_commands"]


def add_commands(sub, formatter, add_sampling_options) -> None:
    """Register train and the other commands on the subparsers ``sub``."""
    from .compare import add_compare_command
    from .convert import add_convert_command
    from .export import add_export_command
    from .serve import add_serve_command

    _add_train(sub, formatter)
    add_export_command(sub, formatter)
    add_convert_command(sub, formatter)
    _add_bench(sub, formatter)
    _add_plan(sub, formatter, add_sampling_options)
    add_compare_command(sub, formatter)
    add_serve_command(sub, formatter)


def _add_plan(sub, formatter, add_sampling_options) -> None:
    p = sub.add_parser(
        "plan", formatter_class=formatter, help="write a sampling plan for edm_fast_sample",
        description="Write the sampling program of a model and a set of solver options to a "
        "text file (edm_fast.io.program_file), which the standalone C++ binary runs: "
        "edm_fast_sample --model MODEL.pt2 --plan FILE. The plan takes the model's sigma range "
        "and its rounding to trained levels (DDPM, iDDPM), as `edm-fast sample` does.")
    p.add_argument("--ckpt", "--model", dest="ckpt", default="default", metavar="PATH|NAME",
                   help="checkpoint, run folder or bundled model name (for its sigma range)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance weight (the binary then needs --class)")
    p.add_argument("--out", required=True, metavar="FILE", help="the plan file to write")
    add_sampling_options(p, execution=False)
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args) -> int:
    from .sampling_options import sampling_options
    from ..io.models import load_denoiser
    from ..io.program_file import write_program_file
    from ..sampling.sampler import plan_for_model

    plan = plan_for_model(load_denoiser(args.ckpt, device="cpu"), **sampling_options(args),
                          guidance=args.guidance)
    path = write_program_file(args.out, plan)
    print(f"wrote {path}: {plan.solver}, {plan.num_steps} steps, {plan.num_evals} NFE, "
          f"{plan.num_noise} noise draws per sample")
    return 0


def _add_bench(sub, formatter) -> None:
    p = sub.add_parser(
        "bench", formatter_class=formatter, help="time the sampler backends (short run)",
        description="Time every available backend against an NVlabs-style eager loop and "
        "k-diffusion's sample_heun on the same denoiser; prints ms/NFE, img/s and overhead, "
        "one row as each sampler finishes (each in its own process), then a legend. The full "
        "benchmark is bench/bench_sampler.py.")
    p.add_argument("--models", default="mlp,tiny",
                   help="comma list: mlp, tiny or any network preset (random weights), or a "
                   "bundled model: bundled (= default, as in --ckpt default), default-ddpm")
    p.add_argument("--batches", default="1,16", help="comma list of batch sizes")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (2N-1 NFE)")
    p.add_argument("--backends", default=None,
                   help="comma list, or 'all'; default: all that load, except on the CPU the "
                   "two that compile first (compiled, cpp: minutes of set-up each per model and "
                   "batch), which get a 'skipped' row")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads of each measurement (default: torch's, one per core)")
    p.set_defaults(func=_cmd_bench)


_COMPILE_FIRST = ("compiled", "cpp")  # backends whose set-up is a compile (Inductor, AOTI)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the running measurement's process is killed on the way
    out (edm_fast.eval.benchmark._measure_isolated) and the CLI exits with 143."""

    signum = 15


def _raise_terminated(signum, frame):
    raise _Terminated()


def _cmd_bench(args) -> int:
    import signal
    import sys

    from ..sampling.backends import BACKENDS
    from ..eval.benchmark import (
        benchmark_case,
        check_bench_model,
        format_header,
        format_row,
        legend,
        missing_outside_samplers,
        not_installed_row,
    )
    from ..device import busy_cpu_note, resolve_device, set_threads

    device = resolve_device(args.device)
    backends = args.backends.split(",") if args.backends not in (None, "all") else None
    skipped = []
    if args.backends is None and device.type == "cpu":  # the README's short run stays short
        skipped = [b for b in _COMPILE_FIRST if b in BACKENDS]
        backends = [b for b in BACKENDS if b not in skipped]
    unknown = sorted(set(backends or ()) - set(BACKENDS))
    if unknown:
        raise ValueError(f"--backends: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(BACKENDS))}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise ValueError(f"--batches takes a comma list of sizes, got {args.batches!r}") from None
    if min(batches) < 1 or args.repeats < 1 or args.steps < 1:
        raise ValueError("--batches, --repeats and --steps must be >= 1")
    models = [check_bench_model(m) for m in args.models.split(",")]  # all, before any run
    threads = set_threads(args.threads)

    def err(line):
        print(f"edm-fast bench: {line}", file=sys.stderr, flush=True)

    err(f"{len(models) * len(batches)} case(s) on {device}, {threads} thread(s), every sampler "
        "in its own process; rows print as they finish (the compiled and cpp backends "
        "compile first: minutes on a CPU)")
    note = busy_cpu_note(device)
    if note:
        err(note)
    try:  # only the main thread may set handlers (a test may call main() from another)
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        previous = None
    try:
        print(format_header(), flush=True)
        cases = [(model, batch) for model in models for batch in batches]
        for i, (model, batch) in enumerate(cases, 1):
            where = f"[{i}/{len(cases)}] {model} batch {batch}"
            benchmark_case(model, batch, device=device, steps=args.steps,
                           repeats=args.repeats, backends=backends, threads=threads,
                           log=lambda line: err(line.removeprefix("[bench] ")),
                           on_row=lambda row: print(format_row(row), flush=True),
                           on_start=lambda name, where=where: err(f"{where}: {name} ..."))
        for name in skipped:
            print(format_row(not_installed_row(
                f"ours/{name}", "skipped: compiles first (minutes on a CPU); --backends all "
                "includes it")), flush=True)
        for name, reason in missing_outside_samplers().items():
            print(format_row(not_installed_row(name, reason)), flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print()
    print(legend(threads, device, args.steps, args.repeats), flush=True)
    return 0


def _add_train(sub, formatter) -> None:
    from ..train.loop import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train", formatter_class=formatter, help="train an EDM or EDM2 (or DDPM/VP/VE) model",
        description="Train a denoiser with the EDM loss (EDM Sec. 5) or a baseline loss on the "
        "same net, or an EDM2 preset (--preset tiny-edm2, edm2-img64-s, ...) with the EDM2 "
        "recipe: learned-uncertainty loss, inverse-square-root learning rate, power-function "
        "EMA with snapshots for `edm-fast phema` (docs/EDM2.md). Checkpoints are atomic and "
        "hold everything needed to resume bit for bit; use torchrun --nproc_per_node=K -m "
        "edm_fast train ... for data parallelism.")
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=d.data,
                   help="digits[:RES], mnist:PATH, toy:gmm1d|gmm2d|moons|swissroll, or an "
                   "image folder root/<label>/<file>.jpg")
    g.add_argument("--resolution", type=int, default=None, help="image size (default: data's)")
    g.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="image channels (default: data's)")
    g.add_argument("--preset", default=d.preset, help="network preset (edm_fast.nets.PRESETS)")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels, metavar="N",
                   help="skip (with a note) image files whose header declares more than N "
                   "pixels, before decoding them (a guard against decompression bombs)")
    g.add_argument("--loss", choices=["edm", "ddpm", "vp", "ve", "edm2"], default=d.loss,
                   help="training objective; also selects the preconditioning (default: edm2 "
                   "for EDM2 presets, edm for the others)")
    g.add_argument("--cond", action="store_true", help="class-conditional on the data's labels")
    g.add_argument("--label-dropout", type=float, default=d.label_dropout,
                   help="label dropout probability (enables classifier-free guidance)")
    g.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    g.add_argument("--augment", type=float, default=d.augment, metavar="P",
                   help="non-leaking augmentation probability (EDM App. F.2); 0 = off")
    g.add_argument("--xflip", action="store_true",
                   help="mirror each training image left-right with probability 1/2 (as "
                   "NVlabs' --xflip: mirrored images count as real data, so the model also "
                   "generates mirrored ones; for photos, not for digits or text). Applied "
                   "before --augment, whose own flips are undone by its conditioning")
    o = p.add_argument_group("optimisation")
    o.add_argument("--kimg", type=float, default=d.kimg,
                   help="training length in thousands of images")
    o.add_argument("--batch", type=int, default=d.batch, help="global batch size")
    o.add_argument("--batch-gpu", type=int, default=None, metavar="N",
                   help="at most N images per forward pass on each device; the rest of the "
                   "batch accumulates gradients (same result as the full batch, less memory; "
                   "EDM2 nets: to the 1e-4 of their weight normalisation, once per pass)")
    o.add_argument("--lr", type=float, default=d.lr,
                   help="Adam learning rate after the ramp-up (EDM2: alpha_ref, before the "
                   "decay); default 1e-3 for EDM, the preset's for EDM2 (NVlabs' values; 1e-2 "
                   "for tiny-edm2)")
    o.add_argument("--lr-rampup-kimg", type=float, default=d.lr_rampup_kimg,
                   help="learning-rate ramp-up length in thousands of images (default 10; "
                   "10000 for the paper's EDM2 presets)")
    o.add_argument("--decay", type=float, default=None, dest="lr_decay_batches",
                   metavar="BATCHES",
                   help="EDM2: learning-rate decay time t_ref in batches, lr / sqrt(max(t / "
                   "t_ref, 1)) (NVlabs' --decay); 0 = none; default: the preset's (70000 "
                   "img512, 35000 img64, 500 tiny-edm2)")
    o.add_argument("--P-mean", "--P_mean", type=float, default=None, dest="p_mean",
                   metavar="MEAN", help="mean of ln(sigma) in the EDM / EDM2 loss (default: "
                   "-1.2 for EDM, the preset's for EDM2: -0.4 img512, -0.8 img64, tiny-edm2)")
    o.add_argument("--P-std", "--P_std", type=float, default=None, dest="p_std",
                   metavar="STD", help="standard deviation of ln(sigma) in the EDM / EDM2 loss "
                   "(default: 1.2 for EDM; 1.0 img512, 1.6 img64 and tiny-edm2)")
    o.add_argument("--ema-kimg", type=float, default=d.ema_halflife_kimg, dest="ema_halflife_kimg",
                   help="EMA half-life in thousands of images (EDM runs)")
    o.add_argument("--ema-sigma-rel", type=_sigma_rel_list, default=d.ema_sigma_rels,
                   dest="ema_sigma_rels", metavar="LIST",
                   help="EDM2: the power-function EMA profiles tracked (sigma_rel, comma list; "
                   "NVlabs' stds); the first (smallest) is the checkpoints' EMA")
    o.add_argument("--grad-clip", type=float, default=None, help="max gradient norm")
    o.add_argument("--amp", choices=["none", "bf16", "fp16"], default=d.amp,
                   help="mixed precision autocast")
    o.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the initial weights, data order, noise levels and noise")
    o.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=d.out, help="run folder")
    r.add_argument("--resume", action="store_true",
                   help="continue from the latest readable checkpoint in --out with the run's "
                   "saved options; options given on the command line override them where the "
                   "run allows (lr, EMA, lengths, checkpoint periods); a different data, loss, "
                   "batch, seed or network option is refused by name")
    r.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps")
    r.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    r.add_argument("--ckpt-every", type=float, default=d.ckpt_every_kimg,
                   dest="ckpt_every_kimg", help="checkpoint period in kimg")
    r.add_argument("--snapshot-every", type=float, default=None, dest="snapshot_every_kimg",
                   metavar="KIMG",
                   help="EDM2: period of the power-EMA snapshots phema-NIMG-SIGMA.safetensors "
                   "that `edm-fast phema --ckpt RUN` reconstructs from (0: at the end only; "
                   "default: 8389 = 8 Mi images for the paper's presets, 10 for tiny-edm2)")
    r.add_argument("--sample-every", type=float, default=d.sample_every_kimg,
                   dest="sample_every_kimg", help="sample-grid period in kimg (0: end only)")
    r.add_argument("--no-progress", action="store_false", dest="progress",
                   help="no progress bars (data loading, training)")
    p.set_defaults(func=_cmd_train, parser=p)


def _sigma_rel_list(text: str) -> tuple:
    """--ema-sigma-rel: '0.05,0.1' -> (0.05, 0.1), checked as edm-fast phema checks them."""
    import argparse

    from ..errors import EdmFastError
    from ..train.phema import parse_sigma_rels

    try:
        return tuple(parse_sigma_rels(text))
    except EdmFastError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _explicit_options(args) -> set[str]:
    """The option names (dests) set on the command line: the train arguments are parsed again
    into a namespace whose every name already holds a marker, which argparse leaves in place
    for an option that was not given (it fills only missing names with defaults)."""
    import argparse

    marker = object()
    namespace = argparse.Namespace(**{k: marker for k in vars(args)})
    argv = args.argv[args.argv.index(args.command) + 1:]
    args.parser.parse_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not marker}


def _cmd_train(args) -> int:
    import dataclasses

    from ..train.loop import TrainConfig, resumed_config, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if args.resume:
        cfg = resumed_config(cfg, _explicit_options(args))
    summary = train(cfg, resume=args.resume)
    if not summary.get("checkpoint"):
        return 0  # not the main process of a torchrun job
    if summary["steps_this_run"] == 0:
        print(f"{args.out} is already at step {summary['steps']} ({summary['kimg']:g} kimg), the "
              "length asked for: nothing to train (raise --kimg or --max-steps to continue)")
        return 0
    resumed = summary["steps_this_run"] != summary["steps"]
    count = (f"{summary['steps_this_run']} steps, {summary['steps']} in all" if resumed
             else f"{summary['steps']} steps")
    print(f"trained {count} ({summary['kimg']:g} kimg), final loss "
          f"{summary['final_loss']:.4f} (mean of the last {summary['final_loss_steps']} "
          f"steps, as logged in log.jsonl) -> {summary['checkpoint']}")
    return 0
