"""Sampling trajectories drawn over the exact noisy marginals p(x; sigma) of a toy mixture.

A sampler walks x from sigma_max down to 0; at every sigma the samples should follow
p(x; sigma) = p_data * N(0, sigma^2 I) (EDM Sec. 2), which ``GaussianMixture.log_prob(x,
sigma)`` gives exactly. So the picture of a good sampler is paths that stay inside the density.

Coordinates. x itself spans +-3 sigma_max, so paths are drawn in the scaled variable
y = s(sigma) x with s(sigma) = 1/sqrt(1 + sigma^2), the VP scaling of EDM Table 1 (DDPM's own
x_t). Then y ~ N(0, 1) at sigma_max and y = x at sigma = 0, and the density transforms as
p_y(y; sigma) = p(y / s; sigma) / s^D. The time axis is u = sigma^(1/rho), rho = 7, the variable
in which EDM's steps are uniform (Eq. 5), with sigma_max on the left.

- ``record_trajectories``: the state after every step of a named sampler
  (``edm_fast.eval.samplers_at_nfe``).
- ``plot_trajectories_1d`` / ``animate_trajectories_1d``: 1-D paths over the density, as a PNG
  or an animated GIF (Pillow) with a side panel comparing the samples' histogram with p(x; sigma).
- ``plot_frames_2d``: for 2-D data, a grid of frames (rows = samplers, columns = sigma levels).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .samplers_at_nfe import SAMPLER_LABELS, sample_at_nfe, sigma_grid, steps_for_nfe
from ..io.samples import save_figure
from ..noise import SeedNoise

__all__ = [
    "Trajectory",
    "animate_trajectories_1d",
    "plot_frames_2d",
    "plot_trajectories_1d",
    "record_trajectories",
    "scaled_density",
    "vp_scale",
]

RHO = 7.0


@dataclass
class Trajectory:
    """States of N samples along one sampling run: sigmas (K,), xs (K, N, D), a title."""

    sigmas: torch.Tensor
    xs: torch.Tensor
    title: str

    def scaled(self) -> torch.Tensor:
        """y = s(sigma) x for every state, (K, N, D)."""
        return self.xs * vp_scale(self.sigmas)[:, None, None]


def vp_scale(sigma) -> torch.Tensor:
    """s(sigma) = 1/sqrt(1 + sigma^2) (EDM Table 1, VP scaling)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1 / (1 + sigma**2).sqrt()


def _axis(sigma) -> torch.Tensor:
    """The time axis u = sigma^(1/rho) (Eq. 5 is uniform in u)."""
    return torch.as_tensor(sigma, dtype=torch.float64).clamp_min(0) ** (1 / RHO)


def record_trajectories(denoiser, sampler: str, nfe: int, seeds: Sequence[int], dim: int, *,
                        title: str | None = None) -> Trajectory:
    """Run ``sampler`` at ``nfe`` on (len(seeds), dim) toy data and keep every state.

    The first state is the initial one: x_0 = sigma_0 n for the EDM samplers (Alg. 1 l.2) and
    x_T = n in DDPM's variable, i.e. sqrt(1 + sigma_0^2) n in x, for DDPM's ancestral sampler.
    """
    sigmas0 = sigma_grid(sampler, denoiser, steps_for_nfe(sampler, nfe))
    rounder = getattr(denoiser, "round_sigma", None)
    sigma0 = float(rounder(sigmas0[:1])[0]) if rounder is not None else float(sigmas0[0])
    noise = SeedNoise(seeds, (dim,)).draw().double()
    start = noise * (math.sqrt(1 + sigma0**2) if sampler == "ddpm" else sigma0)
    sigmas, xs = [sigma0], [start]

    def keep(info):
        sigmas.append(float(info["sigma"]))
        xs.append(info["x"].double().cpu().clone())

    sample_at_nfe(denoiser, sampler, nfe, seeds, (dim,), batch=len(seeds), callback=keep)
    label = title or f"{SAMPLER_LABELS[sampler]}, {nfe} NFE"
    return Trajectory(torch.tensor(sigmas, dtype=torch.float64), torch.stack(xs), label)


def scaled_density(mixture, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """p_y(y; sigma) = p(y / s; sigma) / s^D, the density of y = s(sigma) x, for y (M, D)."""
    s = float(vp_scale(sigma))
    return mixture.log_prob(y / s, sigma).exp() / s**mixture.dim


def _density_field(mixture, sigma_max: float, y_lim: float, n_u: int = 220, n_y: int = 200):
    """(image (n_y, n_u), extent) of p_y(y; sigma) on the (u, y) plane, each column scaled to
    its maximum so that every noise level is visible."""
    u = torch.linspace(float(_axis(sigma_max)), 0.0, n_u, dtype=torch.float64)
    y = torch.linspace(-y_lim, y_lim, n_y, dtype=torch.float64)
    cols = [scaled_density(mixture, y[:, None], float(v) ** RHO) for v in u]
    image = torch.stack(cols, 1)
    image = image / image.amax(0, keepdim=True)
    return image.numpy(), (float(u[0]), float(u[-1]), -y_lim, y_lim)


def _pyplot():
    from ..optional import pyplot

    return pyplot("plotting trajectories")


def _sigma_ticks(ax, sigma_max: float) -> None:
    ticks = [s for s in (80, 10, 1, 0.1, 0.01) if s <= sigma_max * 1.001] + [0]
    ax.set_xticks([float(_axis(s)) for s in ticks])
    ax.set_xticklabels([f"{s:g}" for s in ticks])
    ax.set_xlabel("σ (axis uniform in σ^(1/7), Eq. 5)")


def _draw_paths(ax, mixture, traj: Trajectory, field, upto: float, lines: int) -> None:
    """Density background, the first ``lines`` paths up to sigma >= upto, a marker at upto."""
    image, extent = field
    ax.imshow(image, extent=extent, aspect="auto", origin="lower", cmap="Blues", vmin=0, vmax=1.3)
    mask = traj.sigmas >= upto - 1e-12
    u, y = _axis(traj.sigmas[mask]), traj.scaled()[mask][:, :lines, 0]
    ax.plot(u.numpy(), y.numpy(), color="crimson", lw=0.7, alpha=0.7)
    ax.axvline(float(_axis(upto)), color="0.3", lw=0.8, ls=":")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_ylabel("y = x / √(1 + σ²)")
    ax.set_title(traj.title, fontsize=9)


def _draw_histogram(ax, mixture, traj: Trajectory, k: int, y_lim: float) -> None:
    """Histogram of the samples' y at state k against the exact p_y(y; sigma_k)."""
    sigma = float(traj.sigmas[k])
    y = traj.scaled()[k, :, 0].clamp(-y_lim, y_lim)
    ax.hist(y.numpy(), bins=60, range=(-y_lim, y_lim), density=True, orientation="horizontal",
            color="crimson", alpha=0.5)
    grid = torch.linspace(-y_lim, y_lim, 300, dtype=torch.float64)
    ax.plot(scaled_density(mixture, grid[:, None], sigma).numpy(), grid.numpy(), color="navy",
            lw=1.2)
    ax.set_ylim(-y_lim, y_lim)
    ax.set_yticks([])
    ax.set_xticks([])
    ax.set_title(f"σ = {sigma:.3g}", fontsize=8)


def _figure_1d(mixture, trajs: Sequence[Trajectory], *, y_lim: float, lines: int, dpi: int):
    plt = _pyplot()
    sigma_max = max(float(t.sigmas[0]) for t in trajs)
    field = _density_field(mixture, sigma_max, y_lim)
    fig, axes = plt.subplots(len(trajs), 2, figsize=(8, 2.6 * len(trajs)), dpi=dpi,
                             squeeze=False, gridspec_kw={"width_ratios": [4, 1]})
    return plt, fig, axes, field, sigma_max


def plot_trajectories_1d(mixture, trajs: Sequence[Trajectory], path, *, y_lim: float = 3.0,
                         lines: int = 40, dpi: int = 90) -> Path:
    """Static picture: full paths over the density, and the final histogram, per sampler."""
    plt, fig, axes, field, sigma_max = _figure_1d(mixture, trajs, y_lim=y_lim, lines=lines,
                                                  dpi=dpi)
    for row, traj in zip(axes, trajs):
        _draw_paths(row[0], mixture, traj, field, 0.0, lines)
        _draw_histogram(row[1], mixture, traj, len(traj.sigmas) - 1, y_lim)
        _sigma_ticks(row[0], sigma_max)
    fig.tight_layout()
    return save_figure(fig, path)


def _frame_levels(sigma_max: float, frames: int) -> list[float]:
    """Sigma levels of the animation frames, uniform in u = sigma^(1/rho), ending at 0."""
    u = torch.linspace(float(_axis(sigma_max)), 0.0, frames, dtype=torch.float64)
    return [float(v) ** RHO for v in u]


def _state_at(traj: Trajectory, sigma: float) -> int:
    """Index of the last state whose sigma is >= sigma (the one reached at that level)."""
    idx = (traj.sigmas >= sigma - 1e-12).nonzero().flatten()
    return int(idx[-1]) if len(idx) else 0


def _state_nearest(traj: Trajectory, sigma: float) -> int:
    """Index of the state nearest to sigma in u = sigma^(1/rho)."""
    return int((_axis(traj.sigmas) - float(_axis(sigma))).abs().argmin())


def animate_trajectories_1d(mixture, trajs: Sequence[Trajectory], path, *, frames: int = 36,
                            fps: int = 8, y_lim: float = 3.0, lines: int = 40,
                            dpi: int = 72, colors: int = 128) -> Path:
    """Animated GIF: the paths grow from sigma_max to 0 while the side panels compare the
    samples' histogram with the exact p(x; sigma) at the current level; the last frame holds."""
    from PIL import Image

    plt, fig, axes, field, sigma_max = _figure_1d(mixture, trajs, y_lim=y_lim, lines=lines,
                                                  dpi=dpi)
    images = []
    for level in _frame_levels(sigma_max, frames):
        for row, traj in zip(axes, trajs):
            row[0].clear()
            row[1].clear()
            _draw_paths(row[0], mixture, traj, field, level, lines)
            _draw_histogram(row[1], mixture, traj, _state_at(traj, level), y_lim)
            _sigma_ticks(row[0], sigma_max)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    plt.close(fig)
    sheet = Image.new("RGB", (images[0].width, images[0].height * 3))
    for k, im in enumerate((images[0], images[len(images) // 2], images[-1])):
        sheet.paste(im, (0, k * im.height))  # one palette for all frames, from three of them
    palette = sheet.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    frames_p = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in images]
    durations = [int(1000 / fps)] * (len(frames_p) - 1) + [2500]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames_p[0].save(path, save_all=True, append_images=frames_p[1:], duration=durations,
                     loop=0, optimize=True)
    return path


def plot_frames_2d(mixture, trajs: Sequence[Trajectory], path, *,
                   levels: Sequence[float] = (80.0, 5.0, 1.0, 0.3, 0.1, 0.0), points: int = 1000,
                   dpi: int = 72) -> Path:
    """Grid of frames for 2-D data: rows = samplers, columns = sigma levels; each panel shows
    the exact p_y(y; sigma) and the samples' y = s(sigma) x at the state nearest that level."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(trajs), len(levels), figsize=(2.1 * len(levels),
                             2.25 * len(trajs)), dpi=dpi, squeeze=False)
    for row, traj in zip(axes, trajs):
        for ax, level in zip(row, levels):
            k = _state_nearest(traj, level)
            sigma = float(traj.sigmas[k])
            lim = max(1.1, 0.5 + 2.5 * float(vp_scale(sigma)) * sigma)
            g = torch.linspace(-lim, lim, 120, dtype=torch.float64)
            yy, xx = torch.meshgrid(g, g, indexing="ij")
            dens = scaled_density(mixture, torch.stack([xx.flatten(), yy.flatten()], 1), sigma)
            ax.imshow(dens.reshape(120, 120).numpy() ** 0.5, extent=(-lim, lim, -lim, lim),
                      origin="lower", cmap="Blues")
            y = traj.scaled()[k, :points]
            ax.scatter(y[:, 0].numpy(), y[:, 1].numpy(), s=1.5, c="crimson", alpha=0.6, lw=0)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"σ = {sigma:.3g}", fontsize=8)
        row[0].set_ylabel(traj.title.replace(", ", "\n"), fontsize=8)
    fig.tight_layout(pad=0.4)
    return save_figure(fig, path)
