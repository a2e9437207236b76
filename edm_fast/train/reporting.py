"""What a training run shows of itself: the loss curve loss.png, grids of EMA samples, and
the summary that train() returns and logs (with the check that DDP ranks ended in sync)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io.checkpoints import latest_checkpoint
from .run_folder import Run
from .state import TrainState

__all__ = ["plot_losses", "ranks_in_sync", "sample_grid", "summary"]


def plot_losses(out: Path) -> None:
    """loss.png from log.jsonl (skipped quietly without matplotlib). Drawn on a figure of its
    own: matplotlib's backend stays as it was (a notebook's plt.show() keeps working)."""
    from ..optional import MissingDependency, figures

    try:
        plt = figures("the loss curve loss.png")
    except MissingDependency:
        return
    log = out / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    records = [r for r in records if "loss" in r]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([r["kimg"] for r in records], [r["loss"] for r in records], lw=1)
    ax.set_xlabel("kimg")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    losses = [r["loss"] for r in records if r["loss"] > 0]
    if losses and max(losses) < 10 * min(losses):  # within a decade: 1.4, not 1.4x10^0
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from ..io.samples import save_figure

    save_figure(fig, out / "loss.png")


@torch.no_grad()
def sample_grid(run: Run, meta, ema, step: int, num: int = 64) -> None:
    """A grid (or toy scatter) of EMA samples with 18 Heun steps, seeds 0..num-1."""
    from tqdm.auto import tqdm  # the notebook widget under Jupyter (with ipywidgets)

    from ..io.samples import save_samples
    from ..noise import SeedNoise
    from ..precond import Denoiser, make_precond
    from ..sampling.reference import sample_edm
    from ..schedules import edm_sigmas

    den = Denoiser(ema.model, make_precond(meta["precond"])).eval()
    shape = tuple(meta["sample_shape"])
    noise = SeedNoise(range(num), shape, device=run.device)
    labels = (torch.arange(num, device=run.device) % den.label_dim) if den.label_dim else None
    sigmas = edm_sigmas(18, max(0.002, den.sigma_min), min(80.0, den.sigma_max))
    with tqdm(total=len(sigmas) - 1, desc=f"sample grid ({num} images)", unit="step",
              leave=False, disable=not run.cfg.progress) as bar:
        x = sample_edm(den, noise.draw(), sigmas, class_labels=labels,
                       callback=lambda _: bar.update())
    mixture = None
    if meta["data"]["spec"].startswith("toy:"):
        from ..nets.toy import MIXTURES

        name = meta["data"]["spec"][4:]
        mixture = MIXTURES[name]() if name in MIXTURES else None
    out = run.out / f"samples-{step:08d}.png"
    save_samples(x.cpu(), out, seeds=range(num), mixture=mixture, title=f"step {step}")


def summary(run: Run, state: TrainState, steps_this_run: int, last_logged, in_sync: bool,
            log: bool = True) -> dict:
    """The run's summary at ``state.step``, logged unless ``log`` is False. final_loss is the
    run's last logged loss (log.jsonl and loss.png end on it): the mean training loss over the
    last final_loss_steps steps; None when this call trained no step."""
    final_loss, final_steps = last_logged if last_logged is not None else (None, 0)
    record = {"steps": state.step, "steps_this_run": steps_this_run,
              "kimg": state.step * run.cfg.batch / 1000, "final_loss": final_loss,
              "final_loss_steps": final_steps,
              "nonfinite_total": state.nonfinite_total, "ranks_in_sync": in_sync,
              "world_size": run.world,
              "checkpoint": str(latest_checkpoint(run.out)) if run.main else None}
    if log:
        run.log({"summary": record})
    return record


def ranks_in_sync(model: torch.nn.Module, world: int) -> bool:
    """True when every rank holds bit-identical weights (a DDP sanity check at the end)."""
    if world == 1:
        return True
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    index = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)
    digest = torch.stack([flat.sum(), (flat * index).sum()])  # on the backend's device
    gathered = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)
