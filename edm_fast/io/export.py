"""Export the preconditioned denoiser D(x; sigma, labels) for the C++ executor and other runtimes.

What is exported is D of EDM Eq. 7, not the raw network F:

    D(x, sigma[, class_labels]) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma),
                                                                  class_labels)
    x: (B, *shape) in ``dtype``, sigma: (B,) in ``dtype``, class_labels: (B, label_dim) in
    ``dtype`` (one-hot; zeros = unconditional) -> (B, *shape) in ``dtype``.

**Labels convention.** The ``class_labels`` input exists only when label_dim > 0; an
unconditional model has exactly two inputs (x, sigma). The batch B is dynamic by default, so
one file serves every batch size, including the 2N batch of classifier-free guidance.

The coefficients are computed in x's dtype and F runs in the network's own dtype, exactly as
``precond.Denoiser`` does (a float64 export around a float32 net reproduces the float64
reference's arithmetic). ``Denoiser.forward`` branches on shapes (``sigma.numel() == 1``,
label normalisation), which would specialise the batch; ``ExportableDenoiser`` below has no
such branches.

**Denoisers in NVlabs' form** export too: any module with ``forward(x, sigma, class_labels)``
returning D and the attributes ``label_dim``, ``img_channels`` and ``img_resolution`` (optional
``sigma_min``, ``sigma_max``, ``round_sigma``), as the preconditioners of NVlabs' EDM code
(training/networks.py) are. The module applies its own preconditioning; its output is cast to
x's dtype, and its metadata names its class (``edm_fast.precond`` = ``nvlabs.<class name>``).

Every exported file carries ``edm_fast.*`` metadata (label_dim, sample_shape, dtype, device,
precond, sigma_min/sigma_max of the preconditioning, batch) that the C++ loader
(csrc/denoiser_runner.cpp) checks inputs against and the standalone sampler clips its schedule
to: in the AOTInductor package's metadata, or in the TorchScript extra file
``edm_fast_metadata.txt``.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import warnings
import zipfile
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import BadFileError
from .files import atomic_write
from ..guidance import GuidedDenoiser
from ..precond import Denoiser, DenoiserModule, NotADenoiserError
from .trusted_exports import record_export

__all__ = [
    "ExportableDenoiser", "export_aoti", "export_torchscript", "read_metadata", "METADATA_FILE",
    "is_nvlabs_denoiser", "output_file", "require_exportable", "unwrap_guidance",
    "prepare_for_export", "export_metadata",
]

METADATA_FILE = "edm_fast_metadata.txt"  # TorchScript extra file (csrc/denoiser_runner.h)
METADATA_FORMAT = "1"
MAX_METADATA_BYTES = 1 << 20  # read_metadata refuses a larger metadata entry


# ------------------------------------------------------------------------------------------
# The exported function: D(x; sigma, labels) without shape branches (EDM Eq. 7).

_NVLABS_ATTRIBUTES = ("label_dim", "img_channels", "img_resolution")


def is_nvlabs_denoiser(model) -> bool:
    """True for a module in NVlabs' form: ``forward(x, sigma, class_labels)`` returning D, with
    the attributes ``label_dim``, ``img_channels`` and ``img_resolution``."""
    if not isinstance(model, nn.Module) or isinstance(model, Denoiser):
        return False
    if not isinstance(model, DenoiserModule):  # the attributes of the contract
        return False
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = [p.kind for p in params]
    P = inspect.Parameter
    positional = sum(k in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) for k in kinds)
    return positional >= 3 or P.VAR_POSITIONAL in kinds


def require_exportable(model, purpose: str) -> None:
    """Raise NotADenoiserError unless ``model`` is a ``precond.Denoiser`` or a module in
    NVlabs' form (``is_nvlabs_denoiser``)."""
    if isinstance(model, Denoiser) or is_nvlabs_denoiser(model):
        return
    hint = ("unwrap GuidedDenoiser: guidance runs in the sampling loop"
            if isinstance(model, GuidedDenoiser) else
            "exact denoisers such as the toy models run on the 'reference' and 'compiled' "
            "backends")
    raise NotADenoiserError(
        f"{purpose} needs a denoiser with its preconditioning: an edm_fast.precond.Denoiser or "
        f"a module in NVlabs' form (forward(x, sigma, class_labels) and attributes "
        f"{', '.join(_NVLABS_ATTRIBUTES)}), got {type(model).__name__} ({hint})")


class ExportableDenoiser(nn.Module):
    """Branch-free D(x, sigma[, class_labels]) around a ``Denoiser``'s network and precond, or
    around a module in NVlabs' form (which preconditions itself).

    Shares the network's parameters (no copy). ``forward(x (B, *shape), sigma (B,),
    class_labels (B, label_dim) | None) -> (B, *shape)`` in x's dtype.
    """

    def __init__(self, denoiser):
        super().__init__()
        require_exportable(denoiser, "export")
        self.label_dim = int(denoiser.label_dim)
        if isinstance(denoiser, Denoiser):
            self.model = denoiser.model
            self.precond = denoiser.precond
            param = next(denoiser.model.parameters(), None)
            self.net_dtype = denoiser.net_dtype or (param.dtype if param is not None else None)
        else:  # NVlabs' form: D itself
            self.model = denoiser
            self.precond = None
            self.net_dtype = None
        from .checkpoints import class_names

        self.class_names = class_names(denoiser)  # the checkpoint's, e.g. its folder names

    def metadata(self) -> dict[str, str]:
        """The preconditioning's entries of the exported metadata, and the class names."""
        if self.precond is None:
            name = f"nvlabs.{type(self.model).__name__}"
            config = {"class": type(self.model).__name__}
            lo = float(getattr(self.model, "sigma_min", 0.0))
            hi = float(getattr(self.model, "sigma_max", math.inf))
        else:
            name, config = self.precond.name, self.precond.config()
            lo, hi = float(self.precond.sigma_min), float(self.precond.sigma_max)
        # The sigma range the preconditioning supports (VP, VE: finite), which samplers clip to.
        meta = {"edm_fast.precond": name, "edm_fast.precond_config": json.dumps(config),
                "edm_fast.sigma_min": repr(lo), "edm_fast.sigma_max": repr(hi)}
        if self.class_names:  # label i of class_labels is class_names[i]
            meta["edm_fast.class_names"] = json.dumps(self.class_names)
        return meta

    def forward(self, x: torch.Tensor, sigma: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.precond is None:  # the module preconditions itself
            return self.model(x, sigma, class_labels).to(x.dtype)
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)  # (B,) each, x's dtype
        shape = (-1,) + (1,) * (x.ndim - 1)  # (B,) -> (B, 1, ..., 1)
        net_dtype = self.net_dtype or x.dtype
        noise_dtype = torch.float32 if net_dtype in (torch.float16, torch.bfloat16) else net_dtype
        x_in = (c_in.reshape(shape) * x).to(net_dtype)
        labels = None if class_labels is None else class_labels.to(net_dtype)
        F_x = self.model(x_in, c_noise.to(noise_dtype), labels, None)  # Eq. 7, inner F
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * F_x.to(x.dtype)


def unwrap_guidance(denoiser):
    """The denoiser a ``GuidedDenoiser`` wraps (exports hold one network, unguided), else the
    denoiser itself."""
    inner = getattr(denoiser, "denoiser", None)  # GuidedDenoiser -> its denoiser
    exportable = isinstance(inner, Denoiser) or is_nvlabs_denoiser(inner)
    return inner if exportable and not isinstance(denoiser, Denoiser) else denoiser


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """The module itself when all its tensors are on ``device``, else a moved deep copy."""
    tensors = list(module.parameters()) + list(module.buffers())
    if all(t.device.type == device.type and (device.index is None or t.device == device)
           for t in tensors):
        return module
    return copy.deepcopy(module).to(device)


def prepare_for_export(denoiser, example_shape: Sequence[int], label_dim: int | None, device,
                       dtype, min_batch: int):
    """What every exporter traces: (``ExportableDenoiser`` in eval mode, example args,
    label_dim, sample shape, restore-training callback)."""
    denoiser = unwrap_guidance(denoiser)
    device = torch.device(device)
    example_shape = tuple(int(n) for n in example_shape)
    if len(example_shape) < 2 or min(example_shape) < 1:
        raise ValueError(f"example_shape must be a batch shape (N, *sample_shape) with sizes >= 1,"
                         f" got {example_shape}")
    module = ExportableDenoiser(denoiser)
    label_dim = module.label_dim if label_dim is None else int(label_dim)
    if label_dim != module.label_dim:
        raise ValueError(f"label_dim={label_dim} but the denoiser has label_dim="
                         f"{module.label_dim}")
    network = module.model  # the user's module, whose training mode eval() changes
    module.model = _on_device(module.model, device)
    was_training = network.training
    module.eval()  # no dropout / label dropout in the exported function

    def restore():
        network.train(was_training)

    batch = max(example_shape[0], min_batch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *example_shape[1:]), generator=gen).to(device, dtype)
    sigma = torch.exp(torch.randn(batch, generator=gen) * 1.2 - 1.2).to(device, dtype)
    args = (x, sigma)
    if label_dim > 0:
        args += (torch.eye(label_dim)[torch.arange(batch) % label_dim].to(device, dtype),)
    return module, args, label_dim, example_shape[1:], restore


def output_file(path) -> str:
    """``path`` as a str; IsADirectoryError (an OSError) now, before any tracing, when it is an
    existing folder (torch's writers fail on one only after the export work)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is an existing folder")
    return path


def export_metadata(module: ExportableDenoiser, sample_shape, label_dim: int, dtype, device,
                    dynamic_batch: bool, batch: int) -> dict[str, str]:
    """The ``edm_fast.*`` metadata every exported file carries (read back by ``read_metadata``
    and the loaders): format, label_dim, sample shape, dtypes, device, batch."""
    return {
        "edm_fast.format": METADATA_FORMAT,
        "edm_fast.label_dim": str(label_dim),
        "edm_fast.sample_shape": ",".join(str(n) for n in sample_shape),
        "edm_fast.dtype": str(dtype).removeprefix("torch."),
        "edm_fast.device": torch.device(device).type,
        **module.metadata(),
        "edm_fast.net_dtype": str(module.net_dtype or dtype).removeprefix("torch."),
        "edm_fast.dynamic_batch": "1" if dynamic_batch else "0",
        "edm_fast.batch": str(batch),
    }


# ------------------------------------------------------------------------------------------
# AOTInductor (.pt2) for the C++ executor (csrc/) and the standalone edm_fast_sample binary.

def export_aoti(denoiser, example_shape: Sequence[int], *, label_dim: int | None = None,
                device="cpu", dtype: torch.dtype = torch.float32,
                path: str | os.PathLike, dynamic_batch: bool = True,
                inductor_configs: dict | None = None) -> str:
    """Compile D(x, sigma[, class_labels]) with torch.export + AOTInductor into a .pt2 package.

    Args:
        denoiser: a ``precond.Denoiser`` or a module in NVlabs' form (see the module
            docstring); a ``GuidedDenoiser`` is unwrapped: guidance runs in the sampling loop
            as one 2N batch. Anything else raises ``precond.NotADenoiserError``.
        example_shape: a batch shape (N, *sample_shape), e.g. (8, 3, 32, 32). With
            ``dynamic_batch`` the batch is symbolic (any B >= 1; traced at max(N, 2) since
            torch.export specialises size-1 dimensions); without it the package only accepts B = N
            (use 2N for guided sampling).
        label_dim: must equal ``denoiser.label_dim`` (default); 0 = no labels input.
        device: 'cpu' or 'cuda[:i]'; the package only runs on that device type.
        dtype: dtype of x, sigma and labels (the C++ executor's dtype); F keeps its own dtype.
        path: where to write the package (must end in ``.pt2``; missing parent folders
            are created).
        inductor_configs: extra Inductor options (merged over the metadata entry).

    Returns the package path. Takes tens of seconds on a CPU (C++ compilation of the kernels).
    """
    path = output_file(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"an AOTInductor package path must end in '.pt2', got {path!r}")
    module, args, label_dim, sample_shape, restore = prepare_for_export(
        denoiser, example_shape, label_dim, device, dtype, min_batch=2 if dynamic_batch else 1)
    batch = args[0].shape[0]
    dynamic_shapes = None
    if dynamic_batch:
        dim = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: dim} for _ in args)
    configs = {"aot_inductor.metadata": export_metadata(module, sample_shape, label_dim, dtype,
                                                        device, dynamic_batch, batch)}
    configs.update(inductor_configs or {})
    try:
        with torch.no_grad():
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
            atomic_write(path, lambda tmp: torch._inductor.aoti_compile_and_package(
                program, package_path=str(tmp), inductor_configs=configs))
    finally:
        restore()
    record_export(path)  # a program edm-fast wrote: loaders may run it (trusted_exports)
    return path


# ------------------------------------------------------------------------------------------
# TorchScript (torch.jit.trace): the fallback the C++ executor also loads (torch::jit::load).

def export_torchscript(denoiser, example_shape: Sequence[int], *, label_dim: int | None = None,
                       device="cpu", dtype: torch.dtype = torch.float32,
                       path: str | os.PathLike) -> str:
    """Trace D(x, sigma[, class_labels]) with torch.jit.trace and save it with edm_fast metadata.

    Same arguments and input convention as ``export_aoti``. The traced graph keeps the batch
    dimension symbolic for networks that do not turn sizes into Python numbers; the tests check
    batches 1 .. 16 and the guided 2N batch. TorchScript is deprecated upstream; prefer AOTI.
    Missing parent folders of ``path`` are created.
    """
    path = output_file(path)
    module, args, label_dim, sample_shape, restore = prepare_for_export(
        denoiser, example_shape, label_dim, device, dtype, min_batch=2)
    meta = export_metadata(module, sample_shape, label_dim, dtype, device, True, args[0].shape[0])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(module, args)
            text = "".join(f"{k}={v}\n" for k, v in meta.items())
            atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp),
                                                          _extra_files={METADATA_FILE: text}))
    finally:
        restore()
    record_export(path)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata stored in an exported file (AOTI package or TorchScript zip archive). An
    entry declaring more than MAX_METADATA_BYTES (uncompressed, from the zip directory) is
    refused before it is read."""
    def read(archive, name):
        if archive.getinfo(name).file_size > MAX_METADATA_BYTES:
            raise BadFileError(f"{path}: its metadata entry {name} declares "
                               f"{archive.getinfo(name).file_size} bytes, over "
                               f"{MAX_METADATA_BYTES}")
        return archive.read(name)

    with zipfile.ZipFile(os.fspath(path)) as archive:
        for name in archive.namelist():
            if name.endswith("/extra/" + METADATA_FILE):
                lines = read(archive, name).decode().splitlines()
                return dict(line.split("=", 1) for line in lines if "=" in line)
        for name in archive.namelist():
            if name.endswith("metadata.json") and "/aotinductor/" in name:
                data = json.loads(read(archive, name))
                if "AOTI_DEVICE_KEY" in data:
                    return data
    return {}


# ------------------------------------------------------------------------------------------
# ONNX export (reserved: added separately; it should reuse ExportableDenoiser and the same
# input convention and metadata keys).
