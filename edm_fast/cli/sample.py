"""``edm-fast sample``: generate samples with EDM's Heun sampler (EDM Algorithm 2) or any solver
of --solver, one image per seed, into a grid PNG, a folder of PNGs or an .npz. The latents of
official EDM2 img512 models are decoded to RGB images with --vae (edm_fast.io.latents)."""

from __future__ import annotations

import sys
import time

from .sampling_options import (add_guide_option, add_model_option, add_sampling_options,
                               sampling_options)

__all__ = ["add_sample_command", "cmd_sample"]


def add_sample_command(sub, formatter) -> None:
    """Register ``sample`` on the subparsers ``sub`` (argparse) with help ``formatter``."""
    p = sub.add_parser("sample", formatter_class=formatter, help="generate samples",
                       description="Generate samples: EDM's Heun sampler (Algorithm 2) by "
                       "default, or any solver of --solver. Each image depends only on its "
                       "seed, whatever the batch or device.")
    add_model_option(p)
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,9")
    p.add_argument("--class", dest="class_label", default=None, metavar="K|NAME",
                   help="class to generate, by index or by the name it had in the training "
                   "data (e.g. a folder name); conditional models; default: cycle through "
                   "classes")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="guidance weight w: classifier-free D_u + w (D_c - D_u) (1 = conditional "
                   "only), or with --guide-ckpt autoguidance D_g + w (D - D_g) (1 = the main "
                   "model alone); --guidance-interval limits either to a range of noise levels")
    add_guide_option(p, "it gets the same labels and replaces classifier-free guidance; "
                     "needs --guidance; runs on every backend")
    p.add_argument("--out", default="samples.png",
                   help="grid.png, a folder (one PNG per seed) or file.npz; toy models: a plot. "
                   "Under torchrun every rank writes its own seeds: into the shared folder, or "
                   "to NAME.rank<R>.png / .npz")
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="decode the latents of an official EDM2 img512 model into RGB images "
                   "before writing them, with this Stable Diffusion VAE: a local diffusers "
                   "AutoencoderKL folder (config.json and diffusion_pytorch_model.safetensors, "
                   "e.g. a copy of stabilityai/sd-vae-ft-mse; never downloaded). Needs diffusers: "
                   "python -m pip install \"edm-fast[vae]\". Without --vae such models write "
                   "their 4-channel latents to an .npz only")
    p.add_argument("--vae-batch", type=_positive_int, default=None, metavar="N",
                   help="latents per VAE decode (default: the model's encoder record, else 8)")
    add_sampling_options(p, threads=True)
    p.set_defaults(func=cmd_sample)


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def class_index(value: str, label_dim: int, names: list[str]) -> int:
    """--class K or NAME (a class name stored in the checkpoint) as an index in 0..label_dim-1."""
    if value in names:
        return names.index(value)
    try:
        index = int(value)
    except ValueError:
        known = f"; its classes: {', '.join(names)}" if names else ""
        raise ValueError(f"--class {value!r} is neither an index nor a class name of the "
                         f"model{known}") from None
    if not 0 <= index < label_dim:
        raise ValueError(f"--class must be in 0..{label_dim - 1}")
    return index


def labels_for(args, seeds, sampler):
    """The class label of each seed: --class for all, or seed % label_dim; None unconditional."""
    import torch

    label_dim = sampler.label_dim
    if label_dim == 0:
        if args.class_label is not None:
            raise ValueError("--class given, but the model is unconditional")
        return None
    if args.class_label is not None:
        index = class_index(str(args.class_label), label_dim, sampler.class_names)
        return torch.full((len(seeds),), index, dtype=torch.long)
    return torch.tensor([s % label_dim for s in seeds], dtype=torch.long)


def rank_path(out: str, rank: int) -> str:
    """--out of one torchrun rank: NAME.rank<R>.png / .npz for a file, a folder as it is."""
    from pathlib import Path

    from ..io.samples import output_kind

    p = Path(out)
    if output_kind(out):
        return str(p.with_name(f"{p.stem}.rank{rank}{p.suffix}"))
    return out  # a folder: every rank writes its own seeds' files into it


def check_channels(args, sampler, vae, out: str) -> None:
    """With --vae: the model records a VAE encoder whose channels match the VAE's; without it,
    a PNG (a grid or a folder) needs 1 or 3 channels. One-line errors, before any sampling."""
    from ..io.latents import check_vae, encoder_record
    from ..io.samples import output_kind

    if vae is not None:
        check_vae(vae, sampler.model_card, sampler.shape[0])
        return
    channels = sampler.shape[0]
    if len(sampler.shape) == 3 and channels not in (1, 3) and output_kind(out) != ".npz":
        record = encoder_record(sampler.model_card)
        vae_name = record.get("vae_name") if record else None
        what = f"latents of the VAE {vae_name}" if vae_name else "samples"
        raise ValueError(f"a PNG needs 1 or 3 channels, but {args.ckpt} generates "
                         f"{channels}-channel {what}: decode latents into images with --vae DIR "
                         "(a local diffusers AutoencoderKL folder), or write an .npz")


def cmd_sample(args) -> int:
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from ..io.samples import check_output, output_kind, save_per_seed, save_samples
    from ..io.models import model_mixture
    from ..noise import parse_seeds
    from ..sampling.sampler import Sampler

    seeds = parse_seeds(args.seeds, distinct=True)  # one file per seed: no repeats
    total = len(seeds)
    from ..device import busy_cpu_note, resolve_device, set_threads, setup_note
    from ..train.distributed import rank_device, shard_seeds

    device = rank_device(resolve_device(args.device))  # torchrun on CUDA: cuda:LOCAL_RANK
    set_threads(args.threads)
    seeds, rank, world = shard_seeds(seeds)
    if not seeds:  # more ranks than seeds: this one has nothing to do
        return 0
    note = None if args.threads or rank else busy_cpu_note(device)  # --threads: user's choice
    if note:
        print(f"edm-fast sample: {note}", file=sys.stderr)
    out = args.out if world == 1 else rank_path(args.out, rank)
    check_output(out)  # before loading the model: the file kinds and a writable folder
    vae = None
    if args.vae is not None:  # before the model, too: no diffusers or a bad folder fails early
        from ..io.latents import decode_latents, load_vae

        vae = load_vae(args.vae, device=device, dtype=getattr(torch, args.dtype))
    sampler = Sampler(args.ckpt, batch_size=min(args.batch, len(seeds)),
                      **sampling_options(args), guidance=args.guidance,
                      guide=args.guide_ckpt, dtype=getattr(torch, args.dtype), device=device,
                      backend=args.backend,
                      expected_images=len(seeds),
                      backend_options={"threads": args.threads} if args.threads
                      and args.backend == "onnx" else None)
    note = setup_note(sampler.warmup_seconds, sampler.backend_name, sampler.device)
    if note and rank == 0:
        print(f"edm-fast sample: {note}", file=sys.stderr)
    check_output(out, toy=len(sampler.shape) == 1)  # toy vectors: a .png plot or an .npz only
    check_channels(args, sampler, vae, out)
    labels = labels_for(args, seeds, sampler)
    # a folder gets each batch's files as soon as it is sampled: an interrupted run keeps them
    per_seed_files = output_kind(out) == ""
    seconds, decode_seconds, chunks = 0.0, 0.0, []
    batches = range(0, len(seeds), sampler.batch_size)
    for lo in tqdm(batches, desc="sampling", unit="batch", disable=len(batches) < 2 or rank > 0):
        part = seeds[lo:lo + sampler.batch_size]
        start = time.perf_counter()
        images = sampler(seeds=part, class_labels=None if labels is None
                         else labels[lo:lo + sampler.batch_size])
        seconds += time.perf_counter() - start
        if vae is not None:  # on the sampler's device, in its dtype
            start = time.perf_counter()
            images = decode_latents(images, vae, sampler.model_card, batch_size=args.vae_batch)
            decode_seconds += time.perf_counter() - start
        images = images.cpu()
        if per_seed_files:
            save_per_seed(images, part, out)
        else:
            chunks.append(images)
    path = Path(out)
    if not per_seed_files:
        title = f"{args.ckpt}: {len(seeds)} samples, {args.num_steps} {args.solver} steps"
        path = save_samples(torch.cat(chunks), out, seeds=seeds, labels=labels,
                            mixture=model_mixture(args.ckpt), title=title)
    if rank == 0:
        nfe = sampler.num_evals
        print(f"{total} samples ({nfe} NFE each) with the '{sampler.backend_name}' "
              f"backend on {sampler.device}: {seconds:.2f} s sampling, "
              + (f"{decode_seconds:.2f} s VAE decoding, " if vae is not None else "")
              + f"{sampler.warmup_seconds:.2f} s set-up -> {path}"
              + (" (rank 0)" if world > 1 else ""))
    return 0
