"""EDM versus DDPM: sample at a given NFE, score the samples, repeat over seed sets, report.

Samplers (N = number of steps; NFE = denoiser evaluations per sample):

| name       | function (samplers.py)              | sigma grid                        | NFE    |
|------------|-------------------------------------|-----------------------------------|--------|
| edm_heun   | sample_edm, S_churn = 0 (Alg. 1)    | edm_sigmas, rho = 7 (Eq. 5)       | 2N - 1 |
| edm_euler  | sample_euler (Eq. 4, Euler steps)   | edm_sigmas                        | N      |
| edm_churn  | sample_edm with churn (Alg. 2)      | edm_sigmas                        | 2N - 1 |
| ddpm       | sample_ddpm (Ho et al., Alg. 2)     | ddpm_sigmas (strided t = T-1..0)  | N      |
| ddim       | sample_ddim, eta = 0 (Song et al.)  | ddpm_sigmas                       | N      |

Any denoiser works with any sampler: a DDPM-trained net under ``DDPMPrecond`` (EDM Table 1, VP
row with discrete t) is sampled by EDM's Heun through ``round_sigma``, which snaps every sigma
to the nearest trained level, as EDM does for its iDDPM and VP baselines (Sec. 3, Fig. 2).

Scores (``Scorer``):
- digits: the Frechet distance between Gaussians fitted to ``DigitsClassifier`` features (64-d
  penultimate layer of a small MLP trained on the real scikit-learn digits) of the samples and of
  all 1797 real digits, plus the accuracy of that classifier on class-conditional samples. This is
  a *feature-space FD for 16x16 digits*, NOT Inception-FID: its values are not comparable with
  published FIDs, and like FID it is biased upwards at small sample counts, so only runs with the
  same number of samples are compared. Below 64 samples per seed set (the feature dimension)
  the fitted covariance is singular and the bias dominates, real data included: ``compare``
  warns, and ``Scorer.bias_note`` gives the note for the report.
- 2-D toy mixture: the sliced 2-Wasserstein distance to as many fresh true samples, and the mean
  exact log-likelihood log p(x) of the samples under the true mixture (``GaussianMixture``). The
  latter rewards mode-seeking too (samples piled on the means score above true samples), so it
  is read next to the value for true samples.

Repeats: repeat r uses seeds r*n .. r*n + n - 1 (``SeedNoise``: a sample depends only on its
seed), so every sampler and net sees the same initial noise and the comparison is paired.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..io.samples import existing_ancestor, save_figure
from .metrics import (
    DigitsClassifier,
    ImageClassifier,
    feature_stats,
    frechet_distance,
    mean_and_se,
    sliced_wasserstein,
)
from ..noise import SeedNoise
from ..precond import DDPMPrecond
from ..sampling.reference import sample_ddim, sample_ddpm, sample_edm, sample_euler
from ..schedules import ddpm_sigmas, edm_sigmas

__all__ = [
    "CHURN",
    "SAMPLER_NAMES",
    "ClassifierScorer",
    "DigitsScorer",
    "LabelledDataScorer",
    "Row",
    "RunSpec",
    "Scorer",
    "ToyScorer",
    "check_reference_size",
    "check_report_folder",
    "compare",
    "find_row",
    "format_table",
    "nfe_for_steps",
    "paired_difference",
    "plot_quality_vs_nfe",
    "plot_sample_sheet",
    "real_digit_labels",
    "reference_row",
    "runs_for",
    "sample_at_nfe",
    "sigma_grid",
    "steps_for_nfe",
    "write_report",
]

REPORT_FILES = ("table.md", "quality_vs_nfe.png", "samples.png", "results.json")

SAMPLER_NAMES = ("edm_heun", "edm_euler", "edm_churn", "ddpm", "ddim")
SECOND_ORDER = ("edm_heun", "edm_churn")
SAMPLER_LABELS = {"edm_heun": "EDM Heun", "edm_euler": "EDM Euler", "edm_churn": "EDM Heun+churn",
                  "ddpm": "DDPM ancestral", "ddim": "DDIM"}
# Alg. 2's stochasticity as in the EDM README's ImageNet-64 example (S_churn=40, S_min=0.05,
# S_max=50, S_noise=1.003); gamma_i = min(S_churn/N, sqrt(2)-1) inside [S_min, S_max].
CHURN = {"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}

#----------------------------------------------------------------------------
# Sampling at a given NFE.


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLER_NAMES)}")


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Number of steps N giving ``nfe`` evaluations: Heun's last step is Euler (Alg. 1 l.6), so
    NFE = 2N - 1 for the second-order samplers and N for the others."""
    _check_sampler(sampler)
    if sampler in SECOND_ORDER:
        if nfe < 1 or nfe % 2 == 0:
            raise ValueError(f"{sampler} needs an odd NFE (2N - 1), got {nfe}")
        return (nfe + 1) // 2
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    return int(nfe)


def nfe_for_steps(sampler: str, steps: int) -> int:
    """Inverse of ``steps_for_nfe``."""
    _check_sampler(sampler)
    return 2 * steps - 1 if sampler in SECOND_ORDER else int(steps)


def sigma_grid(sampler: str, denoiser, steps: int) -> torch.Tensor:
    """The sigma grid a sampler walks: EDM's rho = 7 steps (Eq. 5) clipped to the denoiser's
    trained range (sigma_min >= 0.002, sigma_max <= 80, Sec. 3), or DDPM's own strided levels
    (its precond's T and betas when it has them, else the standard linear schedule)."""
    _check_sampler(sampler)
    if sampler in ("ddpm", "ddim"):
        precond = getattr(denoiser, "precond", None)
        if isinstance(precond, DDPMPrecond):
            return ddpm_sigmas(steps, precond.num_timesteps, precond.beta_start, precond.beta_end)
        return ddpm_sigmas(steps)
    sigma_min = max(0.002, float(getattr(denoiser, "sigma_min", 0.0)))
    sigma_max = min(80.0, float(getattr(denoiser, "sigma_max", math.inf)))
    return edm_sigmas(steps, sigma_min, sigma_max, rho=7.0)


def _sampler_call(sampler: str, churn: dict) -> tuple[Callable, dict]:
    if sampler == "edm_heun":
        return sample_edm, {}
    if sampler == "edm_churn":
        return sample_edm, dict(churn)
    if sampler == "edm_euler":
        return sample_euler, {}
    if sampler == "ddpm":
        return sample_ddpm, {}
    return sample_ddim, {"eta": 0.0}


@torch.no_grad()
def sample_at_nfe(denoiser, sampler: str, nfe: int, seeds: Sequence[int], shape: Sequence[int],
                  *, class_labels=None, batch: int = 256, churn: dict | None = None,
                  device="cpu", callback: Callable | None = None) -> torch.Tensor:
    """Samples (len(seeds), *shape) float32 from ``denoiser`` with a named sampler at ``nfe``.

    Each batch draws its initial latents and the injected noise from ``SeedNoise`` (one stream
    per seed), so a sample depends on its seed only, not on the batch size.
    """
    steps = steps_for_nfe(sampler, nfe)
    sigmas = sigma_grid(sampler, denoiser, steps)
    fn, options = _sampler_call(sampler, CHURN if churn is None else churn)
    seeds = [int(s) for s in seeds]
    labels = None if class_labels is None else torch.as_tensor(class_labels)
    out = []
    for start in range(0, len(seeds), batch):
        noise = SeedNoise(seeds[start:start + batch], shape, device=device)
        batch_labels = None if labels is None else labels[start:start + batch].to(device)
        x = fn(denoiser, noise.draw(), sigmas, class_labels=batch_labels,
               randn=noise.randn_like, callback=callback, **options)
        out.append(x.float().cpu())
    return torch.cat(out)

#----------------------------------------------------------------------------
# Scores.


class Scorer:
    """Scores a batch of samples; ``metrics`` names the scores, ``higher_is_better`` their sense."""

    name = "base"
    metrics: tuple[str, ...] = ()
    higher_is_better: ClassVar[dict[str, bool]] = {}
    titles: ClassVar[dict[str, str]] = {}
    pooled_metrics: tuple[str, ...] = ()  # scored once on all seed sets together (no SE)
    yscales: ClassVar[dict[str, str]] = {}  # matplotlib y-scale per metric (default linear)
    shape: tuple[int, ...] = ()
    num_classes = 0
    feature_dim = 0  # dimension of the features a Frechet distance is taken in (0: no FD)

    def check_sizes(self, samples: int, repeats: int) -> None:
        """Raise ValueError, before any sampling, for sizes this scorer cannot score."""
        if samples < 1 or repeats < 1:
            raise ValueError(f"need >= 1 sample and >= 1 seed set, got {samples} and {repeats}")

    def bias_note(self, samples: int, repeats: int) -> str:
        """A warning for the report when ``samples`` per seed set is below the feature
        dimension: the fitted covariance then has rank < dimension, and the FD (the real-data
        floor included) is dominated by small-sample bias; empty otherwise."""
        if not self.feature_dim or samples >= self.feature_dim:
            return ""
        pooled = samples * repeats
        also = ("is less affected" if pooled >= self.feature_dim else "is affected as well")
        return (f"{samples} samples per seed set is fewer than the {self.feature_dim} "
                f"feature dimensions, so the fitted covariance is singular and the FD values "
                f"(the real-data floor included) are dominated by small-sample bias, not by "
                f"sample quality; fd_pooled over all {pooled} samples {also}. Use at least "
                f"{self.feature_dim} samples per seed set.")

    def labels(self, seeds: Sequence[int]) -> torch.Tensor | None:
        """Class labels for conditional sampling (seed mod num_classes), else None."""
        if not self.num_classes:
            return None
        return torch.tensor([int(s) % self.num_classes for s in seeds])

    def __call__(self, samples: torch.Tensor, labels, repeat: int) -> dict[str, float]:
        raise NotImplementedError

    def reference(self, n: int, repeat: int) -> dict[str, float]:
        """The scores of n real samples: the floor a perfect sampler reaches at this n."""
        raise NotImplementedError

    def check_reference_sizes(self, samples: int, repeats: int) -> None:
        """Raise ValueError when the real data cannot supply ``reference_row`` at this size."""

    def pooled(self, samples: torch.Tensor, labels) -> dict[str, float]:
        """Scores of all seed sets together (less biased for FD-like scores); none by default."""
        return {}

    def reference_pooled(self, n: int) -> dict[str, float]:
        return {}


class ClassifierScorer(Scorer):
    """Feature-space FD (NOT Inception-FID) and classifier accuracy with a classifier of the
    data: ``classifier`` (features(), accuracy(), head), ``real_mu``/``real_cov`` the real
    features the FD is taken against, and ``real``/``real_labels`` the real images that the
    real-data floor (``reference``) draws from, class-balanced like the samples."""

    metrics = ("fd", "acc")
    higher_is_better: ClassVar[dict[str, bool]] = {"fd": False, "acc": True}
    pooled_metrics = ("fd_pooled",)
    yscales: ClassVar[dict[str, str]] = {"fd": "log"}

    @property
    def feature_dim(self) -> int:
        return self.classifier.head.in_features

    @torch.no_grad()
    def _stats(self, images: torch.Tensor):
        return feature_stats(self.classifier.features(images.float().cpu()))

    def check_sizes(self, samples, repeats):
        if samples < 2:
            raise ValueError(f"the feature FD needs >= 2 samples per seed set, got {samples}")
        super().check_sizes(samples, repeats)

    def check_reference_sizes(self, samples, repeats):
        check_reference_size(samples, repeats, self.real_labels, self.num_classes)

    def fd(self, images: torch.Tensor) -> float:
        """FD between the classifier's features of ``images`` and of the real data."""
        mu, cov = self._stats(images)
        return frechet_distance(mu, cov, self.real_mu, self.real_cov)

    def __call__(self, samples, labels, repeat):
        samples = samples.clamp(-1, 1)  # as the images are saved (uint8)
        acc = float("nan") if labels is None else self.classifier.accuracy(samples, labels)
        return {"fd": self.fd(samples), "acc": acc}

    def _stratified(self, labels: torch.Tensor, generator) -> torch.Tensor:
        """Indices of random real digits with exactly these labels (no repeats within a class):
        the reference is class-balanced like the conditional samples, which matters for FD."""
        out = torch.empty(len(labels), dtype=torch.long)
        for c in labels.unique():
            pool = (self.real_labels == c).nonzero().flatten()
            where = (labels == c).nonzero().flatten()
            if len(where) > len(pool):
                raise ValueError(f"only {len(pool)} real images of class {int(c)}")
            out[where] = pool[torch.randperm(len(pool), generator=generator)[:len(where)]]
        return out

    def reference(self, n, repeat):
        labels = self.labels(range(repeat * n, (repeat + 1) * n))
        idx = self._stratified(labels, torch.Generator().manual_seed(1000 + repeat))
        return self(self.real[idx], self.real_labels[idx], repeat)

    def pooled(self, samples, labels):
        return {"fd_pooled": self.fd(samples.clamp(-1, 1))}

    def reference_pooled(self, n):
        idx = self._stratified(self.labels(range(n)), torch.Generator().manual_seed(999))
        return self.pooled(self.real[idx], None)


class DigitsScorer(ClassifierScorer):
    """The 16x16 digits: an MLP classifier of the real digits; FD against all of them, the
    real-data floor drawn from all of them."""

    name = "digits"
    titles: ClassVar[dict[str, str]] = {
        "fd": "feature FD to real digits (not Inception-FID), lower is better",
        "acc": "classifier accuracy on conditional samples, higher is better"}
    num_classes = 10

    def __init__(self, classifier: DigitsClassifier | None = None, resolution: int = 16):
        self.classifier = classifier or DigitsClassifier.fit(resolution)
        self.shape = (1, self.classifier.resolution, self.classifier.resolution)
        self.real = self.classifier.real_images
        self.real_labels = self.classifier.real_labels
        self.real_mu, self.real_cov = self._stats(self.real)


class LabelledDataScorer(ClassifierScorer):
    """Any labelled images (a folder label/file.jpg, MNIST, ...): a convolutional classifier
    trained on a stratified ``1 - holdout`` share of them; the FD is taken against that share's
    features, and the real-data floor is scored on the held-out part, which the classifier never
    saw (its accuracy there is ``holdout_accuracy``)."""

    name = "labelled"
    titles: ClassVar[dict[str, str]] = {
        "fd": "feature FD to the real images (a classifier of this data; not Inception-FID), "
              "lower is better",
        "acc": "classifier accuracy on conditional samples, higher is better"}

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                 holdout: float = 0.2, seed: int = 0, steps: int = 400,
                 classifier: ImageClassifier | None = None):
        labels = torch.as_tensor(labels, dtype=torch.long)
        counts = torch.bincount(labels, minlength=num_classes)
        if len(images) != len(labels) or int(counts.min()) < 1 or int(counts.max()) < 2:
            raise ValueError(f"scoring needs images of every class, and two of some class (one "
                             f"to train the classifier, one held out); the counts are "
                             f"{counts.tolist()}")
        g = torch.Generator().manual_seed(seed)
        held = []
        for c in range(num_classes):  # stratified: a class of >= 2 keeps >= 1 on each side
            pool = (labels == c).nonzero().flatten()
            pool = pool[torch.randperm(len(pool), generator=g)]
            held.append(pool[:min(max(1, round(holdout * len(pool))), len(pool) - 1)])
        test = torch.cat(held)
        train = torch.ones(len(labels), dtype=torch.bool)
        train[test] = False
        self.num_classes = num_classes
        self.shape = tuple(images.shape[1:])
        self.classifier = classifier or ImageClassifier.fit(images[train], labels[train],
                                                            num_classes, steps=steps, seed=seed)
        self.real, self.real_labels = images[test], labels[test]
        self.labels_seen = labels[train]  # what the classifier was trained on
        self.holdout_accuracy = self.classifier.accuracy(self.real, self.real_labels)
        self.real_mu, self.real_cov = self._stats(images[train])

    def _held_classes(self) -> tuple[torch.Tensor, int]:
        """(the classes with held-out images, the fewest held-out images of one of them)."""
        counts = torch.bincount(self.real_labels, minlength=self.num_classes)
        classes = (counts > 0).nonzero().flatten()
        return classes, int(counts[classes].min())

    def bias_note(self, samples: int, repeats: int) -> str:
        note = super().bias_note(samples, repeats)
        classes, fewest = self._held_classes()
        total = samples * repeats
        if len(classes) < self.num_classes:
            note += ((" " if note else "") + f"{self.num_classes - len(classes)} classes have "
                     "a single image, used to train the classifier: the real-data row leaves "
                     "them out.")
        if total > len(classes) * fewest:
            note += ((" " if note else "") + f"The held-out real images ({len(self.real)}) are "
                     f"fewer than the {total} samples scored, so the real-data row uses "
                     "smaller seed sets: compare its FD with care.")
        return note

    def check_reference_sizes(self, samples, repeats):
        pass  # reference() scores as many held-out images as there are

    def _balanced(self, n: int, generator) -> torch.Tensor:
        """Up to n held-out images, class-balanced as seeds 0..n-1 are (seed mod classes; the
        classes with held-out images), each at most once: a small held-out part gives a
        smaller real-data set."""
        classes, fewest = self._held_classes()
        per_class = min(-(-n // len(classes)), fewest)
        return self._stratified(classes.repeat(per_class)[:n], generator)

    def reference(self, n, repeat):
        idx = self._balanced(n, torch.Generator().manual_seed(1000 + repeat))
        return self(self.real[idx], self.real_labels[idx], repeat)

    def reference_pooled(self, n):
        idx = self._balanced(n, torch.Generator().manual_seed(999))
        return self.pooled(self.real[idx], None)

    @classmethod
    def for_dataset(cls, dataset, *, steps: int = 400, max_images: int = 5000,
                    seed: int = 0) -> "LabelledDataScorer":
        """The scorer of an ``edm_fast.train.data`` dataset (image folder, MNIST, digits), from at
        most ``max_images`` of its images drawn at random (MNIST's 60000 at 64x64 would take
        a gigabyte)."""
        n = len(dataset)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images]
        items = [dataset[int(i)] for i in pick.sort().values]
        images = torch.stack([torch.as_tensor(x) for x, _ in items]).float()
        labels = torch.tensor([int(y) for _, y in items])
        return cls(images, labels, dataset.num_classes, steps=steps, seed=seed)


def real_digit_labels() -> torch.Tensor:
    """Labels of the 1797 real digits that the digits reference draws from, without fitting the
    classifier (seconds faster than ``DigitsScorer()``): for checks before anything is loaded."""
    from ..train.data import load_digits

    return load_digits(8).labels


def check_reference_size(samples: int, repeats: int, real_labels: torch.Tensor | None = None,
                         num_classes: int = 10) -> None:
    """Raise ValueError unless the class-balanced real-data reference can be drawn: the pooled
    row takes ``samples * repeats`` distinct real digits with labels seed mod ``num_classes``
    (seeds 0, 1, ...), so class c needs about samples * repeats / num_classes of them."""
    if real_labels is None:
        real_labels = real_digit_labels()
    counts = torch.bincount(real_labels, minlength=num_classes).tolist()
    total = samples * repeats
    # seeds 0..n-1 hold ceil((n - c) / num_classes) of class c: n <= num_classes * count_c + c
    limit = min(num_classes * k + c for c, k in enumerate(counts))
    if total <= limit:
        return
    need = [len(range(c, total, num_classes)) for c in range(num_classes)]
    c = next(c for c in range(num_classes) if need[c] > counts[c])
    raise ValueError(f"{samples} samples x {repeats} repeats = {total} samples need "
                     f"{need[c]} real digits of class {c} for the class-balanced real-data "
                     f"reference, but there are only {counts[c]}; keep samples x repeats "
                     f"<= {limit}")


def check_report_folder(out, prefix: str | None = None) -> Path:
    """Raise ValueError now, before any sampling, if ``write_report`` could not write its files
    into the folder ``out``: a file in its place, a file among its parents, a folder where a
    {prefix}_* report file goes, or no write permission. Missing folders are fine (they are
    created, as ``write_report`` does)."""
    if not os.fspath(out).strip():  # Path("") is the current folder
        raise ValueError("--out is empty: name the folder for the report, e.g. compare-out")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder")
    for name in REPORT_FILES if prefix else ():
        if (out / f"{prefix}_{name}").is_dir():
            raise ValueError(f"--out {out}: {prefix}_{name} there is a folder, not a file")
    ancestor = existing_ancestor(out)
    if not ancestor.is_dir():
        raise ValueError(f"cannot create --out {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write --out {out}: {ancestor} is not a writable folder")
    return out


class ToyScorer(Scorer):
    """Sliced Wasserstein to fresh true samples and exact log-likelihood for a toy mixture."""

    name = "toy"
    metrics = ("swd", "loglik")
    higher_is_better: ClassVar[dict[str, bool]] = {"swd": False, "loglik": True}
    titles: ClassVar[dict[str, str]] = {"swd": "sliced W2 to true samples, lower is better",
                                        "loglik": "mean log p(x) under the true mixture"}
    yscales: ClassVar[dict[str, str]] = {"swd": "log", "loglik": "symlog"}

    def __init__(self, mixture, num_projections: int = 256):
        self.mixture = mixture
        self.shape = (mixture.dim,)
        self.num_projections = num_projections

    def _truth(self, n: int, repeat: int) -> torch.Tensor:
        return self.mixture.sample(n, generator=torch.Generator().manual_seed(50_000 + repeat))

    def __call__(self, samples, labels, repeat):
        x = samples.double().reshape(samples.shape[0], -1)
        swd = sliced_wasserstein(x, self._truth(len(x), repeat),
                                 num_projections=self.num_projections, seed=repeat)
        return {"swd": swd, "loglik": self.mixture.log_prob(x).mean().item()}

    def reference(self, n, repeat):
        fresh = self.mixture.sample(n, generator=torch.Generator().manual_seed(90_000 + repeat))
        return self(fresh, None, repeat)

#----------------------------------------------------------------------------
# Running a comparison.


@dataclass(frozen=True)
class RunSpec:
    """One row of a comparison: which net (a key of the models dict), which sampler, which NFE."""

    model: str
    sampler: str
    nfe: int

    def label(self) -> str:
        return f"{self.model} net, {SAMPLER_LABELS[self.sampler]}"


def runs_for(model: str, sampler: str, nfes: Sequence[int]) -> list[RunSpec]:
    """RunSpecs for one net and sampler over several NFEs."""
    return [RunSpec(model, sampler, int(n)) for n in nfes]


@dataclass
class Row:
    """The result of one RunSpec: per-repeat scores, a few samples, and the time it took."""

    spec: RunSpec
    values: dict[str, list[float]] = field(default_factory=dict)
    pooled: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    examples: torch.Tensor | None = None

    def stat(self, metric: str) -> tuple[float, float]:
        return mean_and_se(self.values[metric])

    def to_json(self) -> dict:
        return {"model": self.spec.model, "sampler": self.spec.sampler, "nfe": self.spec.nfe,
                "steps": steps_for_nfe(self.spec.sampler, self.spec.nfe),
                "values": self.values, "pooled": self.pooled, "seconds": self.seconds,
                "mean_se": {m: self.stat(m) for m in self.values}}


def compare(models: dict, runs: Sequence[RunSpec], scorer: Scorer, *, samples: int,
            repeats: int, batch: int = 256, churn: dict | None = None, keep: int = 40,
            log: Callable[[str], None] | None = print) -> list[Row]:
    """Score every RunSpec on ``repeats`` disjoint seed sets of ``samples`` seeds each.

    The sizes are checked first (``Scorer.check_sizes``), and a warning is given when the FD
    would be dominated by small-sample bias (``Scorer.bias_note``)."""
    scorer.check_sizes(samples, repeats)
    note = scorer.bias_note(samples, repeats)
    if note:
        warnings.warn(note, stacklevel=2)
    rows = []
    for spec in runs:
        row, start, pool = Row(spec), time.perf_counter(), []
        for r in range(repeats):
            seeds = range(r * samples, (r + 1) * samples)
            labels = scorer.labels(seeds)
            x = sample_at_nfe(models[spec.model], spec.sampler, spec.nfe, seeds, scorer.shape,
                              class_labels=labels, batch=batch, churn=churn)
            for name, value in scorer(x, labels, r).items():
                row.values.setdefault(name, []).append(value)
            pool.append(x)
        row.examples = pool[0][:keep]
        if scorer.pooled_metrics:
            row.pooled = scorer.pooled(torch.cat(pool), scorer.labels(range(repeats * samples)))
        row.seconds = time.perf_counter() - start
        rows.append(row)
        if log is not None:
            scores = ", ".join(f"{m} {_fmt(*row.stat(m))}" for m in scorer.metrics)
            log(f"{spec.label()} @ {spec.nfe} NFE: {scores} ({row.seconds:.0f} s)")
    return rows


def reference_row(scorer: Scorer, *, samples: int, repeats: int) -> dict[str, tuple[float, float]]:
    """mean ± SE of the scores of real samples at the same sample count (the floor); pooled
    scores (one value, SE = nan) at samples * repeats."""
    scorer.check_reference_sizes(samples, repeats)  # only the real-data rows draw real data
    values: dict[str, list[float]] = {}
    for r in range(repeats):
        for name, value in scorer.reference(samples, r).items():
            values.setdefault(name, []).append(value)
    out = {name: mean_and_se(v) for name, v in values.items()}
    pooled = scorer.reference_pooled(samples * repeats)
    return out | {name: (value, float("nan")) for name, value in pooled.items()}


def paired_difference(a: Row, b: Row, metric: str) -> tuple[float, float]:
    """mean ± SE over repeats of a - b; both rows used the same seed sets, so this is paired."""
    return mean_and_se([x - y for x, y in zip(a.values[metric], b.values[metric])])


def find_row(rows: Sequence[Row], model: str, sampler: str, nfe: int) -> Row | None:
    return next((r for r in rows if r.spec == RunSpec(model, sampler, nfe)), None)

#----------------------------------------------------------------------------
# Reports: Markdown table, quality-versus-NFE plot, sample sheets.


def _fmt(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "–"
    digits = 3 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{mean:.{digits}f}"


def format_table(rows: Sequence[Row], scorer: Scorer, *, reference=None) -> str:
    """Markdown table: net, sampler, NFE, steps, each metric as mean ± SE (pooled ones as one
    value), seconds."""
    pooled = scorer.pooled_metrics
    head = ["net", "sampler", "NFE", "steps", *scorer.metrics, *pooled, "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = row.spec
        steps = steps_for_nfe(s.sampler, s.nfe)
        cells = [s.model, SAMPLER_LABELS[s.sampler], str(s.nfe), str(steps),
                 *(_fmt(*row.stat(m)) for m in scorer.metrics),
                 *(_fmt(row.pooled.get(m, math.nan), math.nan) for m in pooled),
                 f"{row.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if reference is not None:
        cells = ["real data", "–", "–", "–",
                 *(_fmt(*reference.get(m, (math.nan, math.nan)))
                   for m in (*scorer.metrics, *pooled)), "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


def _tile(images: torch.Tensor, ncol: int) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> one (H', W') or (H', W', C) array in [0, 1], ncol per row."""
    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    grid = torch.ones(c, nrow * (h + 1) + 1, ncol * (w + 1) + 1)
    for k in range(n):
        r, q = divmod(k, ncol)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = (
            (images[k].float().clamp(-1, 1) + 1) / 2)
    return grid[0] if c == 1 else grid.permute(1, 2, 0)


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
                ax.imshow(_tile(row.examples[:count], ncol), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
            ax.set_title(f"{row.spec.nfe} NFE", fontsize=7, pad=2)
        axes_line[0].set_ylabel(f"{model} net\n{SAMPLER_LABELS[sampler]}", fontsize=7)
    fig.tight_layout(pad=0.3)
    return save_figure(fig, path)


def _density_image(mixture, lim: float = 1.2, n: int = 160):
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    dens = mixture.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    return dens.reshape(n, n).numpy() ** 0.5, (-lim, lim, -lim, lim)


def _no_nan(value):
    """NaN -> None, recursively, so the JSON is strict (NaN is not JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def write_report(rows: Sequence[Row], scorer: Scorer, out, prefix: str, *, reference=None,
                 mixture=None, title: str = "", notes: str = "") -> dict[str, Path]:
    """Write {prefix}_table.md, {prefix}_quality_vs_nfe.png, {prefix}_samples.png and
    {prefix}_results.json (raw per-repeat scores) into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(zip(("table", "plot", "samples", "json"),
                     (out / f"{prefix}_{name}" for name in REPORT_FILES)))
    table = format_table(rows, scorer, reference=reference)
    paths["table"].write_text((f"## {title}\n\n" if title else "") + table
                              + (f"\n{notes}\n" if notes else ""))
    plot_quality_vs_nfe(rows, scorer, paths["plot"], reference=reference, title=title)
    plot_sample_sheet(rows, paths["samples"], mixture=mixture)
    data = {"scorer": scorer.name, "rows": [r.to_json() for r in rows],
            "reference": reference, "notes": notes}
    paths["json"].write_text(json.dumps(_no_nan(data), indent=1))
    return paths
