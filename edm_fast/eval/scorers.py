"""Scorers of the EDM-versus-DDPM comparison: what a batch of samples scores, and the real-data
floor at the same sample count.

- digits (``DigitsScorer``) and any labelled images (``LabelledDataScorer``), both a
  ``ClassifierScorer``: the Frechet distance between Gaussians fitted to a classifier's features
  (for the digits, the 64-d penultimate layer of a small MLP trained on the real scikit-learn
  digits) of the samples and of the real images, plus the accuracy of that classifier on
  class-conditional samples. This is a *feature-space FD*, NOT Inception-FID: its values are
  not comparable with published FIDs, and like FID it is biased upwards at small sample
  counts, so only runs with the same number of samples are compared. Below as many samples per
  seed set as feature dimensions the fitted covariance is singular and the bias dominates, real
  data included: ``Scorer.bias_note`` gives the note for the report.
- 2-D toy mixture (``ToyScorer``): the sliced 2-Wasserstein distance to as many fresh true
  samples, and the mean exact log-likelihood log p(x) of the samples under the true mixture
  (``GaussianMixture``). The latter rewards mode-seeking too (samples piled on the means score
  above true samples), so it is read next to the value for true samples.

Class-conditional samples take the label seed mod num_classes (``Scorer.labels``); the real-data
floor is drawn class-balanced the same way (``check_reference_size`` checks it can be).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from .metrics import (
    DigitsClassifier,
    ImageClassifier,
    feature_stats,
    frechet_distance,
    sliced_wasserstein,
)

__all__ = [
    "ClassifierScorer",
    "DigitsScorer",
    "LabelledDataScorer",
    "Scorer",
    "ToyScorer",
    "check_reference_size",
    "real_digit_labels",
]

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
