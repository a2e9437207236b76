"""The model card travels beside a loaded module (never as attributes glued onto it), and the
denoiser contract (precond.DenoiserModule) is one Protocol that NVlabs-form modules meet."""

import pytest
import torch
from torch import nn

from edm_fast.io.model_card import ModelCard, model_card
from edm_fast.io.models import load_denoiser, load_model
from edm_fast.precond import Denoiser, DenoiserModule
from edm_fast.sampling.network_precision import network_in_dtype
from edm_fast.sampling.sampler import Sampler


def test_loading_returns_the_card_and_glues_nothing_onto_the_module():
    den, card = load_model("default")
    assert card.class_names == tuple(str(i) for i in range(10))
    assert card.sample_shape == (1, 16, 16) and card.label_dropout == pytest.approx(0.1)
    assert card.source.endswith("edm-digits.safetensors") and card.config["net"]["arch"]
    assert not hasattr(den, "checkpoint_meta") and "sample_shape" not in vars(den)
    assert model_card(den) is card  # a caller handed only the module finds the same card
    with pytest.raises(TypeError):
        card.config["net"] = {}  # read-only


def test_the_card_follows_a_copy_in_another_precision():
    den = load_denoiser("default")
    half = network_in_dtype(den, torch.bfloat16)
    assert half is not den and model_card(half) is model_card(den)


def test_sampler_reads_class_names_and_shape_from_the_card():
    sampler = Sampler("default", num_steps=2, batch_size=2, backend="reference")
    assert sampler.model_card.class_names == tuple(sampler.class_names)
    assert sampler.shape == (1, 16, 16)
    assert sampler(seeds=[0, 1], class_labels="7").shape == (2, 1, 16, 16)


class NVlabsForm(nn.Module):
    """A user's module in NVlabs' form: no edm-fast class, no card."""

    label_dim, img_channels, img_resolution = 0, 3, 8

    def forward(self, x, sigma, class_labels=None):
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def test_a_module_in_nvlabs_form_meets_the_contract_and_gets_a_card_from_its_attributes():
    module = NVlabsForm()
    assert isinstance(module, DenoiserModule)
    assert model_card(module) == ModelCard(sample_shape=(3, 8, 8))
    sampler = Sampler(module, num_steps=2, batch_size=1, backend="reference")
    assert sampler.shape == (3, 8, 8) and sampler.class_names == []


def test_an_edm_fast_denoiser_meets_the_contract():
    den = load_denoiser("default")
    assert isinstance(den, Denoiser) and isinstance(den, DenoiserModule)
    assert (den.img_channels, den.img_resolution) == (1, 16)
    assert not isinstance(nn.Linear(2, 2), DenoiserModule)
