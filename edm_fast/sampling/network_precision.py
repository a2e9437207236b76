"""A denoiser with its network in the precision asked for (``net_dtype``, edm_fast.precision):
what the Python backends evaluate."""

from __future__ import annotations

import torch

from ..errors import EdmFastError
from ..io.export import read_metadata
from ..io.exported import ExportedDenoiser
from ..io.model_card import model_card, record_card
from ..precision import parse_net_dtype, short_name
from ..precond import Denoiser

__all__ = ["network_in_dtype"]


def network_in_dtype(denoiser, dtype: torch.dtype | None):
    """``denoiser`` with its network running in ``dtype`` (None: unchanged): a
    ``precond.Denoiser`` gives ``Denoiser.with_net_dtype`` (a copy when the dtype changes); an
    exported file must have been exported in ``dtype``; any other module (a denoiser in NVlabs'
    form, an exact toy denoiser) runs only in its own precision, and a reduced one is refused."""
    if dtype is None:
        return denoiser
    if isinstance(denoiser, Denoiser):  # a copy keeps the model card of its original
        return record_card(denoiser.with_net_dtype(dtype), model_card(denoiser))
    if isinstance(denoiser, ExportedDenoiser):  # its metadata says what it was exported in
        exported = parse_net_dtype(read_metadata(denoiser.path).get("edm_fast.net_dtype",
                                                                    "float32"))
        if exported != dtype:
            raise EdmFastError(f"{denoiser.path} was exported with its network in "
                               f"{short_name(exported)}; net_dtype {short_name(dtype)} needs an "
                               f"export in that precision (edm-fast export --dtype)")
        return denoiser
    if dtype == torch.float32:
        return denoiser
    raise EdmFastError(f"net_dtype {short_name(dtype)} needs an edm_fast Denoiser (a network with "
                       f"its preconditioning); {type(denoiser).__name__} runs only in its own "
                       "precision: use net_dtype fp32")
