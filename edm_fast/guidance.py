"""Guidance: classifier-free guidance (Ho & Salimans 2022) and autoguidance (Karras et al. 2024).

Classifier-free: D_w(x; sigma, c) = D(x; sigma, 0) + w (D(x; sigma, c) - D(x; sigma, 0)), with
the unconditional branch given all-zero labels (what label dropout trains the network on).
w = 1 is the plain conditional denoiser; w > 1 strengthens the class. Both branches run as one
batch of 2N.

Autoguidance ("Guiding a Diffusion Model with a Bad Version of Itself", arXiv 2406.02507,
Eq. 1): D_w(x; sigma, c) = D_g(x; sigma, c) + w (D(x; sigma, c) - D_g(x; sigma, c)), the guide
D_g a smaller or less-trained model of the same task, given the same labels (none for an
unconditional model); it replaces the unconditional branch, so no classifier-free guidance runs
on top.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Guidance", "GuidedDenoiser", "one_hot_labels"]


def one_hot_labels(labels, label_dim: int, *, batch: int, device=None, dtype=torch.float32):
    """(N,) ints, (N, label_dim) floats or None -> (N, label_dim) float (zeros when None)."""
    if label_dim <= 0:
        if labels is not None:
            raise ValueError("the model is unconditional: do not pass class labels")
        return None
    if labels is None:
        return torch.zeros(batch, label_dim, device=device, dtype=dtype)
    labels = torch.as_tensor(labels, device=device)
    given = tuple(labels.shape)  # the error below names what the caller passed
    if labels.ndim == 1 and not labels.is_floating_point():
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= label_dim):
            raise ValueError(f"class labels must lie in [0, {label_dim - 1}], got "
                             f"{labels.min().item()}..{labels.max().item()}")
        labels = nn.functional.one_hot(labels.long(), label_dim)
    if labels.shape != (batch, label_dim):
        raise ValueError(f"class_labels must be ({batch},) ints or ({batch}, {label_dim}) floats, "
                         f"got {given}")
    return labels.to(dtype)


class GuidedDenoiser(nn.Module):
    """Wrap a conditional denoiser D(x, sigma, labels) into its guided version of weight w."""

    def __init__(self, denoiser: nn.Module, guidance: float):
        super().__init__()
        if getattr(denoiser, "label_dim", 0) <= 0:
            raise ValueError("guidance needs a class-conditional denoiser")
        self.denoiser = denoiser
        self.guidance = float(guidance)
        self.label_dim = denoiser.label_dim

    def round_sigma(self, sigma):
        rounder = getattr(self.denoiser, "round_sigma", None)
        return rounder(sigma) if rounder is not None else torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        n = x.shape[0]
        labels = one_hot_labels(class_labels, self.label_dim, batch=n, device=x.device,
                                dtype=x.dtype)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(n)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             torch.cat([labels, torch.zeros_like(labels)]))
        cond, uncond = both[:n], both[n:]
        return uncond + self.guidance * (cond - uncond)


class Guidance:
    """Guidance applied once, around any evaluator ``evaluate(x, sigma, labels) -> D``.

    Called as ``guidance(evaluate, x, sigma, labels, guided)``; when ``guided`` (the plan says
    this evaluation's sigma lies in the guidance interval):

    - with a ``guide`` evaluator ``guide(x, sigma, labels) -> D_g`` (autoguidance, Karras et
      al. 2024, Eq. 1): D_g + w (D - D_g), both given the same labels (None for an
      unconditional model), in the dtype of ``x``;
    - without one, when labels are given: classifier-free guidance D_u + w (D_c - D_u) with D_c
      and D_u from one batch of 2N (zero labels for the unconditional half).

    Otherwise (no weight, outside the interval, or classifier-free without labels) the plain
    D(x; sigma, labels): the guide is not evaluated there.
    """

    def __init__(self, weight: float | None, guide=None):
        if guide is not None and weight is None:
            raise ValueError("a guide model (autoguidance) needs a guidance weight")
        self.weight = None if weight is None else float(weight)
        self.guide = guide

    def __call__(self, evaluate, x, sigma, labels, guided: bool = True):
        if self.weight is None or not guided:
            return evaluate(x, sigma, labels)
        if self.guide is not None:  # autoguidance, Eq. 1 of arXiv 2406.02507
            d_main = evaluate(x, sigma, labels).to(x.dtype)
            d_guide = self.guide(x, sigma, labels).to(x.dtype)
            return d_guide + self.weight * (d_main - d_guide)
        if labels is None:
            return evaluate(x, sigma, labels)
        n = x.shape[0]
        both = evaluate(torch.cat([x, x]), torch.cat([sigma, sigma]),
                        torch.cat([labels, torch.zeros_like(labels)]))
        cond, uncond = both[:n], both[n:]
        return uncond + self.weight * (cond - uncond)
