"""The bundled models: real digits that a classifier trained on the real digits recognises."""

import pytest
import torch

from edm_fast.eval.metrics import DigitsClassifier
from edm_fast.io.model_card import model_card
from edm_fast.io.models import load_denoiser
from edm_fast.sampling.sampler import Sampler


@pytest.fixture(scope="module")
def classifier():
    clf = DigitsClassifier.fit(16)
    assert clf.holdout_accuracy > 0.95  # the judge itself is good (measured 0.975)
    return clf


def _accuracy(classifier, model, n, **opts):
    labels = torch.arange(n) % 10
    sampler = Sampler(model, batch_size=min(n, 250), backend="reference", device="cpu", **opts)
    return classifier.accuracy(sampler(seeds=range(n), class_labels=labels), labels)


def test_bundled_models_load_with_their_config():
    for name, precond in (("default", "edm"), ("default-ddpm", "ddpm")):
        den = load_denoiser(name)
        assert den.precond.name == precond and den.label_dim == 10
        assert model_card(den).sample_shape == (1, 16, 16)
        # the `tiny` preset (317,121 parameters) plus the 10-class label embedding (10 x 16 + 16)
        assert sum(p.numel() for p in den.model.parameters()) == 317_121 + 10 * 16 + 16


def test_bundled_edm_samples_are_the_asked_digits(classifier):
    """200 class-conditional samples, 18 Heun steps, no guidance: >= 90% recognised as the
    asked class (measured on 1000 samples: 96.1%; 99.9% with guidance 2)."""
    assert _accuracy(classifier, "default", 200) >= 0.90


@pytest.mark.slow
def test_bundled_models_1000_samples(classifier):
    assert _accuracy(classifier, "default", 1000) >= 0.93
    assert _accuracy(classifier, "default", 1000, guidance=2.0) >= 0.98
    assert _accuracy(classifier, "default-ddpm", 1000, num_steps=50) >= 0.85
