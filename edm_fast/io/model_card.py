"""The model card: what a model's file says about it, kept beside the module, never glued onto it.

A denoiser is any module in NVlabs' form (``precond.DenoiserModule``): it computes D(x; sigma,
labels) and says its ``label_dim`` and shape. What only its file knows (the class names of the
data it was trained on, its training options, the whole stored config) travels in a
``ModelCard``, which loading returns with the module:

    denoiser, card = load_model("runs/edm")          # edm_fast.io.models
    card.class_names, card.label_dropout, card.config["net"]

Loaders also record the card for the module they built, so that code handed only the module
(``Sampler(load_denoiser(...))``) finds it with ``model_card(denoiser)``; a module that no
loader built gets a card read from its own attributes.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["ModelCard", "model_card", "record_card"]


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What is known about a model beyond the module itself.

    Args:
        source: the file or model name it was loaded from ('' when not loaded from a file).
        sample_shape: one sample's shape, (C, H, W) or (D,); None when the file does not say.
        class_names: label i's name (an image folder's subfolder names; '0'..'9' for the
            digits); () when the file stores none.
        label_dropout: the training run's label dropout (classifier-free guidance mixes in the
            unconditional output, which a model trained with 0 never learned); None: unknown.
        config: the whole stored metadata (network spec, preconditioning, training options,
            official source ...), read-only; {} when there is none.
    """

    source: str = ""
    sample_shape: tuple[int, ...] | None = None
    class_names: tuple[str, ...] = ()
    label_dropout: float | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "config", types.MappingProxyType(dict(self.config)))
        if self.sample_shape is not None:
            object.__setattr__(self, "sample_shape", tuple(int(n) for n in self.sample_shape))
        object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source="") -> ModelCard:
        """The card of an edm-fast checkpoint's (or converted official snapshot's) metadata."""
        shape = config.get("sample_shape")
        dropout = (config.get("train") or {}).get("label_dropout")
        return cls(source=str(source), sample_shape=None if shape is None else tuple(shape),
                   class_names=tuple((config.get("data") or {}).get("class_names", ())),
                   label_dropout=None if dropout is None else float(dropout), config=config)


# The card each loader recorded for the module it built. Weak keys: a card lives as long as its
# module, and a module never holds a reference to its card.
_RECORDED: weakref.WeakKeyDictionary[nn.Module, ModelCard] = weakref.WeakKeyDictionary()


def record_card(denoiser, card: ModelCard):
    """Record ``card`` as ``denoiser``'s (a loader's last step); returns ``denoiser``."""
    _RECORDED[denoiser] = card
    return denoiser


def model_card(denoiser) -> ModelCard:
    """The card a loader recorded for ``denoiser`` (or for the denoiser a ``GuidedDenoiser``
    wraps); else one read from the module's own attributes: its sample shape, nothing more."""
    for module in (denoiser, getattr(denoiser, "denoiser", None)):
        try:
            card = _RECORDED.get(module) if module is not None else None
        except TypeError:  # not weak-referenceable: no loader recorded it
            card = None
        if card is not None:
            if card.sample_shape is None:  # an old checkpoint: the network says its shape
                card = dataclasses.replace(card, sample_shape=_own_sample_shape(module))
            return card
    return ModelCard(sample_shape=_own_sample_shape(denoiser))


def _own_sample_shape(denoiser) -> tuple[int, ...] | None:
    """(C, H, W) or (D,) from a module's attributes in NVlabs' form (``img_channels``,
    ``img_resolution``), or a non-image denoiser's ``sample_shape`` (the exact toy denoiser,
    an exported file), or a vector network's ``data_shape`` (``nets.MLP``)."""
    shape = getattr(denoiser, "sample_shape", None)
    if shape is not None:
        return tuple(shape)
    model = getattr(denoiser, "model", denoiser)
    if getattr(model, "data_shape", None) is not None:
        return tuple(model.data_shape)
    res = getattr(model, "img_resolution", None)
    chans = getattr(model, "img_channels", None)
    if res is not None and chans is not None:
        return (int(chans), int(res), int(res))
    return None
