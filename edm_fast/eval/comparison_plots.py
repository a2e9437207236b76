"""Figures of an EDM-versus-DDPM comparison: quality against NFE, and sheets of paired samples.

- ``plot_quality_vs_nfe``: one panel per metric, mean ± SE against NFE on a log axis, with the
  real-data floor at the same sample count as a grey band.
- ``plot_sample_sheet``: one line of panels per (net, sampler), NFE increasing to the right;
  the same seeds in every panel, so the panels are paired. Images are tiled with
  ``edm_fast.io.samples.tile_images``; toy samples are a scatter over the true density.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..io.samples import save_figure, tile_images
from .comparison_rows import Row
from .samplers_at_nfe import SAMPLER_LABELS
from .scorers import Scorer

__all__ = ["plot_quality_vs_nfe", "plot_sample_sheet"]


def _pyplot():
    from ..optional import pyplot

    return pyplot("the comparison's figures")


_COLORS = {"edm_heun": "tab:blue", "edm_euler": "tab:cyan", "edm_churn": "tab:purple",
           "ddpm": "tab:red", "ddim": "tab:orange"}
_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D"]


def plot_quality_vs_nfe(rows: Sequence[Row], scorer: Scorer, path, *, reference=None,
                        title: str = "", dpi: int = 90) -> Path:
    """One panel per metric: score (mean ± SE error bars) against NFE on a log axis; colour =
    sampler, line style and marker = net; a grey band for real data at the same sample count."""
    plt = _pyplot()
    models = list(dict.fromkeys(r.spec.model for r in rows))
    fig, axes = plt.subplots(1, len(scorer.metrics), figsize=(5.2 * len(scorer.metrics), 3.8),
                             dpi=dpi, squeeze=False)
    for ax, metric in zip(axes[0], scorer.metrics):
        groups: dict[tuple[str, str], list[Row]] = {}
        for row in rows:
            groups.setdefault((row.spec.model, row.spec.sampler), []).append(row)
        for (model, sampler), group in groups.items():
            group = sorted(group, key=lambda r: r.spec.nfe)
            stats = [r.stat(metric) for r in group]
            ax.errorbar([r.spec.nfe for r in group], [m for m, _ in stats],
                        yerr=[0 if math.isnan(se) else se for _, se in stats],
                        color=_COLORS[sampler], ls=_STYLES[models.index(model) % 4],
                        marker=_MARKERS[models.index(model) % 4], ms=3.5, lw=1.4, capsize=2,
                        label=f"{model} net, {SAMPLER_LABELS[sampler]}")
        if reference is not None and metric in reference:
            m, se = reference[metric]
            ax.axhspan(m - max(se, 1e-12), m + max(se, 1e-12), color="0.6", alpha=0.4)
            ax.axhline(m, color="0.4", lw=1, label="real data (same n)")
        ax.set_xscale("log")
        _set_yscale(ax, scorer.yscales.get(metric, "linear"))
        ax.set_xlabel("NFE (denoiser evaluations per sample)")
        ax.set_title(scorer.titles.get(metric, metric), fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _set_yscale(ax, scale: str) -> None:
    """'symlog' gets linear ticks labelled plainly (..., -100, -10, -1, 0, 1, 10, ...)."""
    if scale != "symlog":
        ax.set_yscale(scale)
        return
    ax.set_yscale("symlog", linthresh=1.0)
    lo, hi = ax.get_ylim()
    ticks = [v for k in range(6) for v in (-(10.0**k), 10.0**k)] + [0.0]
    ticks = sorted(v for v in ticks if lo <= v <= hi)
    ax.set_yticks(ticks, [f"{v:g}" for v in ticks])



def _sheet_image(images: torch.Tensor, ncol: int) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> one (H', W') or (H', W', C) image in [0, 1] for ``imshow``:
    ncol per row, one white pixel between and around them."""
    grid = (tile_images(images.float().clamp(-1, 1), ncol, padding=1, background=1.0) + 1) / 2
    return grid[0] if grid.shape[0] == 1 else grid.permute(1, 2, 0)


def plot_sample_sheet(rows: Sequence[Row], path, *, mixture=None, count: int = 20,
                      ncol: int = 10, points: int = 600, dpi: int | None = None) -> Path:
    """A sheet with one line of panels per (net, sampler), NFE increasing to the right: the first
    ``count`` samples (seeds 0.., so panels are paired) as an image grid, or the first
    ``points`` as a scatter over the true density."""
    plt = _pyplot()
    lines: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        lines.setdefault((row.spec.model, row.spec.sampler), []).append(row)
    width = max(len(v) for v in lines.values())
    toy = rows[0].examples.ndim == 2
    dpi = dpi or (72 if toy else 100)
    size = (1.9, 1.9) if toy else (2.2, 0.3 + 0.22 * math.ceil(count / ncol))
    fig, axes = plt.subplots(len(lines), width, dpi=dpi, squeeze=False,
                             figsize=(size[0] * width + 0.6, size[1] * len(lines) + 0.2))
    density = _density_image(mixture) if toy and mixture is not None else None
    for ax in axes.flat:
        ax.set_axis_off()
    for axes_line, ((model, sampler), line) in zip(axes, lines.items()):
        for ax, row in zip(axes_line, sorted(line, key=lambda r: r.spec.nfe)):
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            if toy:
                if density is not None:
                    ax.imshow(density[0], extent=density[1], origin="lower", cmap="Blues")
                pts = row.examples[:points].double()
                ax.scatter(pts[:, 0], pts[:, 1], s=1.5, c="crimson", alpha=0.6, lw=0)
                ax.set_xlim(-1.2, 1.2)
                ax.set_ylim(-1.2, 1.2)
            else:
                ax.imshow(_sheet_image(row.examples[:count], ncol), cmap="gray", vmin=0,
                          vmax=1, interpolation="nearest")
            ax.set_title(f"{row.spec.nfe} NFE", fontsize=7, pad=2)
        axes_line[0].set_ylabel(f"{model} net\n{SAMPLER_LABELS[sampler]}", fontsize=7)
    fig.tight_layout(pad=0.3)
    return save_figure(fig, path)


def _density_image(mixture, lim: float = 1.2, n: int = 160):
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    dens = mixture.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    return dens.reshape(n, n).numpy() ** 0.5, (-lim, lim, -lim, lim)

