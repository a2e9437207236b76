"""An exported denoiser loaded back into Python: an AOTInductor package (.pt2) or a TorchScript
file (.ts) written by ``edm_fast.io.export``, as a module in NVlabs' form that every Python
executor can evaluate (and whose file the cpp backend loads without exporting again).

    den = ExportedDenoiser("digits.pt2")
    Sampler(den, solver="dpmpp_2m", num_steps=10)(seeds=range(8), class_labels=3)

The file's ``edm_fast.*`` metadata gives what the contract needs: label_dim, the sample shape
(img_channels, img_resolution), the sigma range and, for a discrete-time preconditioning (DDPM,
iDDPM), the rounding of sigma to its trained levels (``round_sigma``).

Such a file is a program (compiled code, or TorchScript): loading it runs it. Load only files
you exported or trust as you would any program (docs/OFFICIAL.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .export import read_metadata
from ..precond import make_precond
from .model_card import ModelCard, record_card
from .trusted_exports import check_trusted

__all__ = ["ExportedDenoiser", "LOADABLE_SUFFIXES"]

LOADABLE_SUFFIXES = {".pt2": "aoti", ".ts": "torchscript", ".torchscript": "torchscript"}


class ExportedDenoiser(nn.Module):
    """D(x; sigma, class_labels) of an exported file; inputs are moved to the export's device
    and dtype, the output back to x's."""

    def __init__(self, path: str | os.PathLike, *, trusted: bool = False):
        super().__init__()
        self.path = str(path)
        suffix = Path(self.path).suffix.lower()
        if suffix not in LOADABLE_SUFFIXES:
            raise ValueError(f"{self.path}: an exported denoiser ends in "
                             f"{', '.join(LOADABLE_SUFFIXES)}")
        self.kind = LOADABLE_SUFFIXES[suffix]
        # the file is a program: only one edm-fast wrote here, or one the caller trusts
        check_trusted(self.path, trusted=trusted)
        meta = read_metadata(self.path)
        if "edm_fast.sample_shape" not in meta:
            raise ValueError(f"{self.path} has no edm_fast metadata; export it with "
                             "`edm-fast export` (edm_fast.io.export)")
        self.label_dim = int(meta["edm_fast.label_dim"])
        self.sample_shape = tuple(int(n) for n in meta["edm_fast.sample_shape"].split(","))
        self.img_channels = self.sample_shape[0]
        self.img_resolution = self.sample_shape[-1]
        self.sigma_min = float(meta.get("edm_fast.sigma_min", 0.0))
        self.sigma_max = float(meta.get("edm_fast.sigma_max", "inf"))
        self.export_dtype = getattr(torch, meta.get("edm_fast.dtype", "float32"))
        self.export_device = torch.device(meta.get("edm_fast.device", "cpu"))
        dynamic = meta.get("edm_fast.dynamic_batch", "1") == "1"
        self.static_batch = None if dynamic else int(meta.get("edm_fast.batch", "0"))
        names = json.loads(meta.get("edm_fast.class_names", "[]"))
        record_card(self, ModelCard(source=self.path, sample_shape=self.sample_shape,
                                    class_names=names, config=meta))
        precond = meta.get("edm_fast.precond", "")
        self._precond = (make_precond(json.loads(meta["edm_fast.precond_config"]))
                         if precond in ("ddpm", "iddpm") else None)
        if self.kind == "aoti":
            from torch._inductor import aoti_load_package

            self._fn = aoti_load_package(self.path)
        else:
            self._fn = torch.jit.load(self.path, map_location=self.export_device)

    def round_sigma(self, sigma):
        """The nearest trained level of a discrete-time preconditioning, else sigma itself."""
        if self._precond is None:
            return torch.as_tensor(sigma)
        return self._precond.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None):
        n = x.shape[0]
        if self.static_batch is not None and n != self.static_batch:
            raise ValueError(f"{self.path} was exported with a static batch of "
                             f"{self.static_batch}, called with {n} rows; export it with a "
                             "dynamic batch (edm-fast export without --batch)")
        where = {"device": self.export_device, "dtype": self.export_dtype}
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(n)
        args = [x.to(**where).contiguous(), sigma.to(**where).contiguous()]
        if self.label_dim > 0:
            if class_labels is None:
                class_labels = torch.zeros(n, self.label_dim)
            args.append(class_labels.to(**where).contiguous())
        with torch.no_grad():
            out = self._fn(*args)
        return out.to(x.device, x.dtype)
